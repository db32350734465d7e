package e2e

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tpgw/tpgw/internal/testnet"
)

// bypassDNSConfig is a fake-ip DNS block with no fake-ip-filter, real
// answers from dnsmasq, and AAAA queries answered (dns.ipv6).
const bypassDNSConfig = `dns:
  enable: true
  ipv6: true
  listen: 0.0.0.0:1053
  enhanced-mode: fake-ip
  fake-ip-range: 198.18.0.1/16
  nameserver:
    - 203.0.113.2
external-controller: 127.0.0.1:9090
`

// TestDNSBypass: with tpgw.dns-bypass, a name whose rule is DIRECT gets its
// real address (A and AAAA), which lands in the kernel's bypass set with a
// timeout, and its flows reach the upstream with the client's own address
// without entering tpgw; a proxied name still gets a fake IP and goes via
// ss. A connection outlives its address's removal from the set, SIGHUP
// and a mode switch or rule toggle from a dashboard empty the sets, and
// stop leaves the kernel as it was.
func TestDNSBypass(t *testing.T) {
	requireDNSPeers(t)
	tp := testnet.New(t)
	tp.StartHTTPServer(t, httpPort)
	tp.StartSSServer(t, ssPort, ssPassword, ssMethod)
	tp.Upstream.MustRun(t, "ip", "addr", "add", "203.0.113.3/24", "dev", "eth0")
	tp.StartDNSMasq(t, map[string]string{"direct.test": "203.0.113.2,2001:db8:1::2", "proxied.test": "203.0.113.3"})
	before := testnet.Snapshot(t, tp.Gateway)

	cfg := writeConfig(t, baseConfig(t, []string{"DOMAIN-SUFFIX,direct.test,DIRECT", "MATCH,ss"},
		bypassDNSConfig+fmt.Sprintf("tpgw:\n  state-dir: %s\n  dns-bypass: true\n", t.TempDir())))
	p := startTPGW(t, tp, cfg)

	// The real addresses, not fake ones, and each in its set with a timeout
	// (dnsmasq's TTL is 0: the minute tpgw keeps at least, plus the grace).
	if a := digOne(t, tp, "direct.test", "A"); a != netip.MustParseAddr("203.0.113.2") {
		t.Fatalf("dig direct.test A = %s, want the real 203.0.113.2", a)
	}
	if a := digOne(t, tp, "+tcp", "direct.test", "AAAA"); a != netip.MustParseAddr("2001:db8:1::2") {
		t.Fatalf("dig direct.test AAAA = %s, want the real 2001:db8:1::2", a)
	}
	listSet := func(name string) string {
		return tp.Gateway.MustRun(t, "nft", "list", "set", "inet", "tpgw", name)
	}
	for set, addr := range map[string]string{"dns_bypass4": "203.0.113.2", "dns_bypass6": "2001:db8:1::2"} {
		out := listSet(set)
		if !regexp.MustCompile(regexp.QuoteMeta(addr) + ` timeout 6m expires [56]m`).MatchString(out) {
			t.Fatalf("set %s lacks %s with a 6m timeout:\n%s", set, addr, out)
		}
		t.Logf("%s: %s", set, strings.Join(strings.Fields(out), " "))
	}
	if a := digOne(t, tp, "proxied.test", "A"); !fakeRange.Contains(a) {
		t.Fatalf("dig proxied.test = %s, want a fake IP (its rule is MATCH,ss)", a)
	}
	if out := listSet("dns_bypass4"); strings.Contains(out, "203.0.113.3") {
		t.Fatalf("proxied.test's address is in the bypass set:\n%s", out)
	}

	// The paths: the kernel (client's own address) for direct.test, ss for proxied.test.
	wantSeenVia(t, tp, "-4", "http://direct.test:8080/", "192.168.77.2", "dns-bypass: forwarded by the kernel")
	wantSeenVia(t, tp, "-6", "http://direct.test:8080/", "fd77::2", "dns-bypass over IPv6: forwarded by the kernel")
	wantSeen(t, tp, "http://proxied.test:8080/", "198.51.100.2", "fake IP → MATCH,ss")

	// tpgw never sees the bypassed flow: with a connection to each name
	// open, its connection list has the proxied one only.
	direct := dialClient(t, tp, "203.0.113.2:8080")
	defer direct.Close()
	proxiedIP := digOne(t, tp, "proxied.test", "A")
	proxied := dialClient(t, tp, netip.AddrPortFrom(proxiedIP, httpPort).String())
	defer proxied.Close()
	conns := waitFor(t, 5*time.Second, func() (string, bool) {
		out, err := tp.Gateway.Run(t, 5*time.Second, "curl", "-sS", "--max-time", "3", "http://127.0.0.1:9090/connections")
		return out, err == nil && strings.Contains(out, `"host":"proxied.test"`)
	})
	if conns == "" {
		t.Fatal("external-controller /connections does not list the proxied flow")
	}
	if strings.Contains(conns, "203.0.113.2") || strings.Contains(conns, "direct.test") {
		t.Fatalf("tpgw's connection list shows the bypassed flow:\n%s", conns)
	}

	// An open connection stays in the kernel when its address leaves the
	// set (conntrack label): a second request on it still works.
	if got := httpOn(t, direct); got != "192.168.77.2" {
		t.Fatalf("first request on the open connection: upstream saw %q", got)
	}
	tp.Gateway.MustRun(t, "nft", "delete", "element", "inet", "tpgw", "dns_bypass4", "{ 203.0.113.2 }")
	if got := httpOn(t, direct); got != "192.168.77.2" {
		t.Fatalf("after the address left the set: upstream saw %q on the open connection", got)
	}
	// A new connection to the address, not in the set any more, goes through tpgw again.
	wantSeen(t, tp, "http://203.0.113.2:8080/", "198.51.100.2", "address expired: IP literal through tpgw, MATCH,ss")
	// The reverse: a connection tpgw relays keeps going through tpgw when
	// its address joins the set (another name resolving to it is asked):
	// only new connections bypass. Forwarded mid-flow, its next segment
	// would reach the upstream, which knows no such connection and resets
	// it. TCP's early demux would hide that (it hands the segment to the
	// relay's socket before routing), so it is off here, as some routers
	// run.
	tp.Gateway.MustRun(t, "sysctl", "-qw", "net.ipv4.tcp_early_demux=0")
	relayed := dialClient(t, tp, "203.0.113.2:8080")
	defer relayed.Close()
	if got := httpOn(t, relayed); got != "198.51.100.2" {
		t.Fatalf("IP literal through tpgw: upstream saw %q, want ss's 198.51.100.2", got)
	}
	tp.Gateway.MustRun(t, "nft", "add", "element", "inet", "tpgw", "dns_bypass4", "{ 203.0.113.2 timeout 1m }")
	if got := httpOn(t, relayed); got != "198.51.100.2" {
		t.Fatalf("relayed connection after its address joined the set: upstream saw %q, want ss's 198.51.100.2", got)
	}
	wantSeenVia(t, tp, "-4", "http://203.0.113.2:8080/", "192.168.77.2", "a new connection to the address: forwarded by the kernel")
	relayed.Close()
	tp.Gateway.MustRun(t, "sysctl", "-qw", "net.ipv4.tcp_early_demux=1")

	// SIGHUP: the rules may have changed, so the sets are emptied.
	digOne(t, tp, "direct.test", "A")
	if err := p.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if waitFor(t, 10*time.Second, func() (string, bool) { return "reloaded", strings.Contains(p.Output(), "msg=reloaded") }) == "" {
		t.Fatalf("no reload in the log:\n%s", p.Output())
	}
	for _, set := range []string{"dns_bypass4", "dns_bypass6"} {
		if out := listSet(set); strings.Contains(out, "elements") {
			t.Fatalf("set %s not empty after SIGHUP:\n%s", set, out)
		}
	}
	if a := digOne(t, tp, "direct.test", "A"); a != netip.MustParseAddr("203.0.113.2") || !strings.Contains(listSet("dns_bypass4"), "203.0.113.2 timeout") {
		t.Fatalf("after reload: dig direct.test = %s and the set is\n%s", a, listSet("dns_bypass4"))
	}

	// A dashboard switching the mode (PATCH /configs) empties them too: in
	// global mode every flow must reach tpgw, so names get fake IPs.
	wantCtl(t, tp, "PATCH", "/configs", `{"mode":"global"}`, 204, "")
	for _, set := range []string{"dns_bypass4", "dns_bypass6"} {
		if out := listSet(set); strings.Contains(out, "elements") {
			t.Fatalf("set %s not empty after the switch to global mode:\n%s", set, out)
		}
	}
	if a := digOne(t, tp, "direct.test", "A"); !fakeRange.Contains(a) {
		t.Fatalf("global mode: dig direct.test = %s, want a fake IP", a)
	}
	wantCtl(t, tp, "PATCH", "/configs", `{"mode":"rule"}`, 204, "")
	if a := digOne(t, tp, "direct.test", "A"); a != netip.MustParseAddr("203.0.113.2") {
		t.Fatalf("back in rule mode: dig direct.test = %s, want the real 203.0.113.2", a)
	}
	// So does turning off the rule that made direct.test DIRECT: MATCH,ss decides now.
	wantCtl(t, tp, "PATCH", "/rules/disable", `{"0":true}`, 204, "")
	if out := listSet("dns_bypass4"); strings.Contains(out, "elements") {
		t.Fatalf("set dns_bypass4 not empty after its rule was turned off:\n%s", out)
	}
	if a := digOne(t, tp, "direct.test", "A"); !fakeRange.Contains(a) {
		t.Fatalf("rule turned off: dig direct.test = %s, want a fake IP", a)
	}
	wantCtl(t, tp, "PATCH", "/rules/disable", `{"0":false}`, 204, "")

	direct.Close()
	proxied.Close()
	stopTPGW(t, p, syscall.SIGTERM)
	sameKernelState(t, tp, before, "after SIGTERM with dns-bypass")
}

// TestDNSBypassOff: without the key, a DIRECT name still gets a fake IP and
// its flows go through tpgw (the gateway's WAN address), and the table has
// no bypass sets.
func TestDNSBypassOff(t *testing.T) {
	requireDNSPeers(t)
	tp := testnet.New(t)
	tp.StartHTTPServer(t, httpPort)
	tp.StartDNSMasq(t, map[string]string{"direct.test": "203.0.113.2"})
	p := startTPGW(t, tp, writeConfig(t, baseConfig(t, []string{"DOMAIN-SUFFIX,direct.test,DIRECT", "MATCH,ss"}, bypassDNSConfig)))
	defer stopTPGW(t, p, syscall.SIGTERM)
	if a := digOne(t, tp, "direct.test", "A"); !fakeRange.Contains(a) {
		t.Fatalf("dig direct.test = %s, want a fake IP with dns-bypass off", a)
	}
	wantSeen(t, tp, "http://direct.test:8080/", "203.0.113.1", "DIRECT through tpgw")
	if table, _, _ := ourRules(t, tp.Gateway); strings.Contains(table, "dns_bypass") || strings.Contains(table, "ct label") {
		t.Fatalf("dns-bypass rules installed with the key off:\n%s", table)
	}
}

// wantSeenVia is wantSeen with a curl option (-4 or -6).
func wantSeenVia(t testing.TB, tp *testnet.Topology, opt, url, want, path string) {
	t.Helper()
	body, err := tp.Curl(t, url, opt)
	if err != nil {
		t.Fatalf("curl %s %s from the client: %v", opt, url, err)
	}
	if got := strings.TrimSpace(body); got != want {
		t.Fatalf("curl %s %s: upstream saw %q, want %q (%s)", opt, url, got, want, path)
	}
	t.Logf("%s %s: upstream saw %s (%s)", opt, url, want, path)
}

// dialClient opens a TCP connection from the client namespace.
func dialClient(t testing.TB, tp *testnet.Topology, addr string) net.Conn {
	t.Helper()
	var c net.Conn
	if err := tp.Client.Do(func() (err error) { c, err = net.DialTimeout("tcp", addr, 5*time.Second); return err }); err != nil {
		t.Fatalf("dial %s from the client: %v", addr, err)
	}
	return c
}

// httpOn sends one keep-alive GET on c and returns the body: the client
// address the upstream saw.
func httpOn(t testing.TB, c net.Conn) string {
	t.Helper()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: direct.test\r\n\r\n"); err != nil {
		t.Fatalf("write request: %v", err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("read response: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("read body: %v", err)
	}
	return strings.TrimSpace(string(body))
}

// TestDNSBypassForwardDrop: a flow dns-bypass hands to the kernel is
// forwarded, so a host firewall whose FORWARD policy is DROP (Docker sets
// it) drops it, where through tpgw it worked. The start warns, naming the
// chain and the rule to add; with that rule the flow goes through.
func TestDNSBypassForwardDrop(t *testing.T) {
	requireDNSPeers(t)
	requireBackend(t, "iptables")
	tp := testnet.New(t)
	tp.StartHTTPServer(t, httpPort)
	tp.StartDNSMasq(t, map[string]string{"direct.test": "203.0.113.2"})
	tp.Gateway.MustRun(t, "iptables", "-P", "FORWARD", "DROP")
	cfg := writeConfig(t, baseConfig(t, []string{"DOMAIN-SUFFIX,direct.test,DIRECT", "MATCH,DIRECT"},
		bypassDNSConfig+fmt.Sprintf("tpgw:\n  state-dir: %s\n  dns-bypass: true\n", t.TempDir())))
	p := startTPGW(t, tp, cfg)
	want := `chain="iptables filter FORWARD" drops_by="policy DROP" forwarded="the flows dns-bypass hands to the kernel; the LAN's traffic while tpgw is down (on-failure: open)" add_to_it="-m connlabel --label 127 -j ACCEPT"`
	if !strings.Contains(p.Output(), want) {
		t.Fatalf("no warning with %s:\n%s", want, p.Output())
	}
	if a := digOne(t, tp, "direct.test", "A"); a != netip.MustParseAddr("203.0.113.2") {
		t.Fatalf("dig direct.test A = %s, want the real 203.0.113.2", a)
	}
	if out, err := tp.Client.Run(t, 10*time.Second, "curl", "-4", "-sS", "--max-time", "2", "--noproxy", "*", "http://direct.test:8080/"); err == nil {
		t.Fatalf("a bypassed flow passed FORWARD DROP: %s", out)
	}
	tp.Gateway.MustRun(t, "iptables", "-I", "FORWARD", "-m", "connlabel", "--label", "127", "-j", "ACCEPT")
	wantSeenVia(t, tp, "-4", "http://direct.test:8080/", "192.168.77.2", "dns-bypass, with the rule the warning named")
	stopTPGW(t, p, syscall.SIGTERM)
}

// TestDNSBypassProxySelfOpenConnection: with proxy-self, a connection the
// gateway itself has open through tpgw stays with tpgw when its address
// joins the dns-bypass set; only its later connections go out directly.
// Unmarked mid-flow, its next segment would leave by the WAN route for a
// server that never saw its SYN (no early demux on the output path).
func TestDNSBypassProxySelfOpenConnection(t *testing.T) {
	requireDNSPeers(t)
	requireBackend(t, "nftables")
	tp := testnet.New(t)
	tp.StartHTTPServer(t, httpPort)
	tp.StartSSServer(t, ssPort, ssPassword, ssMethod)
	tp.StartDNSMasq(t, map[string]string{"direct.test": "203.0.113.2"})
	before := testnet.Snapshot(t, tp.Gateway)
	cfg := writeConfig(t, baseConfig(t, []string{"DOMAIN-SUFFIX,direct.test,DIRECT", "MATCH,ss"},
		bypassDNSConfig+tpgwSection(t, "nftables", "proxy-self: true", "dns-bypass: true")))
	p := runTPGW(t, tp, cfg)

	var c net.Conn
	if err := tp.Gateway.Do(func() (err error) { c, err = net.DialTimeout("tcp", "203.0.113.2:8080", 5*time.Second); return err }); err != nil {
		t.Fatalf("dial from the gateway: %v", err)
	}
	defer c.Close()
	if got := httpOn(t, c); got != "198.51.100.2" {
		t.Fatalf("gateway's own connection (proxy-self, MATCH,ss): upstream saw %q, want ss's 198.51.100.2", got)
	}
	// The address joins the set as the answer to a DIRECT name.
	if a := digAnswer(t, tp.Gateway, "@203.0.113.2", "direct.test"); a != netip.MustParseAddr("203.0.113.2") {
		t.Fatalf("gateway's own dig direct.test = %v, want the real 203.0.113.2", a)
	}
	if out := tp.Gateway.MustRun(t, "nft", "list", "set", "inet", "tpgw", "dns_bypass4"); !strings.Contains(out, "203.0.113.2 timeout") {
		t.Fatalf("203.0.113.2 not in the set:\n%s", out)
	}
	if got := httpOn(t, c); got != "198.51.100.2" {
		t.Fatalf("open connection after its address joined the set: upstream saw %q, want ss's 198.51.100.2", got)
	}
	out, err := tp.Gateway.Run(t, 15*time.Second, "curl", "-sS", "--noproxy", "*", "--max-time", "10", "http://203.0.113.2:8080/")
	if err != nil || strings.TrimSpace(out) != tp.GatewayWAN.String() {
		t.Fatalf("gateway's new connection to the address: upstream saw %q (%v), want the gateway's own %s (not through tpgw)", out, err, tp.GatewayWAN)
	}
	c.Close()
	stopTPGW(t, p, syscall.SIGTERM)
	sameKernelState(t, tp, before, "after SIGTERM")
}

// TestDNSBypassDecidesAsMihomo: names are answered with real addresses only
// when mihomo would send their flows to DIRECT, in two cases where the name
// alone misleads: an AAAA query for a name whose IPv4 address (the one
// mihomo's rules see for a flow to its fake IP) is proxied, and a name that
// mihomo's hosts map to another name (its flows are decided as that one).
func TestDNSBypassDecidesAsMihomo(t *testing.T) {
	requireDNSPeers(t)
	tp := testnet.New(t)
	tp.StartDNSMasq(t, map[string]string{
		"dual.test":       "203.0.113.3,2001:db8:1::3",
		"v6ok.test":       "203.0.113.2,2001:db8:1::2",
		"cdn.direct.test": "203.0.113.2",
		"edge.other.test": "203.0.113.3",
	})
	cfg := writeConfig(t, baseConfig(t, []string{"DOMAIN-SUFFIX,direct.test,DIRECT", "IP-CIDR,203.0.113.3/32,ss", "MATCH,DIRECT"},
		bypassDNSConfig+"hosts:\n  cdn.direct.test: edge.other.test\n"+fmt.Sprintf("tpgw:\n  state-dir: %s\n  dns-bypass: true\n", t.TempDir())))
	p := startTPGW(t, tp, cfg)
	defer stopTPGW(t, p, syscall.SIGTERM)

	// The control: both addresses DIRECT, so both answers are real.
	if a := digOne(t, tp, "v6ok.test", "AAAA"); a != netip.MustParseAddr("2001:db8:1::2") {
		t.Fatalf("dig v6ok.test AAAA = %s, want the real 2001:db8:1::2", a)
	}
	if a := digOne(t, tp, "dual.test", "A"); !fakeRange.Contains(a) {
		t.Errorf("dig dual.test A = %s, want a fake IP (203.0.113.3 is proxied)", a)
	}
	if lines, err := dig(t, tp, "dual.test", "AAAA"); err != nil || strings.Contains(strings.Join(lines, " "), "2001:db8:1::3") {
		t.Errorf("dig dual.test AAAA = %q (%v): the real IPv6 address of a name mihomo proxies", lines, err)
	}
	if a := digOne(t, tp, "cdn.direct.test", "A"); !fakeRange.Contains(a) {
		t.Errorf("dig cdn.direct.test A = %s, want a fake IP (hosts map it to edge.other.test, which is proxied)", a)
	}
	sets := tp.Gateway.MustRun(t, "nft", "list", "set", "inet", "tpgw", "dns_bypass6") +
		tp.Gateway.MustRun(t, "nft", "list", "set", "inet", "tpgw", "dns_bypass4")
	if strings.Contains(sets, "2001:db8:1::3") || strings.Contains(sets, "203.0.113.3") || !strings.Contains(sets, "2001:db8:1::2") {
		t.Errorf("bypass sets:\n%s", sets)
	}
}

// TestDNSBypassProviderUpdate: when a rule provider's contents change while
// tpgw runs (a file provider edited; an http one re-downloaded), the names
// it made DIRECT leave the bypass set, and are decided again.
func TestDNSBypassProviderUpdate(t *testing.T) {
	requireDNSPeers(t)
	tp := testnet.New(t)
	tp.StartDNSMasq(t, map[string]string{"direct.test": "203.0.113.2"})
	cfg := writeConfig(t, baseConfig(t, []string{"RULE-SET,names,DIRECT", "MATCH,ss"},
		bypassDNSConfig+"rule-providers:\n  names: {type: file, path: ./names.yaml, behavior: domain}\n"+
			fmt.Sprintf("tpgw:\n  state-dir: %s\n  dns-bypass: true\n", t.TempDir())))
	names := filepath.Join(filepath.Dir(cfg), "names.yaml")
	if err := os.WriteFile(names, []byte("payload:\n  - '+.direct.test'\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	p := startTPGW(t, tp, cfg)
	defer stopTPGW(t, p, syscall.SIGTERM)
	if a := digOne(t, tp, "direct.test", "A"); a != netip.MustParseAddr("203.0.113.2") {
		t.Fatalf("dig direct.test A = %s, want the real address (RULE-SET names → DIRECT)", a)
	}
	inSet := func() bool {
		return strings.Contains(tp.Gateway.MustRun(t, "nft", "list", "set", "inet", "tpgw", "dns_bypass4"), "203.0.113.2")
	}
	if !inSet() {
		t.Fatal("203.0.113.2 is not in the bypass set")
	}
	if err := os.WriteFile(names, []byte("payload:\n  - '+.other.test'\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if waitFor(t, 15*time.Second, func() (string, bool) { return "emptied", !inSet() }) == "" {
		t.Fatalf("203.0.113.2 stayed in the bypass set after the provider dropped direct.test:\n%s", p.Output())
	}
	if a := digOne(t, tp, "direct.test", "A"); !fakeRange.Contains(a) {
		t.Errorf("dig direct.test A = %s after the provider dropped it, want a fake IP", a)
	}
	if !strings.Contains(p.Output(), "rule providers or geodata updated") {
		t.Errorf("no log line for the emptied sets:\n%s", p.Output())
	}
}
