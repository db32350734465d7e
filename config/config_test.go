package config

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestDefaults(t *testing.T) {
	c, err := Parse([]byte("mode: rule\nrules:\n  - MATCH,DIRECT\n"), "x.yaml")
	if err != nil {
		t.Fatal(err)
	}
	g := c.Gateway
	if c.TProxyPort != 7893 || g.Mark != 666 || g.Table != 666 || g.Backend != "auto" ||
		!g.IPv6 || g.OnFailure != "open" || !g.DNSHijack || !g.Forward || g.ProxySelf ||
		len(g.Interfaces) != 0 || g.StateDir != "/run/tpgw" {
		t.Fatalf("defaults wrong: port %d %+v", c.TProxyPort, g)
	}
	if c.DNS.Listen != netip.MustParseAddrPort("0.0.0.0:1053") || c.DNS.FakeIPRange.String() != "198.18.0.1/16" {
		t.Fatalf("dns defaults wrong: %+v", c.DNS)
	}
	if c.RoutingMark != 0 {
		t.Fatalf("routing-mark default should be 0 without proxy-self, got %d", c.RoutingMark)
	}
}

func TestExampleConfig(t *testing.T) {
	c, err := Load(filepath.Join("..", "config.example.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if !c.DNS.FakeIP() || c.TProxyPort != 7893 || c.Gateway.Backend != "auto" {
		t.Fatalf("unexpected example config: %+v", c)
	}
}

func TestValues(t *testing.T) {
	c, err := Parse([]byte(`
tproxy-port: 7000
routing-mark: 255
dns:
  enable: true
  enhanced-mode: fake-ip
  listen: ":5353"
  fake-ip-range: 198.19.0.1/16
  fake-ip-range6: fdfe:dcba:9876::1/64
tpgw:
  backend: nftables
  interfaces: [br-lan, eth1]
  mark: 0x10
  table: 100
  bypass: [10.1.0.0/16, 2001:db8::1, 1.2.3.4]
  bypass-src: [192.168.1.50/32]
  proxy-self: true
  ipv6: false
  on-failure: closed
  dns-hijack: false
  forward: false
  state-dir: /tmp/tpgw-state
  udp-timeout: 2m
  udp-max-sessions: 100
`), "")
	if err != nil {
		t.Fatal(err)
	}
	g := c.Gateway
	if c.TProxyPort != 7000 || c.RoutingMark != 255 || g.Mark != 16 || g.Table != 100 || g.Backend != "nftables" {
		t.Fatalf("got %+v %+v", c, g)
	}
	if c.DNS.Listen.String() != "0.0.0.0:5353" || c.DNS.FakeIPRange6.String() != "fdfe:dcba:9876::1/64" {
		t.Fatalf("dns %+v", c.DNS)
	}
	want := []string{"10.1.0.0/16", "2001:db8::1/128", "1.2.3.4/32"}
	for i, p := range g.Bypass {
		if p.String() != want[i] {
			t.Fatalf("bypass[%d] = %s, want %s", i, p, want[i])
		}
	}
	if g.UDPTimeout != 2*time.Minute || g.UDPMaxSessions != 100 {
		t.Fatalf("udp settings %v %d", g.UDPTimeout, g.UDPMaxSessions)
	}
	if len(g.Interfaces) != 2 || !g.ProxySelf || g.IPv6 || g.OnFailure != "closed" || g.DNSHijack || g.Forward {
		t.Fatalf("got %+v", g)
	}
}

const fakeIPDNS = "dns:\n  enable: true\n  enhanced-mode: fake-ip\n"

func TestDNSBypass(t *testing.T) {
	c, err := Parse([]byte(fakeIPDNS), "")
	if err != nil || c.Gateway.DNSBypass {
		t.Fatalf("dns-bypass must default to off: %v %+v", err, c.Gateway)
	}
	c, err = Parse([]byte(fakeIPDNS+"tpgw:\n  backend: nftables\n  dns-bypass: true\n"), "")
	if err != nil || !c.Gateway.DNSBypass {
		t.Fatalf("dns-bypass: true not taken: %v", err)
	}
}

func TestProxySelfDefaultsRoutingMark(t *testing.T) {
	c, err := Parse([]byte("tpgw:\n  proxy-self: true\n"), "")
	if err != nil {
		t.Fatal(err)
	}
	if c.RoutingMark != DefaultSelfRoutingMark {
		t.Fatalf("routing-mark = %#x, want default %#x", c.RoutingMark, DefaultSelfRoutingMark)
	}
}

func TestErrors(t *testing.T) {
	cases := []struct {
		name, yaml string
		want       []string // substrings of the error
	}{
		{"invalid yaml", "mode: rule\ntpgw:\n  mark: [1\n", []string{"invalid YAML", "cfg.yaml:2"}},
		{"tab indent", "tpgw:\n\tmark: 1\n", []string{"invalid YAML", ":2"}},
		{"unknown backend", "tpgw:\n  backend: pf\n", []string{"tpgw.backend", `"pf"`, ":2", "nftables"}},
		{"negative mark", "tpgw:\n  mark: -1\n", []string{"tpgw.mark", "-1", ":2"}},
		{"zero mark", "tpgw:\n  mark: 0\n", []string{"tpgw.mark", "must not be 0"}},
		{"string mark", "tpgw:\n  mark: lots\n", []string{"tpgw.mark", ":2"}},
		{"bad cidr", "tpgw:\n  bypass:\n    - 10.0.0.0/8\n    - 10.300.0.0/16\n", []string{"tpgw.bypass", `"10.300.0.0/16"`, ":4"}},
		{"bad src cidr", "tpgw:\n  bypass-src: [nonsense]\n", []string{"tpgw.bypass-src", "nonsense"}},
		{"unknown key", "tpgw:\n  mark: 1\n  bypas: []\n", []string{"tpgw.bypas", "unknown key", ":3"}},
		{"main table", "tpgw:\n  table: 254\n", []string{"tpgw.table", "254"}},
		{"negative table", "tpgw:\n  table: -5\n", []string{"tpgw.table"}},
		{"bad failure", "tpgw:\n  on-failure: maybe\n", []string{"tpgw.on-failure", "maybe"}},
		{"bad port", "tproxy-port: 70000\n", []string{"tproxy-port", "70000"}},
		{"zero port", "tproxy-port: 0\n", []string{"tproxy-port", "must be set"}},
		{"negative routing mark", "routing-mark: -3\n", []string{"routing-mark", "-3"}},
		{"routing mark equals mark", "routing-mark: 666\n", []string{"routing-mark", "tpgw.mark"}},
		{"fake-ip v6 in v4 key", "dns:\n  fake-ip-range: fd00::/64\n", []string{"dns.fake-ip-range", "IPv4"}},
		{"bad dns listen", "dns:\n  listen: nowhere\n", []string{"dns.listen", "nowhere"}},
		{"dns on 53", "dns:\n  enable: true\n  enhanced-mode: fake-ip\n  listen: 0.0.0.0:53\n", []string{"cfg.yaml:4", "dns.listen", "port 53", "0.0.0.0:1053"}},
		{"mixed-port on tproxy-port", "mixed-port: 7893\n", []string{"cfg.yaml:1", "mixed-port", "7893", "tproxy-port"}},
		{"mixed-port in hex on tproxy-port", "mixed-port: 0x1ed5\n", []string{"cfg.yaml:1", "mixed-port", "7893", "tproxy-port"}},
		{"redir-port on a set tproxy-port", "redir-port: 7000\ntproxy-port: 7000\n", []string{":1", "redir-port", "tproxy-port"}},
		{"listener on tproxy-port", "listeners:\n  - {name: in, type: socks, port: 7893}\n", []string{":2", "listeners[0].port", "tproxy-port"}},
		{"listener's port by merge key", "base: &base {type: socks, port: 7893}\nlisteners:\n  - {name: in, <<: *base}\n", []string{":1", "listeners[0].port", "tproxy-port"}},
		{"listener by alias", "x: &l {name: in, type: socks, port: 7893}\nlisteners:\n  - *l\n", []string{":1", "listeners[0].port", "tproxy-port"}},
		{"listeners by alias", "x: &ls\n  - {name: in, type: socks, port: 7893, listen: 127.0.0.1}\nlisteners: *ls\n", []string{":2", "listeners[0].port", "tproxy-port"}},
		{"controller on tproxy-port", "external-controller: 0.0.0.0:7893\n", []string{"external-controller", "tproxy-port"}},
		{"socks-port on dns.listen", fakeIPDNS + "socks-port: 1053\nallow-lan: true\n", []string{"socks-port", "1053", "dns.listen"}},
		{"listener on dns.listen", fakeIPDNS + "listeners:\n  - {name: d, type: tunnel, port: 1053, listen: 0.0.0.0, network: [udp], target: 1.1.1.1:53}\n", []string{"listeners[0].port", "dns.listen"}},
		{"dns on port 0", "dns:\n  enable: true\n  listen: \":0\"\n", []string{"dns.listen", ":3", "port 0"}},
		{"dns on tproxy-port", "dns:\n  enable: true\n  enhanced-mode: fake-ip\n  listen: 0.0.0.0:7893\n", []string{"cfg.yaml:4", "dns.listen", "7893", "tproxy-port"}},
		{"interface wildcard +", "tpgw:\n  interfaces: [br-lan, eth+]\n", []string{"tpgw.interfaces", ":2", `"eth+"`, "wildcards"}},
		{"interface wildcard *", "tpgw:\n  interfaces: [\"eth*\"]\n", []string{"tpgw.interfaces", `"eth*"`, "wildcards"}},
		{"interface with a quote", "tpgw:\n  interfaces: ['a\"b']\n", []string{"tpgw.interfaces", "not an interface name"}},
		{"bypass over the fake-ip range", fakeIPDNS + "tpgw:\n  bypass:\n    - 10.0.0.0/8\n    - 198.18.0.0/15\n", []string{"tpgw.bypass", ":7", `"198.18.0.0/15"`, "fake-ip range 198.18.0.0/16"}},
		{"tpgw not a map", "tpgw: [1, 2]\n", []string{"tpgw", "mapping"}},
		{"empty", "", []string{"empty"}},
		{"bad udp timeout", "tpgw:\n  udp-timeout: soon\n", []string{"tpgw.udp-timeout", "soon"}},
		{"tiny udp table", "tpgw:\n  udp-max-sessions: 1\n", []string{"tpgw.udp-max-sessions"}},
		{"relative state dir", "tpgw:\n  state-dir: run\n", []string{"tpgw.state-dir", "absolute"}},
		{"dns-bypass not a bool", "tpgw:\n  dns-bypass: sometimes\n", []string{"tpgw.dns-bypass", ":2"}},
		{"dns-bypass without fake-ip", "dns:\n  enable: true\n  enhanced-mode: redir-host\ntpgw:\n  dns-bypass: true\n", []string{"tpgw.dns-bypass", ":5", "fake-ip"}},
		{"dns-bypass with iptables", fakeIPDNS + "tpgw:\n  backend: iptables\n  dns-bypass: true\n", []string{"tpgw.dns-bypass", ":6", "nftables"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.yaml), "cfg.yaml")
			if err == nil {
				t.Fatal("no error")
			}
			msg := err.Error()
			if strings.Contains(msg, "\n") {
				t.Errorf("error has several lines: %q", msg)
			}
			for _, w := range tc.want {
				if !strings.Contains(msg, w) {
					t.Errorf("error %q does not contain %q", msg, w)
				}
			}
		})
	}
}

func TestLoadMissingFile(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "nope.yaml"))
	if err == nil || !os.IsNotExist(unwrapAll(err)) {
		t.Fatalf("want not-exist error, got %v", err)
	}
}

func unwrapAll(err error) error {
	for {
		u, ok := err.(interface{ Unwrap() error })
		if !ok {
			return err
		}
		err = u.Unwrap()
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte("tpgw:\n  mark: 1\n  bypass: [10.0.0.0/8]\n"))
	f.Add([]byte("dns:\n  listen: :53\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := Parse(b, "")
		if err == nil && c.TProxyPort == 0 {
			t.Fatal("accepted config with no tproxy port")
		}
	})
}

// TestPortsApart: mihomo's inbound servers on ports or addresses apart from
// tpgw's listeners are fine.
func TestPortsApart(t *testing.T) {
	for name, y := range map[string]string{
		"usual ports":        "port: 7890\nsocks-port: 7891\nmixed-port: 7892\nredir-port: 7894\nexternal-controller: 127.0.0.1:9090\n",
		"dns off":            "socks-port: 1053\n",
		"other dns address":  fakeIPDNS + "  listen: 127.0.0.2:1053\nsocks-port: 1053\n",
		"listener elsewhere": fakeIPDNS + "  listen: 192.168.1.1:1053\nlisteners:\n  - {name: in, type: mixed, port: 1053, listen: 127.0.0.1}\n",
		"ports off":          "mixed-port: 0\nport: 0\n",
		"not a port":         "mixed-port: lots\n", // mihomo reports it
	} {
		if _, err := Parse([]byte(y), "cfg.yaml"); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// TestYAMLAnchors: the dns and tpgw sections read through YAML aliases and
// merge keys as mihomo's decoder does (own keys win over merged ones);
// before, a merged dns section was taken for no DNS at all.
func TestYAMLAnchors(t *testing.T) {
	const common = "x-dns: &dns\n  enable: true\n  enhanced-mode: fake-ip\n  listen: 0.0.0.0:1054\n" +
		"x-gw: &gw\n  mark: 0x300\n  on-failure: closed\n"
	c, err := Parse([]byte(common+"dns:\n  <<: *dns\n  listen: 0.0.0.0:1055\ntpgw:\n  <<: *gw\n  mark: 0x301\n"), "cfg.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if !c.DNS.FakeIP() || c.DNS.Listen.Port() != 1055 || c.Gateway.Mark != 0x301 || c.Gateway.OnFailure != FailClosed {
		t.Errorf("merge keys: fake-ip %v, dns.listen %v, mark %#x, on-failure %s; want true, :1055, 0x301, closed",
			c.DNS.FakeIP(), c.DNS.Listen, c.Gateway.Mark, c.Gateway.OnFailure)
	}
	c, err = Parse([]byte(common+"dns: *dns\ntpgw: *gw\n"), "cfg.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if !c.DNS.FakeIP() || c.DNS.Listen.Port() != 1054 || c.Gateway.Mark != 0x300 {
		t.Errorf("aliases: fake-ip %v, dns.listen %v, mark %#x; want true, :1054, 0x300", c.DNS.FakeIP(), c.DNS.Listen, c.Gateway.Mark)
	}
	// A key set twice in the section itself is still an error.
	if _, err := Parse([]byte("tpgw:\n  <<: {mark: 5}\n  mark: 6\n  mark: 7\n"), "cfg.yaml"); err == nil || !strings.Contains(err.Error(), "appears twice") {
		t.Errorf("a key twice beside a merge: %v", err)
	}
}
