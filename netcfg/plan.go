package netcfg

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// Names and numbers that make everything netcfg installs identifiable from the
// kernel alone, so that Cleanup can remove it after a crash.
const (
	// TableName is the nftables table (family inet) holding all our sets and chains.
	TableName = "tpgw"
	// ChainName is the base chain hooked at prerouting, priority mangle: it
	// picks the packets that may be intercepted and jumps to ChainDivert.
	ChainName = "prerouting"
	// ChainDivert holds the rules that send LAN packets to tpgw (tproxy, and
	// the returns for bypassed destinations). RemoveDivert deletes the jumps
	// into it, which stops all interception at once.
	ChainDivert = "divert"
	// ChainOutput (hook output, type route, priority mangle) picks the
	// gateway's own packets for proxy-self and jumps to ChainDivertOut.
	ChainOutput = "output"
	// ChainDivertOut marks the gateway's own packets so that they are routed
	// to lo and re-enter ChainName there.
	ChainDivertOut = "divert_out"
	// ChainInput (hook input, priority filter) keeps the TPROXY and DNS ports
	// from being reached directly from outside.
	ChainInput = "input"
	// ChainNoRedirects (hook output, priority filter) keeps the gateway
	// from sending ICMP redirects.
	ChainNoRedirects = "no_redirects"
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
	Sets    []Set   // named interval sets of addresses
	Chains  []Chain // base chains and the regular chains they jump to
	IPRules []IPRule
	Routes  []Route
	Sysctls []Sysctl
}

// Hook is where a base chain is attached; "" for a regular chain, reached only by jumps.
type Hook string

// Hooks used by the plan.
const (
	HookPrerouting Hook = "prerouting"
	HookInput      Hook = "input"
	HookOutput     Hook = "output"
)

// Chain is one chain of the table, with its rules in order.
type Chain struct {
	Name     string
	Hook     Hook   // "" = regular chain
	Type     string // base chains: "filter", or "route" (re-routes packets whose mark changed)
	Priority string // base chains: "mangle" (-150) or "filter" (0)
	Rules    []Rule
}

// IsBase reports whether c is attached to a hook.
func (c Chain) IsBase() bool { return c.Hook != "" }

// Chain returns the chain named name, or nil.
func (p *Plan) Chain(name string) *Chain {
	for i := range p.Chains {
		if p.Chains[i].Name == name {
			return &p.Chains[i]
		}
	}
	return nil
}

// Set is a named nft set: an interval set of addresses of one family, or
// (Family 0) a set of interface names, or (Timeout) a set of single
// addresses with timeouts that is empty in the plan and filled at run time.
type Set struct {
	Name     string
	Family   Family      // IPv4 or IPv6 for address sets; 0 for an interface name set
	Elements []AddrRange // address sets: sorted, merged, no overlaps
	Names    []string    // interface name set: sorted
	// Timeout marks a dynamic set (flags timeout): its elements are added
	// while tpgw runs (dns-bypass) and expire on their own.
	Timeout bool
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

// MatchCTStateNew holds for packets of a connection that has not seen a
// reply yet ("ct state new"): a TCP handshake's SYN, the datagrams of a UDP
// flow before the first answer.
type MatchCTStateNew struct{}

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

// MatchCTLabel holds when the packet's connection carries conntrack label Bit.
type MatchCTLabel struct{ Bit uint8 }

// MatchLocalDst holds when the destination is an address of the gateway itself.
type MatchLocalDst struct{}

// MatchForeignSrc holds when the source is not an address of the gateway:
// a packet the gateway sends from another address (tpgw's UDP replies, from
// the flow's original destination).
type MatchForeignSrc struct{}

// MatchICMPType holds for ICMP (IPv4) or ICMPv6 messages of one type; the
// rule also matches the family and protocol before it.
type MatchICMPType struct {
	Family Family
	Type   uint8
}

// IP protocol numbers used in matches.
const (
	ProtoTCP uint8 = 6
	ProtoUDP uint8 = 17
	// ProtoICMP and ProtoICMPv6 are the ICMP protocol numbers.
	ProtoICMP   uint8 = 1
	ProtoICMPv6 uint8 = 58
)

func (MatchFamily) isMatch()            {}
func (MatchIIfName) isMatch()           {}
func (MatchIIfNameSet) isMatch()        {}
func (MatchMark) isMatch()              {}
func (MatchCTReply) isMatch()           {}
func (MatchCTStateNew) isMatch()        {}
func (MatchL4Proto) isMatch()           {}
func (MatchDstPort) isMatch()           {}
func (MatchAddr) isMatch()              {}
func (MatchAddrSet) isMatch()           {}
func (MatchSocketTransparent) isMatch() {}
func (MatchLocalDst) isMatch()          {}
func (MatchForeignSrc) isMatch()        {}
func (MatchCTLabel) isMatch()           {}
func (MatchICMPType) isMatch()          {}

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

func (MatchCTReply) String() string    { return "ct direction reply" }
func (MatchCTStateNew) String() string { return "ct state new" }

func protoName(p uint8) string {
	switch p {
	case ProtoTCP:
		return "tcp"
	case ProtoUDP:
		return "udp"
	case ProtoICMP:
		return "icmp"
	case ProtoICMPv6:
		return "ipv6-icmp"
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

func (m MatchICMPType) String() string {
	if m.Family == IPv6 {
		return fmt.Sprintf("icmpv6 type %d", m.Type)
	}
	return fmt.Sprintf("icmp type %d", m.Type)
}

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

func (MatchSocketTransparent) String() string { return "socket transparent 1 socket wildcard 0" }
func (m MatchCTLabel) String() string         { return fmt.Sprintf("ct label %d", m.Bit) }
func (MatchLocalDst) String() string          { return "fib daddr type local" }
func (MatchForeignSrc) String() string        { return "fib saddr type != local" }

// Verdict ends a rule.
type Verdict uint8

// Verdicts.
const (
	VerdictReturn Verdict = iota // leave this chain: back to the caller, or on untouched from a base chain
	VerdictAccept                // stop evaluating our chains at this hook
	VerdictDrop                  // drop the packet
	VerdictJump                  // go to Action.Chain; its return comes back here
)

// TProxy sends the packet to a local transparent socket on Port (and Addr,
// when valid: else any local address) without changing it.
type TProxy struct {
	Family Family
	Addr   netip.Addr
	Port   uint16
}

// Action is what a matching Rule does: optional tproxy, optional mark,
// optional conntrack label, then the verdict.
type Action struct {
	TProxy  *TProxy
	SetMark uint32 // 0 = leave the mark alone
	// SetCTLabel puts conntrack label ConnLabelDNSBypass on the packet's connection.
	SetCTLabel bool
	Verdict    Verdict
	Chain      string // VerdictJump: the target chain
}

func (a Action) String() string {
	var parts []string
	if a.TProxy != nil {
		to := fmt.Sprintf(":%d", a.TProxy.Port)
		if a.TProxy.Addr.IsValid() {
			to = netip.AddrPortFrom(a.TProxy.Addr, a.TProxy.Port).String()
		}
		parts = append(parts, fmt.Sprintf("tproxy %s to %s", a.TProxy.Family.nftFamily(), to))
	}
	if a.SetMark != 0 {
		parts = append(parts, fmt.Sprintf("meta mark set %#x", a.SetMark))
	}
	if a.SetCTLabel {
		parts = append(parts, fmt.Sprintf("ct label set %d", ConnLabelDNSBypass))
	}
	switch a.Verdict {
	case VerdictAccept:
		parts = append(parts, "accept")
	case VerdictDrop:
		parts = append(parts, "drop")
	case VerdictJump:
		parts = append(parts, "jump "+a.Chain)
	default:
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
	// IfPresent skips the sysctl where the kernel does not have it (its
	// module is not loaded), instead of failing.
	IfPresent bool
}

// path is the file under /proc/sys; /proc/sys/net is per network namespace, of the calling thread.
// path is the key's file, as sysctl(8) reads a key: '.' separates, and a
// '/' stands for a '.' in a name (net.ipv6.conf.eth0/100.accept_ra is
// eth0.100's).
func (s Sysctl) path() string {
	return "/proc/sys/" + strings.Map(func(r rune) rune {
		switch r {
		case '.':
			return '/'
		case '/':
			return '.'
		}
		return r
	}, s.Key)
}

func (s Sysctl) String() string {
	if s.IfPresent {
		return "sysctl -w " + s.Key + "=" + s.Value + " # if present"
	}
	return "sysctl -w " + s.Key + "=" + s.Value
}

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
	setLANSrc4       = "lan_src4"
	setLANSrc6       = "lan_src6"
	// SetDNSBypass4 and SetDNSBypass6 are the dynamic sets of dns-bypass:
	// real addresses of names whose flows are DIRECT for certain, added by
	// the fake-ip DNS server with a timeout (see DNSBypassSet).
	SetDNSBypass4 = "dns_bypass4"
	SetDNSBypass6 = "dns_bypass6"
)

// ConnLabelDNSBypass is the conntrack label (bit 0-127) put on connections
// that started towards an address of the dns-bypass sets: their later packets
// stay in the kernel when the address has expired from the set meanwhile, so
// a long download is not cut off by its DNS TTL. The highest bit, rarely
// used by others (conntrack labels are shared by everything on the host).
const ConnLabelDNSBypass = 127

// Built-in LAN sources: with no Interfaces given, only packets from these
// (plus Options.LANSources) are intercepted, so that a WAN interface never
// reaches the TPROXY listener as an open proxy.
var (
	lanSources4 = mustPrefixes("10.0.0.0/8", "100.64.0.0/10", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16")
	lanSources6 = mustPrefixes("fc00::/7", "fe80::/10")
)

// LANSourceRanges returns the built-in LAN source list of one family.
func LANSourceRanges(f Family) []netip.Prefix {
	if f == IPv6 {
		return append([]netip.Prefix(nil), lanSources6...)
	}
	return append([]netip.Prefix(nil), lanSources4...)
}

// pingComment names the rule that routes a ping to a fake IP to the gateway
// (the mark's ip rule delivers it locally). A fake IP stands for a name, so
// no host would answer, and ICMP cannot be proxied: the gateway answers
// itself (the kernel for IPv6, tpgw's relay.PingResponder for IPv4), rather
// than forwarding the request to the WAN, where it is lost.
const pingComment = "ping to a fake IP: answered by the gateway"

// fakePing matches ICMP echo requests to the fake-ip range r.
func fakePing(r netip.Prefix) []Match {
	f := MatchAddr{Prefix: r}.Family()
	proto, typ := ProtoICMP, uint8(icmpEcho)
	if f == IPv6 {
		proto, typ = ProtoICMPv6, icmp6Echo
	}
	return []Match{MatchAddr{Prefix: r}, MatchL4Proto{Protos: []uint8{proto}}, MatchICMPType{Family: f, Type: typ}}
}

// BuildPlan validates o and computes the plan. It has no side effects.
//
// The same plan serves both backends; see doc.go for the chains and why each
// rule is where it is.
func BuildPlan(o Options) (*Plan, error) {
	o, err := o.validate()
	if err != nil {
		return nil, err
	}
	p := &Plan{Options: o, Table: TableName}
	families := []Family{IPv4}
	if o.IPv6 {
		families = append(families, IPv6)
	}
	closed := o.OnFailure == OnFailureClosed
	// The families whose DNS is hijacked: those a socket of the DNS server
	// listens for.
	dnsFamilies := families
	if o.DNSAddr.IsValid() {
		dnsFamilies = []Family{familyOf(o.DNSAddr)}
		if !slices.Contains(families, dnsFamilies[0]) {
			dnsFamilies = nil
		}
	}
	tcpUDP := MatchL4Proto{Protos: []uint8{ProtoTCP, ProtoUDP}}
	tproxyTo := func(f Family, port uint16) Action {
		return Action{TProxy: &TProxy{Family: f, Port: port}, SetMark: o.Mark, Verdict: VerdictAccept}
	}
	add := func(c *Chain, comment string, a Action, ms ...Match) {
		c.Rules = append(c.Rules, Rule{Comment: comment, Matches: ms, Action: a})
	}
	ret := Action{Verdict: VerdictReturn}
	drop := Action{Verdict: VerdictDrop}
	markIt := Action{SetMark: o.Mark, Verdict: VerdictAccept}
	jump := func(chain string) Action { return Action{Verdict: VerdictJump, Chain: chain} }
	lo := MatchIIfName{Name: "lo"}

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
	var dnsBypassSets []Set
	if o.DNSBypass {
		dnsBypassSets = append(dnsBypassSets, Set{Name: SetDNSBypass4, Family: IPv4, Timeout: true})
		if o.IPv6 {
			dnsBypassSets = append(dnsBypassSets, Set{Name: SetDNSBypass6, Family: IPv6, Timeout: true})
		}
		p.Sets = append(p.Sets, dnsBypassSets...)
	}
	// dnsBypass adds the dns-bypass returns: connections already labelled,
	// then new ones to an address of the sets, which get the label.
	dnsBypass := func(c *Chain, labelled bool) {
		if len(dnsBypassSets) == 0 {
			return
		}
		if labelled {
			add(c, "flow to a dns-bypass address", ret, MatchCTLabel{Bit: ConnLabelDNSBypass})
		}
		for _, s := range dnsBypassSets {
			// New connections only: one tpgw relays already stays with
			// tpgw when its address joins the set (forwarded mid-flow, its
			// next segment would reach a server that never saw its SYN).
			add(c, "dns-bypass: DIRECT for certain", Action{SetCTLabel: true, Verdict: VerdictReturn}, MatchCTStateNew{}, MatchAddrSet{Family: s.Family, Set: s.Name})
		}
	}
	var lanSets []Set // with no interfaces given, the LAN is known by its source addresses
	if len(o.Interfaces) == 0 {
		lan4, lan6 := splitFamilies(o.LANSources)
		lanSets = append(lanSets, Set{Name: setLANSrc4, Family: IPv4, Elements: mergePrefixes(append(LANSourceRanges(IPv4), lan4...))})
		if o.IPv6 {
			lanSets = append(lanSets, Set{Name: setLANSrc6, Family: IPv6, Elements: mergePrefixes(append(LANSourceRanges(IPv6), lan6...))})
		}
		p.Sets = append(p.Sets, lanSets...)
	}
	// fromLAN adds one rule per way of recognising a LAN packet.
	fromLAN := func(c *Chain, comment string, a Action) {
		switch {
		case len(o.Interfaces) == 0:
			for _, s := range lanSets {
				add(c, comment, a, MatchAddrSet{Family: s.Family, Src: true, Set: s.Name})
			}
		case len(o.Interfaces) == 1:
			add(c, comment, a, MatchIIfName{Name: o.Interfaces[0]})
		default:
			add(c, comment, a, MatchIIfNameSet{Set: setLANInterfaces})
		}
	}

	// prerouting: which packets may be intercepted at all.
	pre := Chain{Name: ChainName, Hook: HookPrerouting, Type: "filter", Priority: "mangle"}
	// Connections dns-bypass handed to the kernel (labelled in divert below):
	// first, so their packets pay for one rule. Only connections that were
	// neither DNS, nor to a fake IP, nor to the gateway itself got the label.
	if len(dnsBypassSets) > 0 {
		add(&pre, "flow to a dns-bypass address", ret, MatchCTLabel{Bit: ConnLabelDNSBypass})
	}
	// lo carries the gateway's own traffic; only what was marked for us (proxy-self) goes on.
	loopback := len(o.Interfaces) == 0 || o.ProxySelf
	if loopback {
		add(&pre, "loopback unless marked for tpgw", ret, lo, MatchMark{Mark: o.Mark, Negate: true})
	}
	// The engine's own outbound sockets: intercepting them would loop.
	if o.RoutingMark != 0 {
		add(&pre, "engine's own traffic (routing-mark)", ret, MatchMark{Mark: o.RoutingMark})
	}
	// Replies of connections that were not ours, e.g. DNATed inbound (published
	// container ports): they must go back the way the kernel set up.
	add(&pre, "reply of a tracked connection", ret, MatchCTReply{})
	if loopback {
		add(&pre, "gateway's own traffic marked for tpgw", jump(ChainDivert), lo)
	}
	// Only LAN packets: a WAN interface must not reach the TPROXY or DNS port.
	fromLAN(&pre, "from the LAN", jump(ChainDivert))

	// divert: send to tpgw, or return for what is bypassed.
	div := Chain{Name: ChainDivert}
	// DNS before the bypass, so queries to a LAN resolver get fake IPs too.
	if o.DNSPort != 0 {
		for _, f := range dnsFamilies {
			a := tproxyTo(f, o.DNSPort)
			a.TProxy.Addr = o.DNSAddr
			add(&div, "DNS hijack", a, MatchFamily{Family: f}, tcpUDP, MatchDstPort{Port: 53})
		}
		if closed {
			// nft's tproxy falls through when nothing listens; closed means no DNS leaks.
			for _, f := range dnsFamilies {
				add(&div, "DNS with tpgw down (on-failure: closed)", drop, MatchFamily{Family: f}, tcpUDP, MatchDstPort{Port: 53})
			}
		}
	}
	// Fake IPs before the bypass: 198.18.0.0/15 is in the reserved list.
	fakeRanges := []netip.Prefix{o.FakeIPRange}
	if o.IPv6 {
		fakeRanges = append(fakeRanges, o.FakeIPRange6)
	}
	for _, r := range fakeRanges {
		if !r.IsValid() {
			continue
		}
		f := MatchAddr{Prefix: r}.Family()
		add(&div, "fake-ip range", tproxyTo(f, o.TProxyPort), MatchAddr{Prefix: r}, tcpUDP)
		if closed {
			add(&div, "fake-ip with tpgw down (on-failure: closed)", drop, MatchAddr{Prefix: r}, tcpUDP)
		}
		add(&div, pingComment, markIt, fakePing(r)...)
	}
	// Traffic to the gateway's own addresses (its web UI, SSH, its public WAN
	// address) is delivered locally, not proxied back to itself.
	add(&div, "to the gateway itself", ret, MatchLocalDst{})
	// Bypass by destination, then by source.
	for _, s := range p.Sets {
		switch s.Name {
		case setBypass4, setBypass6:
			add(&div, "bypassed destination", ret, MatchAddrSet{Family: s.Family, Set: s.Name})
		case setBypassSrc4, setBypassSrc6:
			add(&div, "bypassed source", ret, MatchAddrSet{Family: s.Family, Src: true, Set: s.Name})
		}
	}
	dnsBypass(&div, false)
	// Packets of connections our transparent sockets already own skip the tproxy lookup.
	socketRule := []Match{MatchL4Proto{Protos: []uint8{ProtoTCP}}, MatchSocketTransparent{}}
	if !o.IPv6 {
		socketRule = append([]Match{MatchFamily{Family: IPv4}}, socketRule...)
	}
	add(&div, "established transparent socket", markIt, socketRule...)
	// Everything else TCP/UDP goes to the TPROXY listener. If nothing listens,
	// nft's tproxy falls through and the packet is routed as usual (on-failure:
	// open), unless the closed policy drops it next.
	for _, f := range families {
		add(&div, "transparent proxy", tproxyTo(f, o.TProxyPort), MatchFamily{Family: f}, tcpUDP)
	}
	if closed {
		for _, f := range families {
			add(&div, "tpgw down (on-failure: closed)", drop, MatchFamily{Family: f}, tcpUDP)
		}
	}
	p.Chains = append(p.Chains, pre, div)

	// output: the gateway's own traffic (proxy-self) is marked, so the ip rule
	// routes it to lo, where it re-enters prerouting and is intercepted there.
	if o.ProxySelf {
		out := Chain{Name: ChainOutput, Hook: HookOutput, Type: "route", Priority: "mangle"}
		add(&out, "engine's own traffic (routing-mark)", ret, MatchMark{Mark: o.RoutingMark})
		// Another tool's marked sockets route by their mark (wg-quick's
		// tunnel packets, tailscale's): re-marked and relayed, they would
		// be dialed again through the routes they avoid (a loop into wg0).
		add(&out, "marked by another program (its own routing)", ret, MatchMark{Mark: 0, Negate: true})
		add(&out, "reply of a tracked connection", ret, MatchCTReply{})
		add(&out, "to the gateway itself", ret, MatchLocalDst{}) // includes 127.0.0.0/8 and ::1
		// tpgw's UDP replies leave from the flows' original destinations;
		// one that is not a tracked reply (full-cone: another source than
		// the client asked, or an expired entry) would be diverted back.
		add(&out, "not from the gateway's own addresses (tpgw's replies)", ret, MatchForeignSrc{})
		add(&out, "gateway's own traffic", jump(ChainDivertOut))
		// divert_out marks only what divert then takes: a marked packet
		// that divert returns keeps the local route it got here, and is
		// lost.
		divOut := Chain{Name: ChainDivertOut}
		if o.DNSPort != 0 {
			for _, f := range dnsFamilies {
				add(&divOut, "gateway's own DNS", markIt, MatchFamily{Family: f}, tcpUDP, MatchDstPort{Port: 53})
			}
		}
		for _, r := range fakeRanges {
			if r.IsValid() {
				add(&divOut, "fake-ip range", markIt, MatchAddr{Prefix: r}, tcpUDP)
				add(&divOut, pingComment, markIt, fakePing(r)...)
			}
		}
		for _, s := range p.Sets {
			switch s.Name {
			case setBypass4, setBypass6:
				add(&divOut, "bypassed destination", ret, MatchAddrSet{Family: s.Family, Set: s.Name})
			case setBypassSrc4, setBypassSrc6:
				add(&divOut, "bypassed source", ret, MatchAddrSet{Family: s.Family, Src: true, Set: s.Name})
			}
		}
		dnsBypass(&divOut, true)
		for _, f := range families {
			add(&divOut, "gateway's own traffic (proxy-self)", markIt, MatchFamily{Family: f}, tcpUDP)
		}
		p.Chains = append(p.Chains, out, divOut)
	}

	// input: the TPROXY port only takes diverted packets (they carry the mark);
	// the DNS port also answers the LAN and the gateway itself. Anything else
	// from outside would use tpgw as an open proxy or resolver.
	// Diverted packets are accepted: with iptables that is final for the
	// filter table's INPUT, whose first rule jumps here, so a host firewall
	// that denies incoming packets there (ufw, firewalld's iptables backend)
	// does not drop the flows tpgw was told to take. With nftables the same
	// is done by hostInputOpening (hostinput.go).
	in := Chain{Name: ChainInput, Hook: HookInput, Type: "filter", Priority: "filter"}
	add(&in, "from the gateway itself", ret, lo)
	add(&in, divertedComment, Action{Verdict: VerdictAccept}, MatchMark{Mark: o.Mark})
	add(&in, "TPROXY port, not diverted", drop, tcpUDP, MatchDstPort{Port: o.TProxyPort})
	if o.DNSPort != 0 {
		fromLAN(&in, "from the LAN", ret)
		add(&in, "DNS port, not from the LAN", drop, tcpUDP, MatchDstPort{Port: o.DNSPort})
	}
	p.Chains = append(p.Chains, in)

	// no_redirects: a gateway that forwards a packet out the interface it
	// came in on (a side router on one LAN with the main router: bypassed
	// flows, dns-bypass, on-failure: open) tells the client by ICMP redirect
	// to send to the main router itself. Clients keep that for minutes, and
	// their later flows to the address skip the gateway, proxy rules and
	// all (after a reload, after tpgw came back). The gateway sends none
	// while tpgw's table is in the kernel.
	noRedir := Chain{Name: ChainNoRedirects, Hook: HookOutput, Type: "filter", Priority: "filter"}
	add(&noRedir, "ICMP redirect: LAN clients would skip the gateway", drop,
		MatchFamily{Family: IPv4}, MatchL4Proto{Protos: []uint8{ProtoICMP}}, MatchICMPType{Family: IPv4, Type: icmpRedirect})
	add(&noRedir, "ICMPv6 redirect: LAN clients would skip the gateway", drop,
		MatchFamily{Family: IPv6}, MatchL4Proto{Protos: []uint8{ProtoICMPv6}}, MatchICMPType{Family: IPv6, Type: icmp6Redirect})
	p.Chains = append(p.Chains, noRedir)

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
	// tproxy does not work at br_netfilter's bridge-layer prerouting (bridge.go).
	p.Sysctls = append(p.Sysctls, bridgeNetfilterSysctls(o)...)
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
		flags := "interval"
		if s.Timeout {
			flags = "timeout"
		}
		fmt.Fprintf(&b, "\tset %s {\n\t\ttype %s\n\t\tflags %s\n", s.Name, s.Family.addrType(), flags)
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
	for i, c := range p.Chains {
		if i > 0 {
			b.WriteString("\n")
		}
		fmt.Fprintf(&b, "\tchain %s {\n", c.Name)
		if c.IsBase() {
			fmt.Fprintf(&b, "\t\ttype %s hook %s priority %s; policy accept;\n", c.Type, c.Hook, c.Priority)
		}
		for _, r := range c.Rules {
			b.WriteString("\t\t" + r.String() + "\n")
		}
		b.WriteString("\t}\n")
	}
	b.WriteString("}\n")
	return b.String()
}

// String is the whole plan as the nftables backend installs it: the nft
// ruleset, then ip rules and routes, then sysctls. Deterministic; `tpgw rules`
// prints it.
func (p *Plan) String() string { return p.Render("nftables") }

// Render prints the plan as the named backend installs it: for "iptables",
// the iptables and ip6tables commands a person could run in a shell; for
// anything else, the nftables ruleset (nft -f). The ip rule, ip route and
// sysctl commands follow in both.
func (p *Plan) Render(backend string) string {
	var b strings.Builder
	if backend == "iptables" {
		b.WriteString(p.IPTablesScript())
	} else {
		b.WriteString("# nftables (nft -f)\n")
		b.WriteString(p.NftRuleset())
		b.WriteString("\n# only where the host's iptables filter INPUT chain filters (policy not ACCEPT, or rules:\n" +
			"# ufw, firewalld's iptables backend), the packets tpgw diverts are accepted there first\n")
		for l := range strings.Lines(hostInputPlan(p).iptScript(iptFamilies(p))) {
			if !strings.HasPrefix(l, "#") && strings.TrimSpace(l) != "" {
				b.WriteString(l)
			}
		}
	}
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

// ICMP redirect message types (RFC 792, RFC 4861).
const (
	icmpRedirect  = 5
	icmp6Redirect = 137
	icmpEcho      = 8
	icmp6Echo     = 128
)

// familyOf is the family of a (non-mapped) address.
func familyOf(a netip.Addr) Family {
	if a.Is4() {
		return IPv4
	}
	return IPv6
}
