// Package dns is tpgw's fake-ip DNS server: it answers the LAN's DNS queries
// with the engine's answers, over UDP and TCP, parsing and packing messages
// with github.com/miekg/dns.
//
// # Place in the path
//
// netcfg's rule "th dport 53 tproxy to :1053" diverts every DNS query a LAN
// client sends, to any server address (the router, 8.8.8.8, the ISP's), to
// this server on dns.listen (default 0.0.0.0:1053). The server hands each
// query to the engine (the consumer-declared Engine interface; engine.Engine
// satisfies it), which answers with a fake IP from mihomo's pool in fake-ip
// mode, a real answer for fake-ip-filter names, or a lookup through mihomo's
// resolver for other types. A later connection to the fake IP is TPROXYed to
// relay, and the engine maps the fake IP back to the name.
//
// # Why transparent sockets
//
// A TPROXYed packet keeps its destination (say 203.0.113.2:53); the kernel
// only delivers it to a socket with IP_TRANSPARENT (IPV6_TRANSPARENT), which
// needs CAP_NET_ADMIN. Without the capability Listen falls back to plain
// sockets with a warning: queries sent to the server's own address still work
// (unit tests run that way), hijacked ones do not reach it.
//
// A TCP query needs nothing more: the accepted socket's local address is the
// original destination, and replies leave from it. A UDP reply must come from
// the address and port the client asked, or the client (and any stateful
// firewall) drops it. The listener therefore receives each datagram's
// original destination (IP_RECVORIGDSTADDR) and answers from a transparent
// UDP socket bound to it (IP_TRANSPARENT, SO_REUSEADDR). Those reply sockets
// are few (clients use few DNS servers), so they are cached by destination,
// at most 64, closed after 30s unused; they are never connected and never
// read, so incoming queries keep going to the listener. A destination that is
// one of the gateway's own addresses (clients asking the router) gets a
// socket for the one reply instead: a cached one would take datagrams meant
// for a local resolver on that address. A query sent to the listener's own
// port is answered from the listener, with IP_PKTINFO setting the source.
//
// The server records its network namespace at Listen and makes reply sockets
// there even when the goroutine making them runs on a thread in another
// namespace. In tpgw everything runs in one namespace and this check is all
// it costs; it matters to tests that start the server inside a namespace.
//
// The socket plumbing (transparent sockets, the control message parser,
// reply sockets, the namespace) is shared with package relay in
// internal/tsock.
//
// # Untrusted input
//
// Messages come from any LAN host. Anything that does not unpack is dropped
// without a reply and counted (Stats.Malformed); responses are never answered
// (no loops between servers); the work per message is bounded (5s per query,
// 1024 queries in flight, 256 TCP connections, 10s TCP idle timeout).
// FuzzHandleMessage exercises the message handling.
package dns
