package netcfg

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// Names and numbers that make everything netcfg installs identifiable from the
// kernel alone, so that Cleanup can remove it after a crash.
const (
	// TableName is the nftables table (family inet) holding all our sets and chains.
	TableName = "tpgw"
	// ChainName is the base chain hooked at prerouting, priority mangle.
	ChainName = "prerouting"
	// RulePriority is the priority (preference) of our ip rules, v4 and v6.
	// It sits before the main table (32766) and clear of the 0..1000 range
	// other tools tend to use.
	RulePriority = 9766
	// RouteProtocol is the rtm_protocol of our routes ("proto 102" in ip route);
	// unassigned in iproute2's rt_protos, so routes with it are ours.
	RouteProtocol = 0x66
)

// Family is an address family of the plan.
type Family uint8

// Address families.
const (
	IPv4 Family = 4
	IPv6 Family = 6
)

func (f Family) nftFamily() string { // "ip", "ip6": the payload / tproxy keyword
	if f == IPv6 {
		return "ip6"
	}
	return "ip"
}

func (f Family) nfproto() string { // meta nfproto value
	if f == IPv6 {
		return "ipv6"
	}
	return "ipv4"
}

func (f Family) addrType() string {
	if f == IPv6 {
		return "ipv6_addr"
	}
	return "ipv4_addr"
}

// Plan is everything netcfg puts into the kernel, computed from Options with no
// side effects. Backends translate it; String prints it.
type Plan struct {
	Options Options // validated and normalized
	Table   string  // nft table name, family inet
	Chain   string  // base chain, hook prerouting, priority mangle
	Sets    []Set   // named interval sets of addresses
	Rules   []Rule  // rules of Chain, in order
	IPRules []IPRule
	Routes  []Route
	Sysctls []Sysctl
}

// Set is a named nft set: an interval set of addresses of one family, or
// (Family 0) a set of interface names.
type Set struct {
	Name     string
	Family   Family      // IPv4 or IPv6 for address sets; 0 for an interface name set
	Elements []AddrRange // address sets: sorted, merged, no overlaps
	Names    []string    // interface name set: sorted
}

// IsIfNames reports whether s is a set of interface names.
func (s Set) IsIfNames() bool { return s.Family == 0 }

// Rule is one nft rule: every match must hold, then the action runs.
type Rule struct {
	Comment string // stored with the rule in the kernel
	Matches []Match
	Action  Action
}

// Match is one condition of a Rule. Implementations are the Match* types of this package.
type Match interface {
	String() string // nft syntax
	isMatch()
}

// MatchFamily holds for packets of one family (meta nfproto).
type MatchFamily struct{ Family Family }

// MatchIIfName compares the input interface name.
type MatchIIfName struct {
	Name   string
	Negate bool
}

// MatchIIfNameSet holds when the input interface name is in the named Set (or not, with Negate).
type MatchIIfNameSet struct {
	Set    string
	Negate bool
}

// MatchMark compares the packet mark.
type MatchMark struct {
	Mark   uint32
	Negate bool
}

// MatchCTReply holds for packets in the reply direction of a tracked connection.
type MatchCTReply struct{}

// MatchL4Proto holds when the transport protocol is one of Protos (IPPROTO_* numbers).
type MatchL4Proto struct{ Protos []uint8 }

// MatchDstPort compares the transport destination port (after a MatchL4Proto of tcp/udp).
type MatchDstPort struct{ Port uint16 }

// MatchAddr holds when the source or destination address is in Prefix.
type MatchAddr struct {
	Src    bool
	Prefix netip.Prefix
}

// MatchAddrSet holds when the source or destination address is in the named Set.
type MatchAddrSet struct {
	Family Family
	Src    bool
	Set    string
}

// MatchSocketTransparent holds when the packet belongs to a local socket with IP_TRANSPARENT.
type MatchSocketTransparent struct{}

// MatchLocalDst holds when the destination is an address of the gateway itself.
type MatchLocalDst struct{}

// IP protocol numbers used in matches.
const (
	ProtoTCP uint8 = 6
	ProtoUDP uint8 = 17
)

func (MatchFamily) isMatch()            {}
func (MatchIIfName) isMatch()           {}
func (MatchIIfNameSet) isMatch()        {}
func (MatchMark) isMatch()              {}
func (MatchCTReply) isMatch()           {}
func (MatchL4Proto) isMatch()           {}
func (MatchDstPort) isMatch()           {}
func (MatchAddr) isMatch()              {}
func (MatchAddrSet) isMatch()           {}
func (MatchSocketTransparent) isMatch() {}
func (MatchLocalDst) isMatch()          {}

func (m MatchFamily) String() string { return "meta nfproto " + m.Family.nfproto() }

func (m MatchIIfName) String() string {
	if m.Negate {
		return "iifname != " + strconv.Quote(m.Name)
	}
	return "iifname " + strconv.Quote(m.Name)
}

func (m MatchIIfNameSet) String() string {
	if m.Negate {
		return "iifname != @" + m.Set
	}
	return "iifname @" + m.Set
}

func (m MatchMark) String() string {
	if m.Negate {
		return fmt.Sprintf("meta mark != %#x", m.Mark)
	}
	return fmt.Sprintf("meta mark %#x", m.Mark)
}

func (MatchCTReply) String() string { return "ct direction reply" }

func protoName(p uint8) string {
	switch p {
	case ProtoTCP:
		return "tcp"
	case ProtoUDP:
		return "udp"
	}
	return strconv.Itoa(int(p))
}

func (m MatchL4Proto) String() string {
	names := make([]string, len(m.Protos))
	for i, p := range m.Protos {
		names[i] = protoName(p)
	}
	if len(names) == 1 {
		return "meta l4proto " + names[0]
	}
	return "meta l4proto { " + strings.Join(names, ", ") + " }"
}

func (m MatchDstPort) String() string { return fmt.Sprintf("th dport %d", m.Port) }

func dir(src bool) string {
	if src {
		return "saddr"
	}
	return "daddr"
}

// Family of the prefix.
func (m MatchAddr) Family() Family {
	if m.Prefix.Addr().Is4() {
		return IPv4
	}
	return IPv6
}

func (m MatchAddr) String() string {
	return m.Family().nftFamily() + " " + dir(m.Src) + " " + m.Prefix.String()
}

func (m MatchAddrSet) String() string {
	return m.Family.nftFamily() + " " + dir(m.Src) + " @" + m.Set
}

func (MatchSocketTransparent) String() string { return "socket transparent 1" }
func (MatchLocalDst) String() string          { return "fib daddr type local" }

// Verdict ends a rule.
type Verdict uint8

// Verdicts.
const (
	VerdictReturn Verdict = iota // leave our chain: the packet goes on untouched
	VerdictAccept                // stop netfilter evaluation at this hook
)

// TProxy sends the packet to a local transparent socket on Port without changing it.
type TProxy struct {
	Family Family
	Port   uint16
}

// Action is what a matching Rule does: optional tproxy, optional mark, then the verdict.
type Action struct {
	TProxy  *TProxy
	SetMark uint32 // 0 = leave the mark alone
	Verdict Verdict
}

func (a Action) String() string {
	var parts []string
	if a.TProxy != nil {
		parts = append(parts, fmt.Sprintf("tproxy %s to :%d", a.TProxy.Family.nftFamily(), a.TProxy.Port))
	}
	if a.SetMark != 0 {
		parts = append(parts, fmt.Sprintf("meta mark set %#x", a.SetMark))
	}
	if a.Verdict == VerdictAccept {
		parts = append(parts, "accept")
	} else {
		parts = append(parts, "return")
	}
	return strings.Join(parts, " ")
}

// String is the rule in nft syntax, with its comment.
func (r Rule) String() string {
	parts := make([]string, 0, len(r.Matches)+2)
	for _, m := range r.Matches {
		parts = append(parts, m.String())
	}
	parts = append(parts, r.Action.String())
	if r.Comment != "" {
		parts = append(parts, "comment "+strconv.Quote(r.Comment))
	}
	return strings.Join(parts, " ")
}

// IPRule is a policy routing rule: packets with Mark look up Table.
type IPRule struct {
	Family   Family
	Priority int
	Mark     uint32
	Table    int
}

func (r IPRule) String() string {
	return fmt.Sprintf("ip -%d rule add fwmark %#x lookup %d priority %d", r.Family, r.Mark, r.Table, r.Priority)
}

// Route is a "local" route via lo: every address is delivered locally, which is
// what lets a TPROXYed packet for a foreign address reach our socket.
type Route struct {
	Family   Family
	Dst      netip.Prefix
	Table    int
	Protocol uint8
}

func (r Route) String() string {
	return fmt.Sprintf("ip -%d route add local %s dev lo table %d proto %d", r.Family, r.Dst, r.Table, r.Protocol)
}

// Sysctl is a value written while tpgw runs; the old value is restored after.
type Sysctl struct {
	Key   string // dotted, e.g. net.ipv4.ip_forward
	Value string
}

// path is the file under /proc/sys; /proc/sys/net is per network namespace, of the calling thread.
func (s Sysctl) path() string { return "/proc/sys/" + strings.ReplaceAll(s.Key, ".", "/") }

func (s Sysctl) String() string { return "sysctl -w " + s.Key + "=" + s.Value }

// Reserved destinations never intercepted: local, private, link-local, multicast,
// benchmark and broadcast ranges. The documentation range 192.0.2.0/24 is in,
// but 198.51.100.0/24 and 203.0.113.0/24 are not: the test topology uses them as
// the internet, and no real network routes them. Likewise 2001:db8::/32 for v6.
var (
	reserved4 = mustPrefixes(
		"0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
		"172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16",
		"198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32",
	)
	reserved6 = mustPrefixes(
		"::/128", "::1/128", "::ffff:0:0/96", "64:ff9b::/96", "100::/64",
		"fc00::/7", "fe80::/10", "ff00::/8",
	)
)

func mustPrefixes(ss ...string) []netip.Prefix {
	ps := make([]netip.Prefix, len(ss))
	for i, s := range ss {
		ps[i] = netip.MustParsePrefix(s)
	}
	return ps
}

// ReservedBypass returns the built-in destination bypass list of one family.
func ReservedBypass(f Family) []netip.Prefix {
	if f == IPv6 {
		return append([]netip.Prefix(nil), reserved6...)
	}
	return append([]netip.Prefix(nil), reserved4...)
}

func splitFamilies(ps []netip.Prefix) (v4, v6 []netip.Prefix) {
	for _, p := range ps {
		if p.Addr().Is4() {
			v4 = append(v4, p)
		} else {
			v6 = append(v6, p)
		}
	}
	return v4, v6
}

// Set names.
const (
	setLANInterfaces = "lan_interfaces"
	setBypass4       = "bypass4"
	setBypass6       = "bypass6"
	setBypassSrc4    = "bypass_src4"
	setBypassSrc6    = "bypass_src6"
)

// BuildPlan validates o and computes the plan. It has no side effects.
func BuildPlan(o Options) (*Plan, error) {
	o, err := o.validate()
	if err != nil {
		return nil, err
	}
	p := &Plan{Options: o, Table: TableName, Chain: ChainName}
	families := []Family{IPv4}
	if o.IPv6 {
		families = append(families, IPv6)
	}
	tcpUDP := MatchL4Proto{Protos: []uint8{ProtoTCP, ProtoUDP}}
	tproxyTo := func(f Family, port uint16) Action {
		return Action{TProxy: &TProxy{Family: f, Port: port}, SetMark: o.Mark, Verdict: VerdictAccept}
	}
	add := func(comment string, a Action, ms ...Match) {
		p.Rules = append(p.Rules, Rule{Comment: comment, Matches: ms, Action: a})
	}
	ret := Action{Verdict: VerdictReturn}

	// Sets first: rules refer to them by name.
	if len(o.Interfaces) > 1 {
		p.Sets = append(p.Sets, Set{Name: setLANInterfaces, Names: o.Interfaces})
	}
	dst4, dst6 := splitFamilies(o.Bypass)
	src4, src6 := splitFamilies(o.BypassSrc)
	p.Sets = append(p.Sets, Set{Name: setBypass4, Family: IPv4, Elements: mergePrefixes(append(ReservedBypass(IPv4), dst4...))})
	if o.IPv6 {
		p.Sets = append(p.Sets, Set{Name: setBypass6, Family: IPv6, Elements: mergePrefixes(append(ReservedBypass(IPv6), dst6...))})
	}
	if len(src4) > 0 {
		p.Sets = append(p.Sets, Set{Name: setBypassSrc4, Family: IPv4, Elements: mergePrefixes(src4)})
	}
	if o.IPv6 && len(src6) > 0 {
		p.Sets = append(p.Sets, Set{Name: setBypassSrc6, Family: IPv6, Elements: mergePrefixes(src6)})
	}

	// 1. Which packets enter at all.
	switch len(o.Interfaces) {
	case 0:
		// lo carries the gateway's own traffic; only what was marked for us (proxy-self) goes on.
		add("loopback unless marked for tpgw", ret, MatchIIfName{Name: "lo"}, MatchMark{Mark: o.Mark, Negate: true})
	case 1:
		add("not a LAN interface", ret, MatchIIfName{Name: o.Interfaces[0], Negate: true})
	default:
		add("not a LAN interface", ret, MatchIIfNameSet{Set: setLANInterfaces, Negate: true})
	}
	// 2. The engine's own outbound sockets: intercepting them would loop.
	if o.RoutingMark != 0 {
		add("engine's own traffic (routing-mark)", ret, MatchMark{Mark: o.RoutingMark})
	}
	// 3. Replies of connections that were not ours, e.g. DNATed inbound (published
	// container ports): they must go back the way the kernel set up.
	add("reply of a tracked connection", ret, MatchCTReply{})
	// 4. DNS before the bypass, so queries to a LAN resolver get fake IPs too.
	if o.DNSPort != 0 {
		for _, f := range families {
			add("DNS hijack", tproxyTo(f, o.DNSPort), MatchFamily{Family: f}, tcpUDP, MatchDstPort{Port: 53})
		}
	}
	// 5. Fake IPs before the bypass: 198.18.0.0/15 is in the reserved list.
	if o.FakeIPRange.IsValid() {
		add("fake-ip range", tproxyTo(IPv4, o.TProxyPort), MatchAddr{Prefix: o.FakeIPRange}, tcpUDP)
	}
	if o.IPv6 && o.FakeIPRange6.IsValid() {
		add("fake-ip range", tproxyTo(IPv6, o.TProxyPort), MatchAddr{Prefix: o.FakeIPRange6}, tcpUDP)
	}
	// 6. Traffic to the gateway's own addresses (its web UI, SSH, its public WAN
	// address) is delivered locally, not proxied back to itself.
	add("to the gateway itself", ret, MatchLocalDst{})
	// 7. Bypass by destination, then by source.
	for _, s := range p.Sets {
		switch s.Name {
		case setBypass4, setBypass6:
			add("bypassed destination", ret, MatchAddrSet{Family: s.Family, Set: s.Name})
		case setBypassSrc4, setBypassSrc6:
			add("bypassed source", ret, MatchAddrSet{Family: s.Family, Src: true, Set: s.Name})
		}
	}
	// 8. Packets of connections our transparent sockets already own skip the tproxy lookup.
	socketRule := []Match{MatchL4Proto{Protos: []uint8{ProtoTCP}}, MatchSocketTransparent{}}
	if !o.IPv6 {
		socketRule = append([]Match{MatchFamily{Family: IPv4}}, socketRule...)
	}
	add("established transparent socket", Action{SetMark: o.Mark, Verdict: VerdictAccept}, socketRule...)
	// 9. Everything else TCP/UDP goes to the TPROXY listener. If nothing listens,
	// nft's tproxy falls through and the packet is routed as usual (on-failure: open).
	for _, f := range families {
		add("transparent proxy", tproxyTo(f, o.TProxyPort), MatchFamily{Family: f}, tcpUDP)
	}

	for _, f := range families {
		dst := netip.MustParsePrefix("0.0.0.0/0")
		if f == IPv6 {
			dst = netip.MustParsePrefix("::/0")
		}
		p.IPRules = append(p.IPRules, IPRule{Family: f, Priority: RulePriority, Mark: o.Mark, Table: o.Table})
		p.Routes = append(p.Routes, Route{Family: f, Dst: dst, Table: o.Table, Protocol: RouteProtocol})
	}

	if o.Forward {
		p.Sysctls = append(p.Sysctls, Sysctl{Key: "net.ipv4.ip_forward", Value: "1"})
		if o.IPv6 {
			p.Sysctls = append(p.Sysctls, Sysctl{Key: "net.ipv6.conf.all.forwarding", Value: "1"})
		}
	}
	return p, nil
}

// NftRuleset is the nftables part of the plan in `nft -f` syntax.
func (p *Plan) NftRuleset() string {
	var b strings.Builder
	fmt.Fprintf(&b, "table inet %s {\n", p.Table)
	for _, s := range p.Sets {
		if s.IsIfNames() {
			quoted := make([]string, len(s.Names))
			for i, n := range s.Names {
				quoted[i] = strconv.Quote(n)
			}
			fmt.Fprintf(&b, "\tset %s {\n\t\ttype ifname\n\t\telements = { %s }\n\t}\n\n", s.Name, strings.Join(quoted, ", "))
			continue
		}
		fmt.Fprintf(&b, "\tset %s {\n\t\ttype %s\n\t\tflags interval\n", s.Name, s.Family.addrType())
		if len(s.Elements) > 0 {
			b.WriteString("\t\telements = {")
			for i, e := range s.Elements {
				if i > 0 {
					b.WriteString(",")
				}
				b.WriteString("\n\t\t\t" + e.String())
			}
			b.WriteString("\n\t\t}\n")
		}
		b.WriteString("\t}\n\n")
	}
	fmt.Fprintf(&b, "\tchain %s {\n\t\ttype filter hook prerouting priority mangle; policy accept;\n", p.Chain)
	for _, r := range p.Rules {
		b.WriteString("\t\t" + r.String() + "\n")
	}
	b.WriteString("\t}\n}\n")
	return b.String()
}

// String is the whole plan: the nft ruleset, then ip rules and routes, then
// sysctls. Deterministic; `tpgw rules` prints it.
func (p *Plan) String() string {
	var b strings.Builder
	b.WriteString("# nftables (nft -f)\n")
	b.WriteString(p.NftRuleset())
	b.WriteString("\n# policy routing: packets marked by tproxy are delivered locally\n")
	for _, r := range p.IPRules {
		b.WriteString(r.String() + "\n")
	}
	for _, r := range p.Routes {
		b.WriteString(r.String() + "\n")
	}
	if len(p.Sysctls) > 0 {
		b.WriteString("\n# sysctl (old values restored on exit)\n")
		for _, s := range p.Sysctls {
			b.WriteString(s.String() + "\n")
		}
	}
	return b.String()
}
