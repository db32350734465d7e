// Package engine embeds mihomo (the clash-meta core) as a library: rules, proxy
// groups and outbound proxies.
//
// It is the only package of tpgw that imports mihomo. It starts mihomo from the
// mihomo part of the config with mihomo's own tproxy inbound, DNS listener and
// iptables helper turned off (tpgw's relay, dns and netcfg replace them), and
// offers the relay a way to hand it a flow that the kernel TPROXYed: the flow's
// source, original destination and inbound name become mihomo metadata, so the
// fake-ip table, rules, proxy groups, outbounds and connection statistics
// (external-controller dashboards) apply as they would to mihomo's own inbound.
//
// # TCP flows
//
// A TPROXYed TCP flow takes mihomo's decisions step by step (flow.go): fake
// IPs mapped back to names, the rule match, the dial with mihomo's retries,
// the connection's entry in mihomo's statistics. These are mihomo's own
// functions, reached by name (go:linkname; TestMihomoInternals pins what they
// do). What differs is the relay of a flow whose two ends are plain kernel
// sockets (DIRECT): mihomo's relay holds two goroutines per flow for its
// whole life, about 12 KiB of stacks that an idle connection pays for
// nothing. tpgw pumps each direction with a short-lived goroutine instead,
// parks a direction that has nothing to read when the flow starts, or that
// is quiet for half a second, in one epoll set, and
// splices a direction that turns bulk (park.go, splice.go).
// An idle DIRECT flow then holds two descriptors and about 3.5 KiB of heap.
// Flows through other outbounds (shadowsocks, vmess, ...), and every flow
// while mihomo's sniffer is on, go through mihomo's relay, wrapped so that
// they splice only once bulk (tcpconn.go). What that relay reads from the
// client and writes to it, and what shadowsocks, vmess, trojan, socks5 and
// http outbounds read and write on their sockets, are raw system calls (rawsock.go): Go's
// own calls around long socket writes kept its monitor thread waking every
// 20 µs, a tenth of the process's CPU on the shadowsocks path.
//
// # How a flow ends
//
// Each direction's EOF is passed on as a FIN (half-close). A flow tpgw
// relays itself that is cut at one end (a reset, a failed read or write)
// ends with a reset at the other once the bytes queued for that end are
// delivered, as through a router; a flow mihomo's relay copies (other
// outbounds, the sniffer) does so at the client's side. A stop resets every
// flow (AbortFlows, the relay listener's Abort), and the client's socket of
// every flow, and the server's of one tpgw relays itself, is armed to reset
// while the flow runs, so that the kernel's close of a dead gateway's
// sockets resets them too (tcpconn.go).
//
// # Why splice and not a sockmap
//
// A BPF sockmap relay (an sk_skb verdict program that redirects each
// received skb to the peer socket's egress, bpf_sk_redirect_hash keyed by
// socket cookie) keeps bulk data out of the process entirely. It was tried
// as a prototype relay on kernel 6.18, between veth namespaces like the
// bench's, with iperf3 for 4 s: 5.4–5.9 Gbit/s, against 15.2 for a plain
// splice relay and 18.5 for kernel forwarding; whole-machine CPU per GB
// 1.8–1.9 s, against 0.90 for splice and 0.57 for forwarding. The process's
// own CPU per GB fell to 0.11–0.13 s only because the work moved to the
// kernel's sockmap backlog worker (kworker), which sends one skb at a time.
// It would also need a kick for bytes that queued before the sockets joined
// the map (setsockopt SO_RCVLOWAT calls the socket's data_ready) and its own
// byte counting for mihomo's statistics. Splice stays. Splitting each
// direction in two (one goroutine splicing socket → pipe, another pipe →
// socket, so that receive and send overlap on two cores) did not help
// either: 13.3–15.2 Gbit/s against 13.1–16.2 for the plain splice loop,
// at the same whole-machine CPU.
//
// # What else tpgw changes in mihomo
//
// mihomo's external-controller runs in mihomo's embed mode, with the
// requests dashboards need added back by tpgw and the ones that would undo
// tpgw refused (controller.go). The persisted fake-ip pool's position is
// saved while it moves and recovered after a crash, and handed from the old
// pool to the new one on a reload, so that no fake IP goes to a second name
// while clients may hold it (fakeip.go). A persisted pool keeps its
// mappings in memory, and tpgw writes the new ones, those that come in
// together in one write, to a journal beside cache.db before their answers
// leave, and folds the journal into cache.db when new names pause, in key
// order (fakeipstore.go, fakeipjournal.go): mihomo wrote each one to cache.db
// under the pool's lock, so a burst of new names was answered one disk
// write at a time. A dashboard's "flush fake-ip" empties each pool under
// the pool's lock, which mihomo's flush does not take (controller.go). A
// TPROXYed datagram whose mihomo worker queue is full waits for room, up to
// 10 ms, instead of being dropped at once (udpqueue.go), and so does one
// whose session's sender queue in mihomo is full while that session is
// being sent on, which tpgw tells from the datagrams mihomo reads and
// releases (udpgate.go).
//
// Under the race detector three races remain, all mihomo's own and benign
// in practice:
// its log level is a plain variable that ApplyConfig sets while its
// goroutines log, a reload replaces the resolver's package variables
// (updateDNS) while the tunnel reads them, and the mode a dashboard sets
// (PATCH /configs, tunnel.SetMode) is a plain variable the tunnel reads
// for every flow. The first is also met by the finalizer mihomo closes an
// unused proxy from, which logs; the engine's tests run those finalizers and
// order them before each reload they make (finalizers_test.go).
//
// mihomo keeps its state in package variables, so a process runs one Engine.
package engine
