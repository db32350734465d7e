package engine

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"

	D "github.com/miekg/dns"

	"github.com/metacubex/mihomo/component/fakeip"
	"github.com/metacubex/mihomo/component/resolver"
	"github.com/metacubex/mihomo/config"
	C "github.com/metacubex/mihomo/constant"
	P "github.com/metacubex/mihomo/constant/provider"
	mdns "github.com/metacubex/mihomo/dns"
	"github.com/metacubex/mihomo/tunnel"
)

// DNS-driven bypass: the decision whether the flows to a name, and to each of
// its real addresses, go to mihomo's literal DIRECT adapter whatever else a
// flow carries (port, source, process...). Only then may the fake-ip DNS
// server hand out the real address and let the kernel forward the flows.
// Everything here errs towards "no": a wrong "yes" sends traffic the user
// meant for a proxy (or REJECT) past tpgw.

// dnsView is what the decision needs from the dns block of the running config.
type dnsView struct {
	fakeIP  bool            // enhanced-mode is fake-ip
	ipv6    bool            // dns.ipv6: without it mihomo answers AAAA queries empty
	skipper *fakeip.Skipper // fake-ip-filter: those names keep their usual real answers
}

// keepDNSView records the dns block of cfg for ResolveDirect (Start, Reload).
func (e *Engine) keepDNSView(cfg *config.Config) {
	v := &dnsView{}
	if cfg.DNS != nil {
		v.fakeIP = cfg.DNS.Enable && cfg.DNS.EnhancedMode == C.DNSFakeIP
		v.skipper = cfg.DNS.FakeIPSkipper
		v.ipv6 = cfg.DNS.IPv6
	}
	e.dnsView.Store(v)
}

// ResolveDirect resolves name (qtype A or AAAA) through the resolver mihomo's
// DIRECT adapter dials with, when mihomo's rules send every flow to name, and
// to each address of the answer, to the literal DIRECT adapter for certain.
// ttl is the smallest TTL of the answer. When ok is false, why says what
// stood in the way and the caller answers as usual (a fake IP); names whose
// rule is not DIRECT are never resolved here (fake-ip keeps them private).
// ok with no addresses is an empty answer (the name has none of qtype).
func (e *Engine) ResolveDirect(ctx context.Context, name string, qtype uint16) (addrs []netip.Addr, ttl uint32, ok bool, why string) {
	host := strings.ToLower(strings.TrimSuffix(name, "."))
	rules, r, byAddr, why := e.directCandidate(host, qtype)
	if why != "" {
		return nil, 0, false, why
	}
	addrs, ttl, why = exchange(ctx, r, host, qtype)
	if why != "" {
		return nil, 0, false, why
	}
	if ok, why := rules.addrsDirect(host, addrs); !ok {
		return nil, 0, false, why
	}
	if qtype == D.TypeAAAA && byAddr {
		// mihomo decides a flow to the name's fake IP with the address
		// it resolves the name to, an IPv4 one when the name has any
		// (resolver.ResolveIP), whichever family the client asked: the
		// IPv6 answer is DIRECT for certain only if those are too.
		addrs4, _, why := exchange(ctx, r, host, D.TypeA)
		if why != "" {
			return nil, 0, false, "IPv4 addresses, which mihomo's rules see for the name: " + why
		}
		for _, a := range addrs4 {
			if d, why := rules.walk(host, a, asTunnel); d != direct {
				return nil, 0, false, fmt.Sprintf("%s, the IPv4 address mihomo's rules see for the name: %s", a, why)
			}
		}
	}
	return addrs, ttl, true, ""
}

// exchange asks r for host's addresses of type qtype; why says what failed.
func exchange(ctx context.Context, r resolver.Resolver, host string, qtype uint16) (addrs []netip.Addr, ttl uint32, why string) {
	q := new(D.Msg)
	q.SetQuestion(D.Fqdn(host), qtype)
	resp, err := r.ExchangeContext(ctx, q)
	if err != nil {
		return nil, 0, "resolve: " + err.Error()
	}
	if resp.Rcode != D.RcodeSuccess {
		return nil, 0, "resolve: " + D.RcodeToString[resp.Rcode]
	}
	addrs, ttl = answerAddrs(resp, qtype)
	return addrs, ttl, ""
}

// MayBypass reports whether ResolveDirect could answer name with real
// addresses, from what it checks before it asks a nameserver; false means
// it would not, and the name gets a fake IP. The DNS server asks this
// before answering a fake IP at once (dns.Bypass's NewInstant).
func (e *Engine) MayBypass(name string, qtype uint16) bool {
	_, _, _, why := e.directCandidate(strings.ToLower(strings.TrimSuffix(name, ".")), qtype)
	return why == ""
}

// directCandidate is what ResolveDirect checks before it asks a
// nameserver: the rules and the resolver to ask with, and whether an
// address rule comes first (byAddr: the name alone does not decide), or why
// not.
func (e *Engine) directCandidate(host string, qtype uint16) (rules ruleView, r resolver.Resolver, byAddr bool, why string) {
	if qtype != D.TypeA && qtype != D.TypeAAAA {
		return ruleView{}, nil, false, "not an A or AAAA query"
	}
	v := e.dnsView.Load()
	if v == nil || !v.fakeIP {
		return ruleView{}, nil, false, "dns is not in fake-ip mode"
	}
	if v.skipper != nil && v.skipper.ShouldSkipped(host) {
		return ruleView{}, nil, false, "in fake-ip-filter (answered as usual)"
	}
	if why := globalBlocker(tunnel.Mode(), tunnel.IsSniffing()); why != "" {
		return ruleView{}, nil, false, why
	}
	// Any entry: one that maps the name to another name makes mihomo's
	// DNS answer, and its flows be decided, as that other name.
	if hv, _ := resolver.DefaultHosts.Search(host, false); hv != nil {
		return ruleView{}, nil, false, "in hosts"
	}
	rules = liveRules()
	d, why := rules.nameDecision(host)
	if d == no {
		return ruleView{}, nil, false, why
	}
	byAddr = d == needAddr
	if byAddr && !directUsesDefaultResolver() {
		// Rules that resolve use the default resolver; the addresses
		// checked here would come from direct-nameserver.
		return ruleView{}, nil, false, "an address rule comes first and direct-nameserver differs from nameserver"
	}
	r = resolver.DirectHostResolver
	if r == nil || !r.Invalid() { // Invalid reports a usable resolver
		return ruleView{}, nil, false, "no resolver for DIRECT"
	}
	if qtype == D.TypeAAAA && (resolver.DisableIPv6 || !v.ipv6) {
		return ruleView{}, nil, false, "ipv6 or dns.ipv6 is off in the mihomo config"
	}
	return rules, r, byAddr, ""
}

// directUsesDefaultResolver reports whether DIRECT resolves with the
// resolver that rules resolving an address use (no direct-nameserver).
func directUsesDefaultResolver() bool {
	rs, ok := resolver.DefaultResolver.(mdns.Resolvers)
	return ok && rs.Resolver != nil && resolver.DirectHostResolver == resolver.Resolver(rs.Resolver)
}

// answerAddrs are the addresses of type qtype in resp's answer and the
// smallest TTL of the records leading to them (CNAMEs included).
func answerAddrs(resp *D.Msg, qtype uint16) ([]netip.Addr, uint32) {
	var addrs []netip.Addr
	ttl := uint32(0)
	first := true
	for _, rr := range resp.Answer {
		var ip []byte
		switch rr := rr.(type) {
		case *D.A:
			if qtype != D.TypeA {
				continue
			}
			ip = rr.A.To4()
		case *D.AAAA:
			if qtype != D.TypeAAAA {
				continue
			}
			ip = rr.AAAA.To16()
		case *D.CNAME:
		default:
			continue
		}
		if first || rr.Header().Ttl < ttl {
			ttl, first = rr.Header().Ttl, false
		}
		if a, ok := netip.AddrFromSlice(ip); ok {
			addrs = append(addrs, a.Unmap())
		}
	}
	return addrs, ttl
}

// globalBlocker says why no name may bypass under the current mode and
// sniffer settings, or "". Both can be switched at run time (dashboard): only
// rule mode is certain, and the sniffer may replace a flow's name (override
// of the destination, force-domain) after the DNS answer.
func globalBlocker(mode tunnel.TunnelMode, sniffing bool) string {
	if mode != tunnel.Rule {
		return "mode is " + mode.String() + ", not rule"
	}
	if sniffing {
		return "the sniffer is on: it may change a flow's name"
	}
	return ""
}

// ruleView is the part of mihomo's state a decision reads.
type ruleView struct {
	rules     []C.Rule
	proxies   map[string]C.Proxy
	providers map[string]P.RuleProvider
}

func liveRules() ruleView {
	return ruleView{rules: tunnel.Rules(), proxies: tunnel.Proxies(), providers: tunnel.RuleProviders()}
}

// decision of one walk through the rules.
type decision int

const (
	no       decision = iota
	direct            // the literal DIRECT adapter
	needAddr          // an address rule comes first: the name alone cannot tell
)

// view is the metadata a walk gives the rules.
type view int

const (
	// nameOnly: before resolving; the walk stops at the first rule that
	// reads the destination address.
	nameOnly view = iota
	// asTunnel: what mihomo sees for a flow to the name's fake IP: the name,
	// and the address only once a rule that resolves asks for it (rules
	// with no-resolve never see it).
	asTunnel
	// nameAndAddr: the name and the real address the client will connect
	// to, seen by every address rule.
	nameAndAddr
)

// nameDecision walks the rules with the name only.
func (v ruleView) nameDecision(host string) (decision, string) {
	return v.walk(host, netip.Addr{}, nameOnly)
}

// addrsDirect reports whether flows to host at each of addrs are DIRECT for
// certain, both as mihomo would see them through the fake IP and with the
// address known to every rule.
func (v ruleView) addrsDirect(host string, addrs []netip.Addr) (bool, string) {
	for _, a := range addrs {
		for _, w := range []view{asTunnel, nameAndAddr} {
			if d, why := v.walk(host, a, w); d != direct {
				return false, fmt.Sprintf("%s: %s", a, why)
			}
		}
	}
	return true, ""
}

// walk goes through the rules in order as tunnel.match does and returns the
// decision with the reason (the rule, or what made it uncertain).
func (v ruleView) walk(host string, addr netip.Addr, w view) (decision, string) {
	md := &C.Metadata{NetWork: C.TCP, Type: C.TPROXY, Host: host, InName: InboundName}
	if w == nameAndAddr {
		md.DstIP = addr
	}
	helper := C.RuleMatchHelper{
		ResolveIP: func() {
			if w == asTunnel && !md.DstIP.IsValid() {
				md.DstIP = addr
			}
		},
		FindProcess: func() {},
	}
	for i, r := range v.rules {
		if d, ok := r.(interface{ IsDisabled() bool }); ok && d.IsDisabled() {
			continue
		}
		// The wrapped rule: the wrapper would count our walks as hits in the dashboard.
		base := r
		if u, ok := r.(interface{ Unwrap() C.Rule }); ok {
			base = u.Unwrap()
		}
		name := ruleName(base)
		readsAddr, known := v.ruleInputs(base)
		if !known {
			return no, fmt.Sprintf("rule %d (%s) depends on more than the name and the address", i+1, name)
		}
		if readsAddr && w == nameOnly {
			return needAddr, ""
		}
		matched, adapter := base.Match(md, helper)
		if !matched {
			continue
		}
		p, exists := v.proxies[adapter]
		if !exists {
			continue // mihomo skips a rule whose adapter is gone
		}
		switch {
		case p.Type() == C.Pass && adapter == p.Name():
			continue // the literal PASS adapter: mihomo goes on with the next rule
		case adapter == "DIRECT" && p.Type() == C.Direct:
			return direct, fmt.Sprintf("rule %d (%s) → DIRECT", i+1, name)
		}
		// A proxy, REJECT, or a group: a group that selects DIRECT now may
		// be switched in the dashboard at any time.
		return no, fmt.Sprintf("rule %d (%s) → %s", i+1, name, adapter)
	}
	if p, ok := v.proxies["DIRECT"]; ok && p.Type() == C.Direct {
		return direct, "no rule matched (default DIRECT)"
	}
	return no, "no rule matched and no DIRECT adapter"
}

// ruleInputs says whether r reads the destination address, and whether
// everything it reads is known from the name and the address (known false:
// ports, sources, processes, network, inbound, sub-rules, logic rules,
// classical rule sets...).
func (v ruleView) ruleInputs(r C.Rule) (readsAddr, known bool) {
	switch r.RuleType() {
	case C.Domain, C.DomainSuffix, C.DomainKeyword, C.DomainRegex, C.DomainWildcard, C.GEOSITE, C.MATCH:
		return false, true
	case C.GEOIP, C.IPASN, C.IPCIDR, C.IPSuffix: // the source variants are other types
		return true, true
	case C.RuleSet:
		if src, found := boolField(r, "isSrc"); !found || src {
			return false, false // matches the source with src; unknown layout: not sure
		}
		names := r.ProviderNames()
		if len(names) != 1 {
			return false, false
		}
		p, ok := v.providers[names[0]]
		if !ok {
			return false, false
		}
		switch p.Behavior() {
		case P.Domain:
			return false, true
		case P.IPCIDR:
			return true, true
		}
	}
	return false, false
}

// boolField reads an unexported bool field of the struct r points to; found
// is false when there is none by that name (another mihomo version).
func boolField(r C.Rule, name string) (value, found bool) {
	rv := reflect.ValueOf(r)
	if rv.Kind() != reflect.Pointer || rv.Elem().Kind() != reflect.Struct {
		return false, false
	}
	f := rv.Elem().FieldByName(name)
	if !f.IsValid() || f.Kind() != reflect.Bool {
		return false, false
	}
	return f.Bool(), true
}

func ruleName(r C.Rule) string {
	if r.Payload() == "" {
		return r.RuleType().String()
	}
	return r.RuleType().String() + "," + r.Payload()
}

// DecisionInputs is a fingerprint of what mihomo's rules read besides the
// config: the contents of the rule providers (the hash mihomo keeps of each)
// and the geodata files' times. Both change while the engine runs (a
// provider's interval, a file provider's watcher, a dashboard's update,
// geo-auto-update), and decisions made before may not hold after.
func (e *Engine) DecisionInputs() string {
	var b strings.Builder
	providers := tunnel.RuleProviders()
	names := make([]string, 0, len(providers))
	for name := range providers {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		fmt.Fprintf(&b, "%s=%s;", name, providerState(providers[name]))
	}
	for _, f := range []string{C.Path.MMDB(), C.Path.ASN(), C.Path.GeoIP(), C.Path.GeoSite()} {
		if fi, err := os.Stat(f); err == nil {
			fmt.Fprintf(&b, "%s=%d;", filepath.Base(f), fi.ModTime().UnixNano())
		}
	}
	return b.String()
}

// providerState is the hash of a rule provider's contents, which mihomo's
// fetcher keeps (unexported); without one (another mihomo version, an
// inline provider) its update time.
func providerState(p P.RuleProvider) string {
	v := reflect.ValueOf(p)
	for v.Kind() == reflect.Pointer || v.Kind() == reflect.Interface {
		if v.IsNil() {
			return ""
		}
		v = v.Elem()
	}
	if v.Kind() == reflect.Struct {
		if f, ok := v.Type().FieldByName("hash"); ok {
			if h, err := v.FieldByIndexErr(f.Index); err == nil && h.Kind() == reflect.Struct && h.NumField() == 1 && h.Field(0).Kind() == reflect.Array {
				sum := h.Field(0)
				var b strings.Builder
				for i := range sum.Len() {
					fmt.Fprintf(&b, "%02x", sum.Index(i).Uint())
				}
				return b.String()
			}
		}
	}
	if u, ok := p.(interface{ UpdatedAt() time.Time }); ok {
		return strconv.FormatInt(u.UpdatedAt().UnixNano(), 10)
	}
	return ""
}
