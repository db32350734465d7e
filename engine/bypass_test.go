package engine

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	D "github.com/miekg/dns"

	"github.com/metacubex/mihomo/config"
	C "github.com/metacubex/mihomo/constant"
	R "github.com/metacubex/mihomo/rules"
	RP "github.com/metacubex/mihomo/rules/provider"
	"github.com/metacubex/mihomo/tunnel"
)

// parseRules parses a mihomo config with the given rules (and extra
// top-level YAML) the way Start would, without applying it.
func parseRules(t *testing.T, extra string, rules ...string) ruleView {
	t.Helper()
	var b strings.Builder
	b.WriteString(`mode: rule
proxies:
  - name: ss
    type: ss
    server: 198.51.100.2
    port: 8388
    cipher: chacha20-ietf-poly1305
    password: x
proxy-groups:
  - name: choose
    type: select
    proxies: [DIRECT, ss]
rule-providers:
  direct-names:
    type: inline
    behavior: domain
    payload: ["+.set.test"]
  direct-nets:
    type: inline
    behavior: ipcidr
    payload: ["203.0.113.0/24"]
  classical:
    type: inline
    behavior: classical
    payload: ["DOMAIN-SUFFIX,classic.test"]
`)
	b.WriteString(extra)
	b.WriteString("rules:\n")
	for _, r := range rules {
		fmt.Fprintf(&b, "  - %s\n", r)
	}
	rc, _, err := rawConfig([]byte(b.String()), 0)
	if err != nil {
		t.Fatal(err)
	}
	rc.Profile.StoreFakeIP, rc.Profile.StoreSelected = false, false
	cfg, err := config.ParseRawConfig(rc)
	if err != nil {
		t.Fatalf("mihomo config: %v\n%s", err, b.String())
	}
	for name, p := range cfg.RuleProviders {
		if err := p.Initial(); err != nil {
			t.Fatalf("rule provider %s: %v", name, err)
		}
	}
	// RULE-SET rules find their provider in the tunnel: give it these for
	// the test (the rules stay those of the test engine), then put it back.
	oldRules, oldProviders := tunnel.Rules(), tunnel.RuleProviders()
	tunnel.UpdateRules(oldRules, cfg.SubRules, cfg.RuleProviders)
	t.Cleanup(func() { tunnel.UpdateRules(oldRules, nil, oldProviders) })
	return ruleView{rules: cfg.Rules, proxies: cfg.Proxies, providers: cfg.RuleProviders}
}

var (
	directIP  = netip.MustParseAddr("203.0.113.2")
	proxiedIP = netip.MustParseAddr("203.0.113.3")
)

// decide is the whole rule part of ResolveDirect for one name and its addresses.
func decide(v ruleView, host string, addrs ...netip.Addr) (bool, string) {
	d, why := v.nameDecision(host)
	if d == no {
		return false, "name: " + why
	}
	return v.addrsDirect(host, addrs)
}

func TestBypassDecision(t *testing.T) {
	cases := []struct {
		name  string
		rules []string
		host  string
		addrs []netip.Addr
		want  bool
		why   string // substring of the reason when want is false
	}{
		{"DIRECT by domain", []string{"DOMAIN-SUFFIX,direct.test,DIRECT", "MATCH,ss"}, "direct.test", []netip.Addr{directIP}, true, ""},
		{"subdomain, several addresses", []string{"DOMAIN-SUFFIX,direct.test,DIRECT", "MATCH,ss"}, "www.direct.test", []netip.Addr{directIP, proxiedIP}, true, ""},
		{"domain rule to a proxy", []string{"DOMAIN-SUFFIX,direct.test,DIRECT", "MATCH,ss"}, "proxied.test", []netip.Addr{proxiedIP}, false, "(Match) → ss"},
		{"domain rule to REJECT", []string{"DOMAIN,ads.test,REJECT", "MATCH,DIRECT"}, "ads.test", []netip.Addr{directIP}, false, "REJECT"},
		{"DST-PORT before", []string{"DST-PORT,443,ss", "DOMAIN-SUFFIX,direct.test,DIRECT"}, "direct.test", []netip.Addr{directIP}, false, "DstPort,443"},
		{"SRC-IP-CIDR before", []string{"SRC-IP-CIDR,192.168.77.9/32,ss", "DOMAIN-SUFFIX,direct.test,DIRECT"}, "direct.test", []netip.Addr{directIP}, false, "SrcIPCIDR"},
		{"NETWORK before", []string{"NETWORK,udp,ss", "MATCH,DIRECT"}, "direct.test", []netip.Addr{directIP}, false, "Network"},
		{"PROCESS-NAME before", []string{"PROCESS-NAME,curl,ss", "MATCH,DIRECT"}, "direct.test", []netip.Addr{directIP}, false, "ProcessName"},
		{"IN-NAME before", []string{"IN-NAME,tpgw-tproxy,DIRECT", "MATCH,DIRECT"}, "direct.test", []netip.Addr{directIP}, false, "InName"},
		{"logic rule before", []string{"AND,((DOMAIN,x.test),(DST-PORT,80)),ss", "MATCH,DIRECT"}, "direct.test", []netip.Addr{directIP}, false, "AND"},
		{"port rule after the decision", []string{"DOMAIN-SUFFIX,direct.test,DIRECT", "DST-PORT,443,ss", "MATCH,ss"}, "direct.test", []netip.Addr{directIP}, true, ""},
		{"IP-CIDR proxy before, matches the address", []string{"IP-CIDR,203.0.113.2/32,ss", "DOMAIN-SUFFIX,direct.test,DIRECT"}, "direct.test", []netip.Addr{directIP}, false, "203.0.113.2: rule 1 (IPCIDR,203.0.113.2/32) → ss"},
		{"IP-CIDR no-resolve proxy before, matches the address", []string{"IP-CIDR,203.0.113.2/32,ss,no-resolve", "DOMAIN-SUFFIX,direct.test,DIRECT"}, "direct.test", []netip.Addr{directIP}, false, "→ ss"},
		{"IP-CIDR proxy before, one of two addresses", []string{"IP-CIDR,203.0.113.3/32,ss", "DOMAIN-SUFFIX,direct.test,DIRECT"}, "direct.test", []netip.Addr{directIP, proxiedIP}, false, "203.0.113.3"},
		{"IP-CIDR proxy before, other address", []string{"IP-CIDR,203.0.113.3/32,ss", "DOMAIN-SUFFIX,direct.test,DIRECT"}, "direct.test", []netip.Addr{directIP}, true, ""},
		{"IP-CIDR after the domain rule", []string{"DOMAIN-SUFFIX,direct.test,DIRECT", "IP-CIDR,203.0.113.2/32,ss", "MATCH,ss"}, "direct.test", []netip.Addr{directIP}, true, ""},
		{"DIRECT by IP-CIDR that resolves", []string{"IP-CIDR,203.0.113.0/24,DIRECT", "MATCH,ss"}, "any.test", []netip.Addr{directIP}, true, ""},
		{"DIRECT by IP-CIDR no-resolve: the fake-ip flow never sees the address", []string{"IP-CIDR,203.0.113.0/24,DIRECT,no-resolve", "MATCH,ss"}, "any.test", []netip.Addr{directIP}, false, "(Match) → ss"},
		{"group that selects DIRECT", []string{"DOMAIN-SUFFIX,direct.test,choose", "MATCH,ss"}, "direct.test", []netip.Addr{directIP}, false, "→ choose"},
		{"no rule matches: default DIRECT", []string{"DOMAIN,other.test,ss"}, "direct.test", []netip.Addr{directIP}, true, ""},
		{"domain rule set DIRECT", []string{"RULE-SET,direct-names,DIRECT", "MATCH,ss"}, "a.set.test", []netip.Addr{directIP}, true, ""},
		{"ipcidr rule set DIRECT", []string{"RULE-SET,direct-nets,DIRECT", "MATCH,ss"}, "any.test", []netip.Addr{directIP}, true, ""},
		{"ipcidr rule set proxy before", []string{"RULE-SET,direct-nets,ss", "MATCH,DIRECT"}, "any.test", []netip.Addr{directIP}, false, "RuleSet"},
		{"classical rule set before", []string{"RULE-SET,classical,ss", "MATCH,DIRECT"}, "direct.test", []netip.Addr{directIP}, false, "depends on more"},
		{"PASS goes on", []string{"DOMAIN-SUFFIX,direct.test,PASS", "DOMAIN-SUFFIX,direct.test,DIRECT", "MATCH,ss"}, "direct.test", []netip.Addr{directIP}, true, ""},
		{"no addresses: DIRECT by name", []string{"DOMAIN-SUFFIX,direct.test,DIRECT", "MATCH,ss"}, "direct.test", nil, true, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			v := parseRules(t, "", c.rules...)
			got, why := decide(v, c.host, c.addrs...)
			if got != c.want {
				t.Fatalf("bypass %s %v = %v (%s), want %v", c.host, c.addrs, got, why, c.want)
			}
			if !c.want && !strings.Contains(why, c.why) {
				t.Errorf("reason %q, want it to contain %q", why, c.why)
			}
		})
	}
}

// TestBypassNameOnly: a name whose domain rule is a proxy is decided before
// any resolution (fake-ip keeps proxied names away from the DIRECT resolver).
func TestBypassNameOnly(t *testing.T) {
	v := parseRules(t, "", "DOMAIN-SUFFIX,proxied.test,ss", "IP-CIDR,10.0.0.0/8,ss", "MATCH,DIRECT")
	if d, why := v.nameDecision("proxied.test"); d != no {
		t.Errorf("proxied.test: %v %s, want no before resolving", d, why)
	}
	if d, _ := v.nameDecision("other.test"); d != needAddr {
		t.Errorf("other.test: %v, want needAddr (an IP rule comes before MATCH)", d)
	}
}

func TestBypassGlobalBlockers(t *testing.T) {
	for _, c := range []struct {
		mode     tunnel.TunnelMode
		sniffing bool
		want     string
	}{
		{tunnel.Rule, false, ""},
		{tunnel.Global, false, "mode is global"},
		{tunnel.Direct, false, "mode is direct"},
		{tunnel.Rule, true, "sniffer"},
	} {
		if got := globalBlocker(c.mode, c.sniffing); (c.want == "") != (got == "") || !strings.Contains(got, c.want) {
			t.Errorf("globalBlocker(%v, %v) = %q, want %q", c.mode, c.sniffing, got, c.want)
		}
	}
}

func TestAnswerAddrs(t *testing.T) {
	m := new(D.Msg)
	for _, s := range []string{
		"direct.test. 300 IN CNAME edge.test.",
		"edge.test. 120 IN A 203.0.113.2",
		"edge.test. 600 IN A 203.0.113.3",
		"edge.test. 30 IN AAAA 2001:db8:1::2",
	} {
		rr, err := D.NewRR(s)
		if err != nil {
			t.Fatal(err)
		}
		m.Answer = append(m.Answer, rr)
	}
	addrs, ttl := answerAddrs(m, D.TypeA)
	if fmt.Sprint(addrs) != "[203.0.113.2 203.0.113.3]" || ttl != 120 {
		t.Errorf("A: %v ttl %d", addrs, ttl)
	}
	addrs, ttl = answerAddrs(m, D.TypeAAAA)
	if fmt.Sprint(addrs) != "[2001:db8:1::2]" || ttl != 30 {
		t.Errorf("AAAA: %v ttl %d", addrs, ttl)
	}
}

// TestResolveDirectRefuses: the running test engine (fake-ip, MATCH,DIRECT,
// an unreachable nameserver) answers no for other types and when the
// resolver fails, so the DNS server falls back to a fake IP.
func TestResolveDirectRefuses(t *testing.T) {
	ctx := context.Background()
	if _, _, ok, why := testEngine.ResolveDirect(ctx, "web.test.", D.TypeMX); ok || !strings.Contains(why, "not an A") {
		t.Errorf("MX: ok %v %q", ok, why)
	}
	if _, _, ok, why := testEngine.ResolveDirect(ctx, "web.test.", D.TypeA); ok || !strings.Contains(why, "resolve") {
		t.Errorf("A with a dead nameserver: ok %v %q", ok, why)
	}
	// MayBypass agrees on what is decided before the nameserver.
	if !testEngine.MayBypass("web.test.", D.TypeA) {
		t.Error("MayBypass: no for an A query ResolveDirect goes on to resolve")
	}
	if testEngine.MayBypass("web.test.", D.TypeMX) {
		t.Error("MayBypass: yes for an MX query")
	}
}

// TestProviderState: a rule provider's state follows its contents, not its
// update time: an update that finds the same file keeps it, one that finds
// other names changes it (and so DecisionInputs, which the gateway watches
// to empty the dns-bypass sets).
func TestProviderState(t *testing.T) {
	home := C.Path.HomeDir()
	C.SetHomeDir(t.TempDir())
	t.Cleanup(func() { C.SetHomeDir(home) })
	path := filepath.Join(C.Path.HomeDir(), "names.yaml")
	if err := os.WriteFile(path, []byte("payload:\n  - '+.one.test'\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	p, err := RP.ParseRuleProvider("names", map[string]any{"type": "file", "path": "./names.yaml", "behavior": "domain"}, R.ParseRule)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Initial(); err != nil {
		t.Fatal(err)
	}
	defer p.(interface{ Close() error }).Close()
	first := providerState(p)
	if len(first) != 32 {
		t.Fatalf("state %q: want the contents' MD5 (mihomo's fetcher layout changed?)", first)
	}
	time.Sleep(10 * time.Millisecond)
	if err := p.Update(); err != nil {
		t.Fatal(err)
	}
	if got := providerState(p); got != first {
		t.Errorf("an update with the same contents changed the state: %q → %q", first, got)
	}
	if err := os.WriteFile(path, []byte("payload:\n  - '+.two.test'\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := p.Update(); err != nil {
		t.Fatal(err)
	}
	if got := providerState(p); got == first {
		t.Errorf("an update with other names kept the state %q", got)
	}
}
