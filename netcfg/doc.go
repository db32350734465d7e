// Package netcfg installs and removes the kernel side of the TPROXY gateway:
// packet filter rules (nftables or iptables), policy routing (ip rule + local
// route) and sysctls.
//
// # Place in the packet path
//
// netcfg owns the first step of the path in design.md. BuildPlan computes one
// Plan, the same for both backends, made of these chains (nftables: table inet
// tpgw; iptables: the user chains in brackets, v4 and, with IPv6, v6):
//
// prerouting [mangle TPGW, jumped from PREROUTING] (hook prerouting, priority
// mangle) picks the packets that may be intercepted:
//
//  1. lo without our mark returns (lo carries the gateway's own traffic);
//  2. packets carrying the engine's routing-mark (its own sockets) return;
//  3. replies of tracked connections (e.g. DNATed inbound connections to
//     published container ports) return;
//  4. lo packets with our mark (proxy-self) jump to divert;
//  5. LAN packets jump to divert: those from Options.Interfaces, or, with no
//     interfaces given, those whose source is a LAN source (10/8, 172.16/12,
//     192.168/16, 100.64/10, 169.254/16, fc00::/7, fe80::/10 and
//     Options.LANSources). Anything else, e.g. from a WAN interface, is
//     never intercepted: tpgw is not an open proxy.
//
// divert [mangle TPGW_DIVERT] sends them to tpgw:
//
//  1. DNS (tcp/udp port 53) goes with tproxy to the fake-ip DNS port;
//  2. the fake-ip range goes to the TPROXY port (before the bypass: it lies in 198.18.0.0/15);
//     a ping (ICMP echo request) to it gets the mark, so the ip rule
//     delivers it to the gateway, which answers for the name (IPv6: the
//     kernel; IPv4: relay.PingResponder, since the kernel does not reply
//     from an address that is not the gateway's); divert_out does the same
//     for the gateway's own pings;
//  3. destinations of the gateway itself, then @bypass4/@bypass6 (reserved
//     ranges plus Options.Bypass), then sources in @bypass_src4/6 return;
//     with Options.DNSBypass, new connections to destinations in
//     @dns_bypass4/6 return too and get conntrack label 127 (prerouting
//     returns labelled connections at its first rule);
//  4. packets of connections a transparent socket already owns get the mark;
//  5. all other TCP and UDP goes with tproxy to the TPROXY port;
//  6. with on-failure: closed, drop rules follow 1, 2 and 5 (see below).
//
// output [mangle TPGW_OUT, jumped from OUTPUT] (type route, hook output,
// priority mangle) and divert_out [mangle TPGW_DIVERT_OUT] exist with
// Options.ProxySelf: the gateway's own TCP/UDP gets the mark unless it carries
// the routing-mark, is a reply, goes to a local address (127/8, ::1, its own
// addresses) or to a bypassed destination; its DNS and the fake-ip range are
// marked even when the destination is bypassed. A mark set in OUTPUT makes the
// kernel route the packet again: the ip rule sends it to lo, where it enters
// prerouting with the mark and is intercepted (rules 1 and 4).
//
// input [filter TPGW_IN, jumped from INPUT] (hook input, priority filter)
// guards the listeners: TCP/UDP to the TPROXY port is dropped unless it was
// diverted by us (it carries the mark) or comes from lo; TCP/UDP to the DNS
// port is dropped unless diverted, from lo, or from the LAN (as in
// prerouting 5), so LAN clients may still query it directly. A tproxied
// packet keeps its original destination port, so it only meets these rules
// when someone really connects to the port itself. Diverted packets are
// accepted, ahead of a host firewall that denies incoming connections in
// iptables' INPUT (ufw): with the nftables backend through an opening in
// that chain, since one nft table cannot overrule another; an nftables
// chain of the host with policy drop gets a warning naming the rule to add
// (hostinput.go).
//
// no_redirects [filter TPGW_NO_REDIRECTS, jumped from OUTPUT] (hook output,
// priority filter) drops the ICMP and ICMPv6 redirects the gateway would
// send. On a side router (one LAN with the main router) every flow it
// forwards (bypassed, dns-bypass, on-failure: open while tpgw is down)
// leaves by the interface it came in on, and the redirect would tell the
// client to use the main router for that address from then on, for
// minutes: its later flows there would skip tpgw, after a reload or a
// restart too. The chain stays after a crash until the next start or
// cleanup, so redirects stay off while tpgw is down.
//
// tproxy assigns the packet to our listening socket without rewriting it and
// sets the fwmark; the ip rule "fwmark Mark lookup Table" sends the packet to
// a table whose only route is "local default dev lo", so the kernel delivers it
// locally (to the socket) instead of forwarding it. The relay package then
// reads the original destination from the accepted socket.
//
// # Bridges with br_netfilter (Docker hosts)
//
// With br_netfilter and net.bridge.bridge-nf-call-iptables=1, an IPv4 packet
// entering a bridge port (a container's veth on docker0) runs prerouting once,
// at the bridge layer (iif is the bridge; iptables' physdev --physdev-is-in
// matches). There is no second pass at the IP layer: when the bridge passes
// the packet up, ip_rcv_core orphans it, dropping the socket tproxy assigned,
// and ip_sabotage_in skips the prerouting hooks. The mark survives, so the
// packet is delivered locally to a port nobody listens on and the connection
// hangs (measured on 6.18, both backends; IPv6 likewise with
// bridge-nf-call-ip6tables). nft has no way to tell that pass apart in the
// inet family (meta ibrname is bridge-family only), and nothing later can
// assign a socket. So the plan sets both sysctls to 0 while tpgw runs (only
// where br_netfilter is loaded; the old values are restored like ip_forward):
// bridged packets then reach IP on the bridge device and are intercepted at
// the normal prerouting pass. Routed traffic (containers to the internet,
// DNATed published ports, whose replies return on "ct direction reply") needs
// no br_netfilter; what is no longer filtered while tpgw runs is traffic
// bridged between two ports of one bridge. See bridge.go.
//
// # On failure (Options.OnFailure)
//
// nft's tproxy expression ends the rule (NFT_BREAK) when no socket listens on
// the port: the mark is not set, the next rules run and the packet is routed
// as if tpgw were not there. iptables' TPROXY target drops the packet instead.
//
//   - nftables, open: if tpgw dies without removing its rules, LAN traffic
//     (DNS included, since the DNS hijack uses tproxy too) flows directly.
//   - nftables, closed: drop rules after the DNS, fake-ip and final tproxy
//     rules drop what tproxy let through. Bypassed traffic returned earlier
//     and is not affected.
//   - iptables, closed: TPROXY itself drops when nothing listens (the drop
//     rules of the plan are installed too, and never reached).
//   - iptables, open: TPROXY drops when nothing listens, so a dead tpgw would
//     black-hole the LAN. The mechanism: every diverting rule lives in the
//     divert chains, reached only through jump rules. RemoveDivert deletes
//     those jumps (iptables: "-j TPGW_DIVERT" in TPGW and "-j TPGW_DIVERT_OUT"
//     in TPGW_OUT, v4 and v6; nftables: "jump divert" and "jump divert_out"),
//     after which LAN traffic is forwarded directly and the gateway's own
//     traffic leaves directly; the input guard stays. A watchdog process
//     that sees tpgw die (for instance its parent, or a systemd ExecStopPost)
//     calls netcfg.RemoveDivert(log) in tpgw's network namespace; Cleanup
//     (tpgw cleanup, or the next start) removes the rest. RemoveDivert works
//     with both backends, so the watchdog need not know which one ran, and
//     it turns a closed policy open too, so only call it for open.
//
// # DNS-driven bypass (Options.DNSBypass, nftables only)
//
// The plan adds two sets, dns_bypass4 and dns_bypass6 (flags timeout, empty
// in the plan); in divert (and divert_out) after the bypass returns, "ct
// state new ip daddr @dns_bypass4 ct label set 127 return" (and ip6); and "ct label 127
// return" as the first rule of prerouting (in divert_out for the gateway's
// own connections), so that the later packets of a bypassed connection meet
// one rule (only connections that were neither DNS, nor to a fake IP, nor to
// the gateway itself can carry the label). The fake-ip DNS server adds the real addresses of names
// that are DIRECT for certain through Installed.DNSBypassSet, each with its
// own timeout (see package dns); flows to them are then forwarded by the
// kernel. The label keeps a connection in the kernel when its address
// expires from the set mid-flow: without it the next packet would meet the
// tproxy rule, and a TCP segment that is not a SYN delivered to the
// listener is answered with a reset. "ct state new" is the converse: a
// connection tpgw already relays when its address joins the set (another
// name resolves to it) stays with tpgw; forwarded mid-flow, its next
// segment would reach a server that never saw its SYN and be reset. For
// the gateway's own connections (proxy-self) that is what happened (e2e's
// TestDNSBypassProxySelfOpenConnection); for the LAN's, TCP's early demux
// hid it while on (it hands the segment to the relay's socket before
// routing), not with net.ipv4.tcp_early_demux=0 (TestDNSBypass). The sets
// live in table inet tpgw, so Remove and Cleanup delete them with the table, and Update (a reload)
// starts them empty. The iptables backend refuses such a plan
// (ErrDNSBypassIPTables): it would need ipsets with timeouts and connlabel
// matches. Plan.Explain assumes an address is not in the sets.
//
// # Plan, then apply
//
// BuildPlan turns Options into a Plan with no side effects; Plan.String
// prints it as `nft -f` text followed by the equivalent ip and sysctl
// commands, Plan.Render("iptables") as the iptables/ip6tables commands (what
// `tpgw rules` shows, golden-tested). A Backend applies it: NewNftables speaks
// netlink (google/nftables, vishvananda/netlink), never the nft or ip
// binaries; NewIPTables runs the system's iptables and ip6tables (nft or
// legacy) through coreos/go-iptables, the only way to drive xtables.
// ChooseBackend picks one from the config value, probing nftables (a
// throwaway table with a tproxy rule, added and deleted in one batch) for
// "auto".
//
//	p, err := netcfg.BuildPlan(opts)
//	b, why, err := netcfg.ChooseBackend("auto", log)
//	inst, err := b.Apply(p, stateDir)
//	defer inst.Remove()
//
// Apply(p, stateDir) first runs Cleanup, then installs, in this order: the
// packet filter, the ip rules, the routes, the sysctls. With nftables the
// whole table goes in one netlink batch, which the kernel applies all or
// nothing. With iptables every chain is created and filled first and the
// jumps from the built-in chains (PREROUTING, OUTPUT, INPUT) are inserted
// last, input guard first and PREROUTING last, so no packet meets a
// half-built chain. If a step fails, the earlier ones are undone and the
// error names the step. Installed.Remove undoes it in reverse order and
// tolerates things already gone.
//
// Installed.Update(p) replaces the rules for a reload: nftables deletes the
// old table and adds the new one in one netlink transaction; iptables builds
// the new chains as TPGW*_NEW, inserts the new jumps, deletes the old jumps
// and chains, and renames the new chains. Relay sockets are untouched, so
// established flows go on. ip rules, routes and sysctls change only when the
// new plan changes them.
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
//   - iptables and ip6tables chains named TPGW* in the mangle and filter
//     tables, flushed and deleted, and every rule jumping to them, found by
//     listing the built-in chains. Cleanup removes these whichever backend
//     ran, and skips them when there is no iptables command;
//   - ip rules (v4 and v6) at priority 9766 (RulePriority);
//   - routes in any table with protocol 102 (RouteProtocol, "proto 102" in ip route).
//
// Only the old sysctl values cannot be read back from the kernel: Cleanup
// restores them from the record in stateDir when it is there. Note that
// net.ipv6.conf.all.forwarding also sets every interface's forwarding; the
// old value of "all" is restored, not each interface's.
//
// # When something else removes them (verify.go)
//
// Installed.Verify compares a fingerprint of our table (each chain with its
// hook and rule count) or of our iptables chains and jumps (from
// iptables-save) with the one taken at Apply and Update, and counts our ip
// rules and routes, and, with nftables, whether an opening in the host's
// iptables INPUT is as installed. What is missing (after `nft flush
// ruleset`, a flushed chain, an ip rule deleted by a network manager) is put
// back as Update puts a plan in. tpgw runs it every 2 s (iptables: 5 s).
//
// # Network namespaces
//
// Every call acts on the network namespace of the calling OS thread
// (netlink sockets are opened, and /proc/sys/net is resolved, by that thread).
// A caller working in another namespace locks its goroutine to a thread that
// has entered it, as the tests do.
package netcfg
