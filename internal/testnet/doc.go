// Package testnet builds the throwaway network-namespace topology that the
// end-to-end tests of tpgw run in, and the peers that live inside it.
//
//	client ns          gateway ns (tpgw)                     upstream ns                           proxy ns
//	eth0 ──────────────lan0               wan0 ──────────────eth0               prx0 ──────────────eth0
//	192.168.77.2/24    192.168.77.1/24    203.0.113.1/24     203.0.113.2/24     198.51.100.1/24    198.51.100.2/24
//	fd77::2/64         fd77::1/64         2001:db8:1::1/64   2001:db8:1::2/64   2001:db8:2::1/64   2001:db8:2::2/64
//
//	routes: client default via 192.168.77.1 / fd77::1; gateway default via 203.0.113.2 / 2001:db8:1::2;
//	upstream 192.168.77.0/24 via 203.0.113.1, fd77::/64 via 2001:db8:1::1, forwarding on;
//	proxy default via 198.51.100.1 / 2001:db8:2::1.
//
// The upstream namespace is the router of the "internet": it forwards between
// the gateway and the proxy, so the proxy → upstream path never depends on the
// gateway's ip_forward, which starts at 0 (a fresh namespace's default) so that
// tests can check tpgw sets and restores it. The address the upstream's HTTP
// server reports tells the path a request took: the client's own address means
// kernel-forwarded (bypassed), the gateway's WAN address means DIRECT via tpgw,
// the proxy's address means via the proxy.
//
// Nothing is linked to the host's interfaces: every veth is created with both
// ends directly inside the namespaces, over netlink. Processes started through
// the helper and the namespaces themselves are removed in t.Cleanup, by PID and
// by name, never by pattern.
package testnet
