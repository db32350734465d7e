package netcfg

// Bridged LAN ports with br_netfilter (every Docker host).
//
// With br_netfilter loaded and net.bridge.bridge-nf-call-iptables=1, an IPv4
// frame that enters a bridge port runs the ip/inet prerouting hooks at the
// bridge layer (br_nf_pre_routing; iif is the bridge, iptables' physdev
// --physdev-is-in matches). When the frame is then passed up to IP on the
// bridge device, ip_rcv_core orphans the skb, which drops the socket tproxy
// assigned, and ip_sabotage_in skips the prerouting hooks of that second pass
// ("don't hand locally destined packets to PRE_ROUTING for the second time",
// net/bridge/br_netfilter_hooks.c). The tproxy mark survives, so the packet is
// routed to lo and delivered to the original destination port, where nothing
// listens: the connection hangs. There is no later hook where tproxy could run
// (nft's tproxy is prerouting only, and nft cannot tell the bridge-layer pass
// apart in the inet family: meta ibrname is bridge-family only). The per-bridge
// option nf_call_iptables cannot turn the global setting off. IPv6 takes the
// same path with bridge-nf-call-ip6tables.
//
// So while tpgw runs it turns the two sysctls off (per network namespace,
// restored on exit like ip_forward), and bridged ports are intercepted at the
// normal prerouting pass of the bridge device. Routed traffic of the bridge,
// e.g. containers to the internet and DNATed published ports, does not need
// br_netfilter; what stops being filtered is frames bridged between two ports
// of one bridge (Docker's icc=false, and the hairpin DNAT from a container to
// a port published by a container of the same bridge with userland-proxy off).
// The sysctls exist only where br_netfilter is loaded; elsewhere they are
// skipped.
const (
	sysctlBridgeNFCallIPTables  = "net.bridge.bridge-nf-call-iptables"
	sysctlBridgeNFCallIP6Tables = "net.bridge.bridge-nf-call-ip6tables"
)

// bridgeNetfilterSysctls are the plan's sysctls that keep br_netfilter from
// running prerouting at the bridge layer, for the families the plan intercepts.
func bridgeNetfilterSysctls(o Options) []Sysctl {
	out := []Sysctl{{Key: sysctlBridgeNFCallIPTables, Value: "0", IfPresent: true}}
	if o.IPv6 {
		out = append(out, Sysctl{Key: sysctlBridgeNFCallIP6Tables, Value: "0", IfPresent: true})
	}
	return out
}
