// Package netcfg installs and removes the kernel side of the TPROXY gateway:
// an nftables table, policy routing (ip rule + local route) and sysctls.
//
// # Place in the packet path
//
// netcfg owns the first step of the path in design.md. A packet from the LAN
// enters the chain "prerouting" of table inet tpgw (hook prerouting, priority
// mangle, after conntrack). In order:
//
//  1. packets not from a LAN interface (or, with no interfaces given, from lo
//     without our mark) return untouched;
//  2. packets carrying the engine's routing-mark (its own outbound sockets) return;
//  3. replies of connections already tracked (e.g. DNATed inbound connections to
//     published container ports) return;
//  4. DNS (tcp/udp port 53) is sent with tproxy to the fake-ip DNS port;
//  5. the fake-ip range is sent to the TPROXY port (before the bypass: it lies in 198.18.0.0/15);
//  6. destinations in @bypass4/@bypass6 (reserved ranges plus Options.Bypass) and
//     sources in @bypass_src4/@bypass_src6 return;
//  7. packets of connections a transparent socket already owns get the mark;
//  8. all other TCP and UDP is sent with tproxy to the TPROXY port.
//
// tproxy assigns the packet to our listening socket without rewriting it; the
// rule then sets the fwmark, the ip rule "fwmark Mark lookup Table" sends the
// packet to a table whose only route is "local default dev lo", so the kernel
// delivers it locally (to the socket) instead of forwarding it. The relay
// package then reads the original destination from the accepted socket.
//
// # On failure: open
//
// nft's tproxy expression ends the rule (NFT_BREAK) when no socket listens on
// the port: the mark is not set, the next rules run and the packet is routed
// as if tpgw were not there. So if tpgw dies without removing its rules, LAN
// traffic (DNS included, since the DNS hijack uses tproxy too) flows directly.
// iptables' TPROXY target drops the packet instead, which is why an iptables
// backend would need its own mechanism for on-failure: open.
//
// # Plan, then apply
//
// BuildPlan turns Options into a Plan with no side effects; Plan.String prints
// it as `nft -f` text followed by the equivalent ip and sysctl commands (what
// `tpgw rules` shows, golden-tested). A Backend applies it: NewNftables speaks
// netlink (google/nftables, vishvananda/netlink), never the nft or ip binaries.
//
//	p, err := netcfg.BuildPlan(opts)
//	inst, err := netcfg.NewNftables(log).Apply(p, stateDir)
//	defer inst.Remove()
//
// Apply(p, stateDir) first runs Cleanup, then installs, in this order: the
// whole nft table in one netlink batch (the kernel applies it all or nothing),
// the ip rules, the routes, the sysctls. If a step fails, the earlier ones are
// undone and the error names the step. Installed.Remove undoes it in reverse
// order and tolerates things already gone.
//
// stateDir is a directory where Apply records, in netcfg-sysctl.json, the old
// values of the sysctls it changes, before changing them; Remove restores them
// and deletes the file. "" keeps no record (then a crash cannot restore them).
//
// # Finding our things after a crash
//
// Everything installed is identifiable from the kernel alone, so Cleanup (run
// by Apply, and by `tpgw cleanup`) works after kill -9 without any state:
//
//   - the nft table inet tpgw (TableName), deleted with everything in it;
//   - ip rules (v4 and v6) at priority 9766 (RulePriority);
//   - routes in any table with protocol 102 (RouteProtocol, "proto 102" in ip route).
//
// Only the old sysctl values cannot be read back from the kernel: Cleanup
// restores them from the record in stateDir when it is there. Note that
// net.ipv6.conf.all.forwarding also sets every interface's forwarding; the
// old value of "all" is restored, not each interface's.
//
// # Network namespaces
//
// Every call acts on the network namespace of the calling OS thread
// (netlink sockets are opened, and /proc/sys/net is resolved, by that thread).
// A caller working in another namespace locks its goroutine to a thread that
// has entered it, as the tests do.
package netcfg
