// Package relay owns tpgw's TPROXY listeners.
//
// The kernel (rules installed by netcfg) diverts LAN flows to tproxy-port
// without rewriting them. A listener with IP_TRANSPARENT may accept
// connections addressed to any IP, so the accepted socket's local address is
// the flow's original destination (TCP). The relay turns each accepted flow
// into (source, original destination) and hands it to the engine through the
// small TCPHandler interface declared here, so the relay can be tested
// without mihomo.
//
// # TCP
//
// Each accepted connection goes to the engine on its own goroutine. The
// engine owns it from then on: it relays the flow and closes the connection
// when the flow ends. It may return before that: a DIRECT flow is copied by
// the engine without a goroutine of its own while it is idle (engine/park.go),
// so the listener's Close ends only the flows whose handler still runs, and
// the engine's Close ends the rest.
//
// # UDP
//
// UDP has no accepted socket per flow: every diverted datagram arrives on the
// one listening socket. With IP_RECVORIGDSTADDR (and IPV6_RECVORIGDSTADDR)
// set, recvmsg returns the datagram's destination address and port as a
// control message (a sockaddr_in or sockaddr_in6), which is the original
// destination since TPROXY changes nothing in the packet. Datagrams without
// it, and datagrams sent straight to the listener's own port, are dropped.
// Each datagram goes to the engine through UDPHandler with a reply function.
//
// Replies cannot be sent from the listening socket: a UDP client only
// accepts a reply whose source is the address it sent to (a connected socket
// filters everything else, and NATs and firewalls in between track the same
// tuple), and the listener's address is the gateway's. So each reply leaves
// from a socket bound to that remote address — the original destination, or
// for full-cone replies the address the reply really came from — which only
// IP_TRANSPARENT allows (binding and sending from a non-local address).
// SO_REUSEADDR lets many clients' sockets share one such address. These
// sockets are kept in a table keyed by (client, reply source), bounded (the
// least recently used session is evicted when it is full) and closed after an
// idle timeout; they stay unconnected, so that the TPROXY lookup never mistakes
// one for an established socket and steals the client's next datagram from
// the listener. See Documentation/networking/tproxy.rst in the kernel tree.
//
// SO_REUSEADDR shares an address only with sockets that set it too. A socket
// of the gateway that holds the port on all addresses without it (tpgw's own
// listeners, a WireGuard server on the router, mihomo's DIRECT sockets on
// their ephemeral ports) makes the bind fail with EADDRINUSE, IP_TRANSPARENT
// or not. Such a session sends its replies from a raw socket instead, which
// writes the IP and UDP headers with the reply's source itself and binds
// nothing (UDPStats.RawSessions counts them); the kernel does not fragment
// its packets, so a reply larger than the LAN's MTU fails there.
//
// Reply sockets are opened in the network namespace the listener was opened
// in, whichever goroutine asks for them (it matters only to tests, which
// open listeners inside throwaway namespaces).
//
// # Pings to fake IPs
//
// netcfg delivers echo requests to the fake-ip range to the gateway. The
// kernel answers the IPv6 ones; for IPv4 it will not send a reply whose
// source is not one of the gateway's addresses, so PingResponder does: a raw
// ICMP socket with a socket filter that lets only echo requests to the range
// through, and IP_HDRINCL with IP_TRANSPARENT to reply from the fake IP.
//
// The socket plumbing (transparent sockets, the control message parser,
// reply sockets, the namespace) is shared with package dns in internal/tsock.
package relay
