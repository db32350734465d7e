package netcfg

import (
	"net/netip"
	"strings"
	"testing"
)

func TestExplain(t *testing.T) {
	// One LAN interface, bypass-src, engine routing-mark.
	lan := DefaultOptions()
	lan.Interfaces = []string{"lan0"}
	lan.RoutingMark = 255
	lan.BypassSrc = mustPrefixes("192.168.77.50/32")
	lan.Bypass = mustPrefixes("203.0.113.128/25")
	// No interfaces: the LAN is known by its source addresses.
	all := DefaultOptions()
	closed := lan
	closed.OnFailure = OnFailureClosed
	noDNS := lan
	noDNS.DNSPort = 0

	gw := []netip.Addr{netip.MustParseAddr("192.168.77.1"), netip.MustParseAddr("203.0.113.1")}
	cases := []struct {
		name    string
		opts    Options
		flow    string // "proto src dst iface"
		mark    uint32
		outcome Outcome
		port    uint16
		comment string // of the deciding rule; "" when none decides
		chain   string
		ifDown  Outcome // OutcomeTProxy only
	}{
		{"bypassed destination", lan, "tcp 192.168.77.2:40000 10.0.0.5:80 lan0", 0, OutcomeNotIntercepted, 0, "bypassed destination", ChainDivert, 0},
		{"bypass option destination", lan, "tcp 192.168.77.2:40000 203.0.113.200:80 lan0", 0, OutcomeNotIntercepted, 0, "bypassed destination", ChainDivert, 0},
		{"bypass-src client", lan, "tcp 192.168.77.50:40000 203.0.113.3:80 lan0", 0, OutcomeNotIntercepted, 0, "bypassed source", ChainDivert, 0},
		{"non-LAN interface", lan, "tcp 198.51.100.9:40000 203.0.113.3:80 wan0", 0, OutcomeNotIntercepted, 0, "", "", 0},
		{"non-LAN source, all interfaces", all, "tcp 198.51.100.9:40000 203.0.113.3:80 eth0", 0, OutcomeNotIntercepted, 0, "", "", 0},
		{"engine's own traffic (routing-mark)", lan, "tcp 192.168.77.2:40000 203.0.113.3:80 lan0", 255, OutcomeNotIntercepted, 0, "engine's own traffic (routing-mark)", ChainName, 0},
		{"DNS query", lan, "udp 192.168.77.2:40000 192.168.77.1:53 lan0", 0, OutcomeTProxy, DefaultDNSPort, "DNS hijack", ChainDivert, OutcomeNotIntercepted},
		{"DNS query to a public resolver", all, "tcp 192.168.77.2:40000 8.8.8.8:53 eth0", 0, OutcomeTProxy, DefaultDNSPort, "DNS hijack", ChainDivert, OutcomeTProxy},
		{"DNS without hijack", noDNS, "udp 192.168.77.2:40000 8.8.8.8:53 lan0", 0, OutcomeTProxy, DefaultTProxyPort, "transparent proxy", ChainDivert, OutcomeNotIntercepted},
		{"fake-ip destination", lan, "tcp 192.168.77.2:40000 198.18.0.9:443 lan0", 0, OutcomeTProxy, DefaultTProxyPort, "fake-ip range", ChainDivert, OutcomeNotIntercepted},
		{"local destination", lan, "tcp 192.168.77.2:40000 192.168.77.1:22 lan0", 0, OutcomeNotIntercepted, 0, "to the gateway itself", ChainDivert, 0},
		{"gateway's public address", lan, "tcp 192.168.77.2:40000 203.0.113.1:443 lan0", 0, OutcomeNotIntercepted, 0, "to the gateway itself", ChainDivert, 0},
		{"public destination", lan, "tcp 192.168.77.2:40000 203.0.113.3:80 lan0", 0, OutcomeTProxy, DefaultTProxyPort, "transparent proxy", ChainDivert, OutcomeNotIntercepted},
		{"public destination, udp", all, "udp 192.168.77.2:40000 203.0.113.3:443 eth0", 0, OutcomeTProxy, DefaultTProxyPort, "transparent proxy", ChainDivert, OutcomeNotIntercepted},
		{"public destination, v6", lan, "tcp [fd00::2]:40000 [2001:db8::3]:80 lan0", 0, OutcomeTProxy, DefaultTProxyPort, "transparent proxy", ChainDivert, OutcomeNotIntercepted},
		{"on-failure closed", closed, "tcp 192.168.77.2:40000 203.0.113.3:80 lan0", 0, OutcomeTProxy, DefaultTProxyPort, "transparent proxy", ChainDivert, OutcomeDrop},
		{"on-failure closed, DNS", closed, "udp 192.168.77.2:40000 192.168.77.1:53 lan0", 0, OutcomeTProxy, DefaultDNSPort, "DNS hijack", ChainDivert, OutcomeDrop},
		{"on-failure closed, bypassed", closed, "tcp 192.168.77.2:40000 10.0.0.5:80 lan0", 0, OutcomeNotIntercepted, 0, "bypassed destination", ChainDivert, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p, err := BuildPlan(tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			f := parseFlow(t, tc.flow)
			f.Mark = tc.mark
			e := p.Explain(f, gw)
			if e.Outcome != tc.outcome {
				t.Fatalf("outcome %d, want %d: %s", e.Outcome, tc.outcome, e)
			}
			if tc.comment == "" {
				if e.Rule != nil {
					t.Fatalf("decided by %s, want no rule: %s", e.Rule.Rule, e)
				}
			} else if e.Rule == nil || e.Rule.Rule.Comment != tc.comment || e.Rule.Chain != tc.chain {
				t.Fatalf("got %s, want rule %q of chain %s", e, tc.comment, tc.chain)
			}
			if e.Port != tc.port {
				t.Errorf("port %d, want %d", e.Port, tc.port)
			}
			if tc.outcome == OutcomeTProxy {
				if e.IfDown == nil || e.IfDown.Outcome != tc.ifDown {
					t.Errorf("if tpgw is down: %v, want outcome %d", e.IfDown, tc.ifDown)
				}
			} else if e.IfDown != nil {
				t.Errorf("IfDown set for %s", e)
			}
			// The path ends with the deciding rule, and every rule on it matched.
			if e.Rule != nil && (len(e.Path) == 0 || e.Path[len(e.Path)-1].Rule.String() != e.Rule.Rule.String()) {
				t.Errorf("path %v does not end with %s", e.Path, e.Rule.Rule)
			}
			t.Logf("%s", e)
		})
	}
}

func TestExplainPathAndText(t *testing.T) {
	o := DefaultOptions()
	o.Interfaces = []string{"lan0"}
	p, err := BuildPlan(o)
	if err != nil {
		t.Fatal(err)
	}
	e := p.Explain(parseFlow(t, "tcp 192.168.77.2:40000 203.0.113.3:80 lan0"), nil)
	if got, want := e.String(), `intercepted — TPROXY to :7893 (rule "transparent proxy", chain divert)`; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
	var path []string
	for _, s := range e.Path {
		path = append(path, s.Chain+":"+s.Rule.Comment)
	}
	if got, want := strings.Join(path, " / "), "prerouting:from the LAN / divert:transparent proxy"; got != want {
		t.Errorf("path %q, want %q", got, want)
	}
	if got, want := e.IfDown.String(), "not intercepted: no rule of chain prerouting sends it to tpgw — the kernel forwards it as usual"; got != want {
		t.Errorf("if down: got %q, want %q", got, want)
	}

	e = p.Explain(parseFlow(t, "tcp 192.168.77.2:40000 10.0.0.5:80 lan0"), nil)
	if got, want := e.String(), "not intercepted: bypassed destination (rule 6 of chain divert) — the kernel forwards it as usual"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
	e = p.Explain(parseFlow(t, "tcp 192.168.77.2:40000 127.0.0.1:80 lan0"), nil)
	if !e.LocalDst || !strings.HasSuffix(e.String(), "the kernel delivers it to the gateway itself") {
		t.Errorf("loopback destination: %s", e)
	}
}

// oddMatch is a match Explain has no rule for.
type oddMatch struct{}

func (oddMatch) String() string { return "meta cgroup 7" }
func (oddMatch) isMatch()       {}

func TestExplainUnknownMatch(t *testing.T) {
	p := &Plan{Chains: []Chain{{
		Name: ChainName, Hook: HookPrerouting,
		Rules: []Rule{
			{Comment: "udp only", Matches: []Match{MatchL4Proto{Protos: []uint8{ProtoUDP}}}, Action: Action{Verdict: VerdictDrop}},
			{Comment: "odd", Matches: []Match{oddMatch{}}, Action: Action{Verdict: VerdictDrop}},
		},
	}}}
	e := p.Explain(parseFlow(t, "tcp 192.168.77.2:40000 203.0.113.3:80 lan0"), nil)
	if e.Outcome != OutcomeUnknown || e.String() != "cannot evaluate meta cgroup 7 (rule 2 of chain prerouting)" {
		t.Fatalf("got %d %q", e.Outcome, e)
	}
}

func parseFlow(t *testing.T, s string) Flow {
	t.Helper()
	f := strings.Fields(s)
	if len(f) != 4 {
		t.Fatalf("bad flow %q", s)
	}
	return Flow{Proto: f[0], Src: netip.MustParseAddrPort(f[1]), Dst: netip.MustParseAddrPort(f[2]), InIface: f[3]}
}
