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
// one of the gateway's own addresses (clients asking the router, where
// dnsmasq listens) gets no socket at all: its replies leave from a raw socket
// (IPPROTO_RAW, which receives nothing) that writes the IP and UDP headers
// itself. A socket bound there, cached or made for the one reply, would take
// the datagrams that reach that address meanwhile, such as tpgw's own
// forward of a local name to that dnsmasq (lost, and a SERVFAIL 3 s later).
// Without CAP_NET_RAW (with a warning), and for a reply larger than the
// link's MTU (the kernel fragments what a UDP socket sends, not what a raw
// one does), such replies fall back to a socket per reply. A query sent to the listener's own
// port is answered from the listener, with IP_PKTINFO setting the source.
//
// The server records its network namespace at Listen and makes reply sockets
// there even when the goroutine making them runs on a thread in another
// namespace. In tpgw everything runs in one namespace and this check is all
// it costs; it matters to tests that start the server inside a namespace.
//
// The UDP listener's receive buffer is raised to 4 MiB (tsock.RaiseRcvBuf):
// every client's queries queue in that one socket, and the default of about
// 208 KiB holds some 270 small queries. In the bench, a client with 500
// queries in flight lost 0.16% of them to that overflow, each then waiting
// for its client's timeout (2 s in dnsperf, up to 5 s in a stub resolver);
// with the raised buffer none was lost (TestQueryBurstNotDropped).
//
// # The UDP path
//
// One goroutine reads the listener, up to 32 datagrams a call (recvmmsg).
// It answers a repeated query from the reply cache, and a query the engine
// answers at once (InstantEngine: a fake IP or a hosts entry, which take
// nothing but the engine's memory) itself; the burst's answers leave in one
// sendmmsg. An instant answer that carries a new fake-ip mapping must not
// leave before the mapping is in cache.db's journal: those go to the
// reader's settler, a goroutine that writes the mappings of everything
// pushed to it meanwhile in one journal write, and then sends those answers,
// 32 to a sendmmsg, and puts them in the reply cache. The reader never waits
// for the disk: while a write is slow, repeated and known names are still
// answered. Any other query (a real lookup upstream, a local name, a name
// dns-bypass may resolve) goes to a worker goroutine, at most 1024 at once,
// whose answers leave together with those of other workers that finish
// meanwhile. In the bench, answering new names in the reader instead of a
// worker each took the CPU per new name from 28.8 to 19.3 µs (50.8k to 61.6k
// new names a second, 4 alternating rounds, with the reader writing the
// journal itself): the workers' answers had left about 2 to a sendmmsg and
// their mappings 1.5 to a journal write, against about 26 and a burst's
// worth. Handing the write and those answers to the settler, so that the
// reader does not wait for the disk, cost about 7% more CPU per new name
// (17.9 to 19.3 µs, 68.8k to 65.0k a second, 3 alternating rounds). The
// engine never lets the reader wait for the network either: mihomo's
// handler gets an already canceled context there, so a query that would have
// to go upstream after all (a config swapped by a reload) fails at once and
// goes to a worker.
//
// The socket plumbing (transparent sockets, the control message parser,
// reply sockets, the namespace) is shared with package relay in
// internal/tsock.
//
// # Local names (ForwardLocalNames)
//
// A hijacked query for a name only the LAN knows (isLocalName: one label,
// .lan, .local, .localdomain, .home.arpa, .internal, the reverse zones of
// private and link-local addresses) is not handed to the engine: it goes to
// the server the client asked, its original destination (the router's
// dnsmasq), over the client's transport, from a socket with mihomo's
// routing-mark, and that server's answer is passed back unchanged and not
// cached. A name in mihomo's hosts is the engine's. localnames.go says why.
//
// # DNS-driven kernel bypass (tpgw.dns-bypass, off by default)
//
// Bypass sits in front of the engine. For an A or AAAA query it asks the
// engine (DirectResolver, engine.Engine.ResolveDirect) whether every flow to
// the name, and to each of its real addresses, goes to mihomo's literal
// DIRECT adapter for certain. If so, the engine resolves the name through
// the resolver DIRECT dials with (direct-nameserver, else nameserver, with
// nameserver-policy and mihomo's cache), Bypass puts each address into the
// kernel set (BypassSet: netcfg's dns_bypass4/dns_bypass6, wired in
// cmd/tpgw) with a timeout of the answer's TTL clamped to 1 min..1 h plus 5
// min of grace, and only then answers with the real addresses (TTL at most 1
// h). The kernel returns those destinations before the TPROXY rule, so their
// flows are forwarded like any routed traffic and never enter tpgw. In any
// other case, and when the set cannot be updated, the query goes to the
// engine as before (a fake IP). A name asked again is re-added only when its
// addresses have less than its TTL plus half the grace left.
//
// "For certain" is conservative (engine/bypass.go): rule mode only (global
// and direct can be switched in the dashboard); the sniffer off (it may
// replace a flow's name); the name neither in hosts (any entry, one that
// names another name too: mihomo decides its flows as that name) nor in
// fake-ip-filter (whose names keep their usual real answers and go through
// tpgw). The rules
// are walked in order, first with the name alone, so a name whose rule is a
// proxy is never resolved (fake-ip keeps proxied names away from the local
// resolver); then for each address twice: as mihomo sees a flow to the fake
// IP (the name, and the address only for rules that resolve) and with the
// address known to every rule (no-resolve rules too: an IP-CIDR or GEOIP rule
// sending the address to a proxy before the domain rule means no). A rule
// before the deciding one that reads anything else (port, source, process,
// network, inbound, DSCP, UID, sub-rules, AND/OR/NOT, classical rule sets,
// RULE-SET with src) means no. Only the built-in DIRECT counts: a group that
// selects DIRECT now may be switched at any time, and REJECT must keep
// rejecting. A literal PASS goes on to the next rule, as in mihomo. Every
// address of the answer must pass, or the answer is a fake IP; a name that
// has no address of the type gets the real empty answer. When an address
// rule comes first, an AAAA answer must also pass with the name's IPv4
// addresses: mihomo resolves a flow to a fake IP to an IPv4 address when
// the name has one, whichever family the client asked.
//
// Trade-offs, accepted by turning it on:
//
//   - Bypassed flows never reach mihomo: they are not in the dashboard's
//     connection list or statistics, not logged, and the upstream sees the
//     client's own address, as for tpgw.bypass (masquerading on the WAN, if
//     the network needs it, is the router's as usual; tpgw's DIRECT would
//     have used the gateway's address). mihomo options of DIRECT that the
//     kernel does not know (interface-name, routing-mark) do not apply.
//   - Bypassed flows are forwarded, so the host's forwarding firewall
//     applies to them: with a FORWARD policy of DROP (Docker sets it) they
//     are dropped unless a rule accepts them. netcfg warns at start and
//     names the rule (the connection's conntrack label); tpgw does not open
//     the host's forwarding itself.
//   - While an address is in the set, every LAN flow to it is forwarded by
//     the kernel, whatever the client meant: an IP-literal connection that
//     mihomo would send to a proxy (e.g. by MATCH) goes direct too.
//   - What may change the decisions empties the sets: SIGHUP (a reload that
//     fails too), a change of mode or sniffing or a rule toggle through the
//     API, a geodata update through the API, and, within about 4 s, new
//     contents of a rule provider or new geodata files (an update by
//     interval, a file provider edited, geo-auto-update). Clients keep the
//     real addresses they were given for up to their TTL (at most an hour):
//     until they ask again, their new connections go through tpgw as
//     IP-only flows, decided by IP rules (maybe a proxy, or REJECT).
//     Connections that started while their address was in the set stay in
//     the kernel until they end (conntrack label, see netcfg), like
//     established flows through tpgw keep their outbound across a reload.
//   - A client that keeps using a real address after its TTL and the grace
//     (some ignore TTLs) opens new connections through tpgw as IP-only
//     flows, decided by IP rules (maybe a proxy): they work, by another path.
//   - When an address rule comes first and direct-nameserver differs from
//     nameserver, rules and dialing would see addresses from different
//     resolvers: no bypass.
//   - nftables only (the config is refused with backend: iptables, and tpgw
//     refuses to start when auto picks iptables). Conntrack label 127 is
//     used, and labels are shared by the whole host.
//
// # Untrusted input
//
// Messages come from any LAN host. Anything that does not unpack is dropped
// without a reply and counted (Stats.Malformed); responses are never answered
// (no loops between servers); the work per message is bounded (5s per query,
// 1024 queries in flight, 256 TCP connections, 10s TCP idle timeout).
// FuzzHandleMessage exercises the message handling.
package dns
