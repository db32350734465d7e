package netcfg

import (
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden from the current output")

func goldenCases() map[string]Options {
	lan := DefaultOptions()
	lan.Interfaces = []string{"eth1", "br-lan"}
	lan.IPv6 = false
	lan.Forward = false
	lan.RoutingMark = 255
	lan.Bypass = mustPrefixes("203.0.113.0/24", "10.1.0.0/16", "11.0.0.0/8", "2001:db8::/32")
	lan.BypassSrc = mustPrefixes("192.168.1.50/32", "192.168.1.64/26")
	// One interface, v6 fake-ip range, v6 bypass-src, no DNS hijack.
	v6 := DefaultOptions()
	v6.Interfaces = []string{"br-lan"}
	v6.DNSPort = 0
	v6.Forward = false
	v6.FakeIPRange6 = netip.MustParsePrefix("fdfe:dcba:9876::1/64")
	v6.Bypass = mustPrefixes("2001:db8:1::/48", "100.64.0.0/16")
	v6.BypassSrc = mustPrefixes("fd00::/8", "192.168.1.7/32")
	// proxy-self, on-failure: closed, extra LAN sources, all interfaces, a
	// DNS server on 127.0.0.1 (IPv6 DNS is not hijacked, nor dropped).
	self := DefaultOptions()
	self.DNSAddr = netip.MustParseAddr("127.0.0.1")
	self.RoutingMark = 255
	self.ProxySelf = true
	self.OnFailure = OnFailureClosed
	self.FakeIPRange6 = netip.MustParsePrefix("fdfe:dcba:9876::/64")
	self.LANSources = mustPrefixes("203.0.113.128/25", "2001:db8:77::/64")
	// dns-bypass (nftables only), with proxy-self: both divert chains return its sets.
	dnsBypass := DefaultOptions()
	dnsBypass.RoutingMark = 255
	dnsBypass.ProxySelf = true
	dnsBypass.DNSBypass = true
	return map[string]Options{
		"dns_bypass_proxyself":         dnsBypass,
		"proxyself_closed_lansrc_dns4": self,
		"defaults_dns_ipv6":            DefaultOptions(),
		"lan_bypass_no_ipv6":           lan,
		"one_iface_fakeip6_nodns":      v6,
	}
}

func TestPlanGolden(t *testing.T) {
	for name, o := range goldenCases() {
		t.Run(name, func(t *testing.T) {
			p, err := BuildPlan(o)
			if err != nil {
				t.Fatal(err)
			}
			for _, backend := range []string{"nftables", "iptables"} {
				checkGolden(t, p.Render(backend), name, backend)
			}
			if p.String() != p.Render("nftables") {
				t.Error("String differs from Render(nftables)")
			}
			if again, _ := BuildPlan(o); again.Render("iptables") != p.Render("iptables") || again.String() != p.String() {
				t.Error("plan text is not deterministic")
			}
		})
	}
}

// checkGolden compares got with testdata/NAME.golden (nftables) or
// testdata/NAME.iptables.golden.
func checkGolden(t *testing.T, got, name, backend string) {
	t.Helper()
	path := filepath.Join("testdata", name+".golden")
	if backend != "nftables" {
		path = filepath.Join("testdata", name+"."+backend+".golden")
	}
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if got != string(want) {
		t.Errorf("plan differs from %s (go test -update rewrites it):\n%s", path, got)
	}
}

func TestBuildPlanRejects(t *testing.T) {
	base := DefaultOptions()
	cases := []struct {
		name   string
		modify func(*Options)
		want   string
	}{
		{"zero mark", func(o *Options) { o.Mark = 0 }, "mark must not be 0"},
		{"routing-mark equals mark", func(o *Options) { o.RoutingMark = o.Mark }, "routing-mark 0x29a must differ from mark"},
		{"bad on-failure", func(o *Options) { o.OnFailure = "half" }, `on-failure "half"`},
		{"proxy-self without routing-mark", func(o *Options) { o.ProxySelf = true }, "proxy-self needs a routing-mark"},
		{"invalid lan source", func(o *Options) { o.LANSources = []netip.Prefix{{}} }, "lan-sources[0]: invalid prefix"},
		{"zero tproxy port", func(o *Options) { o.TProxyPort = 0 }, "tproxy port must not be 0"},
		{"table 0", func(o *Options) { o.Table = 0 }, "table 0:"},
		{"table main", func(o *Options) { o.Table = 254 }, "table 254:"},
		{"table local", func(o *Options) { o.Table = 255 }, "table 255:"},
		{"table default", func(o *Options) { o.Table = 253 }, "table 253:"},
		{"table negative", func(o *Options) { o.Table = -1 }, "table -1:"},
		{"table too big", func(o *Options) { o.Table = 1 << 31 }, "table 2147483648:"},
		{"empty interface", func(o *Options) { o.Interfaces = []string{""} }, `interface "": not a valid interface name`},
		{"long interface", func(o *Options) { o.Interfaces = []string{"abcdefghijklmnop"} }, "not a valid interface name"},
		{"quote in interface", func(o *Options) { o.Interfaces = []string{`eth"0`} }, "not a valid interface name"},
		{"invalid bypass", func(o *Options) { o.Bypass = []netip.Prefix{{}} }, "bypass[0]: invalid prefix"},
		{"invalid bypass-src", func(o *Options) { o.BypassSrc = append(mustPrefixes("10.0.0.0/8"), netip.Prefix{}) }, "bypass-src[1]: invalid prefix"},
		{"v6 fake-ip in v4 field", func(o *Options) { o.FakeIPRange = netip.MustParsePrefix("fd00::/64") }, "must be an IPv4 prefix"},
		{"v4 fake-ip in v6 field", func(o *Options) { o.FakeIPRange6 = netip.MustParsePrefix("10.0.0.0/8") }, "must be an IPv6 prefix"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			o := base
			c.modify(&o)
			p, err := BuildPlan(o)
			if err == nil {
				t.Fatalf("BuildPlan accepted it:\n%s", p)
			}
			if !strings.Contains(err.Error(), c.want) || !strings.HasPrefix(err.Error(), "netcfg: ") {
				t.Errorf("error %q, want it to contain %q", err, c.want)
			}
		})
	}
	t.Run("several errors at once", func(t *testing.T) {
		o := base
		o.Mark, o.TProxyPort = 0, 0
		_, err := BuildPlan(o)
		if err == nil || !strings.Contains(err.Error(), "mark") || !strings.Contains(err.Error(), "port") {
			t.Errorf("error %v, want both mark and port", err)
		}
	})
}

func TestBuildPlanNormalizes(t *testing.T) {
	o := DefaultOptions()
	o.Interfaces = []string{"eth1", "br-lan", "eth1"}
	o.FakeIPRange6 = netip.MustParsePrefix("fdfe:dcba:9876::1/64")
	o.Bypass = mustPrefixes("::ffff:8.8.8.0/120", "10.2.3.4/8")
	p, err := BuildPlan(o)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(p.Options.Interfaces, ","); got != "br-lan,eth1" {
		t.Errorf("interfaces %s, want sorted and unique", got)
	}
	if got := p.Options.FakeIPRange.String(); got != "198.18.0.0/16" {
		t.Errorf("fake-ip range %s, want masked", got)
	}
	text := p.String()
	for _, want := range []string{
		"ip6 daddr fdfe:dcba:9876::/64 meta l4proto { tcp, udp } tproxy ip6 to :7893",
		"\t\t\t8.8.8.0/24,\n", // v4-mapped bypass becomes v4
	} {
		if !strings.Contains(text, want) {
			t.Errorf("plan lacks %q:\n%s", want, text)
		}
	}
	// Fake IPs come before the bypass that contains them, DNS before both.
	dns := strings.Index(text, "th dport 53")
	fake := strings.Index(text, "ip daddr 198.18.0.0/16")
	bypass := strings.Index(text, "ip daddr @bypass4")
	if !(dns < fake && fake < bypass) {
		t.Errorf("rule order wrong: dns %d, fake-ip %d, bypass %d", dns, fake, bypass)
	}
	// The test topology's internet must not be bypassed.
	for _, s := range []string{"203.0.113.", "198.51.100.", "2001:db8"} {
		if strings.Contains(text, s) {
			t.Errorf("built-in bypass contains %s", s)
		}
	}
}

func TestMergePrefixes(t *testing.T) {
	cases := []struct {
		in   []string
		want string
	}{
		{nil, ""},
		{[]string{"10.0.0.0/8", "10.1.0.0/16"}, "10.0.0.0/8"},
		{[]string{"10.1.0.0/16", "10.0.0.0/8"}, "10.0.0.0/8"},
		{[]string{"10.0.0.0/8", "11.0.0.0/8"}, "10.0.0.0/7"},
		{[]string{"10.0.0.0/8", "11.0.0.0/8", "12.0.0.0/8"}, "10.0.0.0-12.255.255.255"},
		{[]string{"1.2.3.4/32", "1.2.3.6/32"}, "1.2.3.4 1.2.3.6"},
		{[]string{"255.255.255.255/32", "240.0.0.0/4"}, "240.0.0.0/4"},
		{[]string{"0.0.0.0/0", "10.0.0.0/8"}, "0.0.0.0/0"},
		{[]string{"::/128", "::1/128", "ff00::/8"}, "::/127 ff00::/8"},
	}
	for _, c := range cases {
		var got []string
		for _, r := range mergePrefixes(mustPrefixes(c.in...)) {
			got = append(got, r.String())
		}
		if s := strings.Join(got, " "); s != c.want {
			t.Errorf("mergePrefixes(%v) = %q, want %q", c.in, s, c.want)
		}
	}
}

// TestDivertOutMarksWhatDivertTakes: with proxy-self, the output chain marks
// only packets the divert chain then takes; a marked packet that divert
// returns keeps the local route it was given, and is lost. So the gateway's
// own DNS is marked in the families whose DNS is hijacked only, and its own
// traffic from a bypassed source is not marked. tpgw's own UDP replies
// (from foreign addresses) are never marked.
func TestDivertOutMarksWhatDivertTakes(t *testing.T) {
	o := DefaultOptions()
	o.ProxySelf, o.RoutingMark = true, 0xff
	o.DNSPort, o.DNSAddr = 1053, netip.MustParseAddr("127.0.0.1") // IPv4 DNS only
	o.BypassSrc = []netip.Prefix{netip.MustParsePrefix("192.168.1.0/28")}
	p, err := BuildPlan(o)
	if err != nil {
		t.Fatal(err)
	}
	var out, divOut []string
	for _, c := range p.Chains {
		for _, r := range c.Rules {
			switch c.Name {
			case ChainOutput:
				out = append(out, r.String())
			case ChainDivertOut:
				divOut = append(divOut, r.String())
			}
		}
	}
	all := strings.Join(divOut, "\n")
	if strings.Contains(all, "nfproto ipv6 meta l4proto { tcp, udp } th dport 53") {
		t.Errorf("divert_out marks IPv6 DNS, which divert does not hijack here:\n%s", all)
	}
	if !strings.Contains(all, "nfproto ipv4 meta l4proto { tcp, udp } th dport 53") {
		t.Errorf("divert_out does not mark IPv4 DNS:\n%s", all)
	}
	src, mark := slices.IndexFunc(divOut, func(r string) bool { return strings.Contains(r, "saddr @bypass_src4 return") }),
		slices.IndexFunc(divOut, func(r string) bool { return strings.Contains(r, "proxy-self") })
	if src < 0 || mark < 0 || src > mark {
		t.Errorf("divert_out does not return for bypassed sources before marking the gateway's own traffic:\n%s", all)
	}
	foreign := slices.IndexFunc(out, func(r string) bool { return strings.Contains(r, "fib saddr type != local return") })
	jump := slices.IndexFunc(out, func(r string) bool { return strings.Contains(r, "jump "+ChainDivertOut) })
	if foreign < 0 || foreign > jump {
		t.Errorf("the output chain does not return for foreign sources before divert_out:\n%s", strings.Join(out, "\n"))
	}
}

// TestOutputLeavesMarkedSockets: with proxy-self, packets another program
// marked (wg-quick's tunnel packets, on a socket with its fwmark) are left
// to that program's routing, like the engine's own.
func TestOutputLeavesMarkedSockets(t *testing.T) {
	o := DefaultOptions()
	o.ProxySelf, o.RoutingMark = true, 0xff
	p, err := BuildPlan(o)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range p.Chains {
		if c.Name != ChainOutput {
			continue
		}
		for _, r := range c.Rules {
			if strings.Contains(r.String(), "meta mark != 0x0 return") {
				return
			}
			if r.Action.Verdict == VerdictJump {
				t.Fatalf("the output chain jumps to %s before leaving marked packets alone:\n%s", r.Action.Chain, r)
			}
		}
	}
	t.Fatal("no output chain rule leaves marked packets alone")
}
