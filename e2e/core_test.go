package e2e

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tpgw/tpgw/bench"
	"github.com/tpgw/tpgw/internal/testenv"
	"github.com/tpgw/tpgw/internal/testnet"
	"github.com/tpgw/tpgw/internal/testsrv"
)

// TestDirect: with MATCH,DIRECT the upstream sees the gateway's WAN address
// (the flow went through tpgw), not the client's (plain forwarding); and a
// SIGTERM leaves the gateway's kernel state exactly as it was.
func TestDirect(t *testing.T) {
	requirePeers(t)
	tp := testnet.New(t)
	tp.StartHTTPServer(t, httpPort)
	startHalfCloseServer(t, tp, 9000)
	before := testnet.Snapshot(t, tp.Gateway)

	p := startTPGW(t, tp, writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"}, "external-controller: 127.0.0.1:9090\n")))
	if got := tp.Gateway.Sysctl(t, "net.ipv4.ip_forward"); got != "1" {
		t.Errorf("ip_forward while running = %s, want 1 (forward: true)", got)
	}
	wantSeen(t, tp, "http://203.0.113.2:8080/", "203.0.113.1", "DIRECT through tpgw")
	wantSeen(t, tp, "http://[2001:db8:1::2]:8080/", "2001:db8:1::1", "DIRECT through tpgw over IPv6")

	// Bulk both ways: 4 MiB posted and echoed back intact.
	body := bytes.Repeat([]byte("0123456789abcdef"), 256*1024)
	checkEcho(t, tp, body)

	// Half-close: the server answers only after the client's FIN arrived.
	got := halfCloseRoundTrip(t, tp, "203.0.113.2:9000", "ping-half-close")
	if got != "read 15 bytes" {
		t.Fatalf("half-close round trip: got %q", got)
	}

	// mihomo's external-controller sees tpgw's flows (dashboards keep working).
	var open net.Conn
	if err := tp.Client.Do(func() (err error) { open, err = net.DialTimeout("tcp", "203.0.113.2:9000", 5*time.Second); return err }); err != nil {
		t.Fatal(err)
	}
	conns := waitFor(t, 5*time.Second, func() (string, bool) {
		out, err := tp.Gateway.Run(t, 5*time.Second, "curl", "-sS", "--max-time", "3", "http://127.0.0.1:9090/connections")
		return out, err == nil && strings.Contains(out, `"destinationIP":"203.0.113.2"`) && strings.Contains(out, `"inboundName":"tpgw-tproxy"`)
	})
	if conns == "" {
		t.Error("external-controller /connections does not list the open flow through tpgw")
	}

	// The flow idles past the engine's half second: tpgw parks it (no
	// goroutine). Data and the client's FIN still wake it, and the answer
	// comes back.
	time.Sleep(time.Second)
	open.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := open.Write([]byte("after idle")); err != nil {
		t.Fatal(err)
	}
	open.(*net.TCPConn).CloseWrite()
	if b, err := io.ReadAll(open); err != nil || string(b) != "read 10 bytes" {
		t.Errorf("a parked flow woken by data and half-close: got %q, %v; want \"read 10 bytes\"", b, err)
	}
	open.Close()

	// Closing a parked flow from the dashboard (DELETE /connections) ends it
	// at once: the client sees the close long before the server's 20 s.
	var idle net.Conn
	if err := tp.Client.Do(func() (err error) { idle, err = net.DialTimeout("tcp", "203.0.113.2:9000", 5*time.Second); return err }); err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	waitFor(t, 5*time.Second, func() (string, bool) {
		out, err := tp.Gateway.Run(t, 5*time.Second, "curl", "-sS", "--max-time", "3", "http://127.0.0.1:9090/connections")
		return out, err == nil && strings.Contains(out, `"destinationPort":"9000"`)
	})
	time.Sleep(time.Second) // parked
	if _, err := tp.Gateway.Run(t, 5*time.Second, "curl", "-sS", "--max-time", "3", "-X", "DELETE", "http://127.0.0.1:9090/connections"); err != nil {
		t.Fatalf("DELETE /connections: %v", err)
	}
	idle.SetReadDeadline(time.Now().Add(5 * time.Second))
	if b, err := io.ReadAll(idle); err != nil || len(b) != 0 {
		t.Errorf("client of a parked flow closed from the dashboard: got %q, %v; want EOF", b, err)
	}

	if !strings.Contains(p.Output(), "match Match using DIRECT") && !strings.Contains(p.Output(), "using DIRECT") {
		t.Errorf("tpgw log does not show the flow's rule decision:\n%s", p.Output())
	}
	stopTPGW(t, p, syscall.SIGTERM)
	sameKernelState(t, tp, before, "after SIGTERM")
	// With tpgw gone and ip_forward restored to 0, the client cannot reach the upstream.
	if _, err := tp.Curl(t, "http://203.0.113.2:8080/", "--max-time", "2"); err == nil {
		t.Error("client still reaches the upstream after tpgw stopped (ip_forward not restored?)")
	}
}

// TestDirectSplices: bulk DIRECT flows through the real binary move with
// splice(2), both ways. strace counts tpgw's system calls during an iperf3
// upload and download: splices carry the data, and the few reads and writes
// are the first bytes of each flow (pumped until it turns bulk) and iperf3's
// control connection.
func TestDirectSplices(t *testing.T) {
	testenv.RequireTools(t, "strace")
	tp, p := startIperfDirect(t)
	defer stopTPGW(t, p, syscall.SIGTERM)
	for _, dir := range []struct{ name, flag string }{{"upload", ""}, {"download", "-R"}} {
		args := []string{"-c", "203.0.113.2", "-p", "5201", "-t", "2", "-J"}
		if dir.flag != "" {
			args = append(args, dir.flag)
		}
		var moved float64
		calls, err := bench.CountSyscalls(p.Cmd.Process.Pid, bench.RelaySyscalls, t.TempDir(), func() error {
			out, err := tp.Client.Run(t, 30*time.Second, "iperf3", args...)
			if err != nil {
				return fmt.Errorf("iperf3: %w\n%s", err, out)
			}
			res, err := bench.ParseIperf([]byte(out), false)
			moved = float64(res.Bytes)
			return err
		})
		if err != nil {
			t.Fatalf("%s: %v", dir.name, err)
		}
		var rw int64
		for name, n := range calls {
			if name != "splice" {
				rw += n
			}
		}
		t.Logf("%s: %.0f MB through tpgw: %d splice, %d read/write-family calls", dir.name, moved/1e6, calls["splice"], rw)
		if moved < 10e6 {
			t.Fatalf("%s moved only %.0f bytes", dir.name, moved)
		}
		if calls["splice"] < 20 || calls["splice"] < 4*rw {
			t.Errorf("%s: %d splice and %d read/write-family calls; want the data spliced (at least 20 splices, 4 per other call)", dir.name, calls["splice"], rw)
		}
	}
}

// TestShadowsocks: rules choose between a real ss-server and DIRECT.
func TestShadowsocks(t *testing.T) {
	requirePeers(t)
	tp := testnet.New(t)
	tp.StartHTTPServer(t, httpPort)
	tp.StartSSServer(t, ssPort, ssPassword, ssMethod)
	// A second upstream address, so one test has two destinations to route.
	tp.Upstream.MustRun(t, "ip", "addr", "add", "203.0.113.3/24", "dev", "eth0")
	before := testnet.Snapshot(t, tp.Gateway)

	t.Run("MATCH to the proxy", func(t *testing.T) {
		p := startTPGW(t, tp, writeConfig(t, baseConfig(t, []string{"MATCH,ss"}, "")))
		wantSeen(t, tp, "http://203.0.113.2:8080/", "198.51.100.2", "via ss-server")
		wantSeen(t, tp, "http://[2001:db8:1::2]:8080/", "2001:db8:2::2", "IPv6 flow via ss-server")
		checkEcho(t, tp, bytes.Repeat([]byte("ss"), 512*1024))
		stopTPGW(t, p, syscall.SIGTERM)
	})
	t.Run("rule order", func(t *testing.T) {
		rules := []string{"IP-CIDR,203.0.113.3/32,ss,no-resolve", "IP-CIDR,203.0.113.0/24,DIRECT,no-resolve", "MATCH,ss"}
		p := startTPGW(t, tp, writeConfig(t, baseConfig(t, rules, "")))
		wantSeen(t, tp, "http://203.0.113.3:8080/", "198.51.100.2", "IP-CIDR → ss")
		wantSeen(t, tp, "http://203.0.113.2:8080/", "203.0.113.1", "IP-CIDR → DIRECT")
		stopTPGW(t, p, syscall.SIGTERM)
	})
	sameKernelState(t, tp, before, "after SIGTERM")
}

// TestCrashRecovery: after kill -9 the rules stay (nothing could remove them);
// a new run replaces them without duplicates and works; `tpgw cleanup`
// restores the pre-start state on its own.
func TestCrashRecovery(t *testing.T) {
	requirePeers(t)
	tp := testnet.New(t)
	tp.StartHTTPServer(t, httpPort)
	before := testnet.Snapshot(t, tp.Gateway)
	cfg := writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"}, ""))

	_, planBefore, _ := tpgwCmd(t, tp.Gateway, "rules", "-c", cfg)
	p := startTPGW(t, tp, cfg)
	table1, nft1, ip1 := ourRules(t, tp.Gateway)
	if nft1 == 0 || ip1 != 2 {
		t.Fatalf("after start: %d nft rules, %d ip rules (want >0 and 2)\n%s", nft1, ip1, table1)
	}
	p.Kill()
	if exited, _ := p.Wait(10 * time.Second); !exited {
		t.Fatal("tpgw survived SIGKILL")
	}
	// Nothing in tpgw could remove its table; with on-failure open the
	// watchdog has only cut the jumps into the divert chain.
	if table, _, _ := ourRules(t, tp.Gateway); table == "" {
		t.Fatalf("after kill -9 expected tpgw's table to be left behind")
	}

	p = startTPGW(t, tp, cfg)
	table2, nft2, ip2 := ourRules(t, tp.Gateway)
	if nft2 != nft1 || ip2 != ip1 || table2 != table1 {
		t.Fatalf("restart after crash: %d/%d nft rules, %d/%d ip rules\n--- first\n%s\n--- second\n%s", nft2, nft1, ip2, ip1, table1, table2)
	}
	_, planAfter, _ := tpgwCmd(t, tp.Gateway, "rules", "-c", cfg)
	if planAfter != planBefore {
		t.Fatalf("plan output changed across the crash")
	}
	wantSeen(t, tp, "http://203.0.113.2:8080/", "203.0.113.1", "DIRECT through the restarted tpgw")
	stopTPGW(t, p, syscall.SIGTERM)
	sameKernelState(t, tp, before, "after the restarted run stopped")

	// Crash again, then clean up by hand.
	p = startTPGW(t, tp, cfg)
	p.Kill()
	p.Wait(10 * time.Second)
	cleanupRestores(t, tp, cfg, before)
	// cleanup with nothing to clean is fine too.
	if code, _, errOut := tpgwCmd(t, tp.Gateway, "cleanup", "-c", cfg); code != 0 {
		t.Fatalf("second cleanup: exit %d: %s", code, errOut)
	}
}

// TestBadConfig: check names the problem; run exits quickly and changes nothing.
func TestBadConfig(t *testing.T) {
	requirePeers(t)
	tp := testnet.New(t)
	before := testnet.Snapshot(t, tp.Gateway)
	state := t.TempDir()
	cases := []struct {
		name, config string
		want         []string
	}{
		{"invalid yaml", "mode: rule\ntpgw:\n  mark: [1\n", []string{"invalid YAML", "config.yaml:2"}},
		{"unknown backend", "tpgw:\n  backend: pf\n", []string{"tpgw.backend", "pf"}},
		{"negative mark", "tpgw:\n  mark: -5\n", []string{"tpgw.mark", "-5"}},
		{"bad cidr", "tpgw:\n  bypass: [10.0.0.0/33]\n", []string{"tpgw.bypass", "10.0.0.0/33"}},
		{"unknown key", "tpgw:\n  interfacez: [eth0]\n", []string{"tpgw.interfacez", "unknown key"}},
		{"unknown proxy in rules", "rules:\n  - MATCH,nope\ntpgw:\n  state-dir: " + state + "\n", []string{"nope"}},
		// mihomo's own inbound on tpgw's TPROXY port: named before anything binds.
		{"mixed-port on tproxy-port", "mixed-port: 7893\nrules:\n  - MATCH,DIRECT\ntpgw:\n  state-dir: " + state + "\n",
			[]string{"config.yaml:1", "mixed-port", "tproxy-port"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := writeConfig(t, tc.config)
			code, _, stderr := tpgwCmd(t, tp.Gateway, "check", "-c", cfg)
			if code == 0 {
				t.Fatalf("check accepted the config")
			}
			lines := strings.Split(strings.TrimSpace(stderr), "\n")
			if len(lines) != 1 {
				t.Errorf("check printed %d lines on stderr, want one:\n%s", len(lines), stderr)
			}
			for _, w := range tc.want {
				if !strings.Contains(stderr, w) {
					t.Errorf("check error %q does not name %q", stderr, w)
				}
			}
			start := time.Now()
			code, _, stderr = tpgwCmd(t, tp.Gateway, "run", "-c", cfg)
			if code == 0 || time.Since(start) > 10*time.Second {
				t.Fatalf("run: exit %d after %v: %s", code, time.Since(start), stderr)
			}
			if after := testnet.Snapshot(t, tp.Gateway); after != before {
				t.Fatalf("kernel state changed by a failed run\n%s", after)
			}
		})
	}

	// A state-dir on a read-only file system (one outside ReadWritePaths
	// under the systemd unit's ProtectSystem=strict) is named before
	// anything starts. The read-only mount is made inside ip netns exec's
	// own mount namespace, so the host never sees it.
	t.Run("state-dir read-only", func(t *testing.T) {
		ro := t.TempDir()
		cfg := writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"}, "tpgw:\n  state-dir: "+ro+"/state\n"))
		for _, cmd := range []string{"check", "run"} {
			out, err := exec.Command("ip", "netns", "exec", tp.Gateway.Name, "sh", "-c",
				`mount -t tmpfs -o ro tpgw-test-ro "$1" && exec timeout 20 "$2" "$3" -c "$4"`,
				"sh", ro, tpgwBin, cmd, cfg).CombinedOutput()
			if err == nil || !strings.Contains(string(out), "config.yaml:") || !strings.Contains(string(out), "tpgw.state-dir: "+ro+"/state cannot be written") ||
				!strings.Contains(string(out), "read-only file system") || !strings.Contains(string(out), "ReadWritePaths") {
				t.Errorf("tpgw %s with state-dir on a read-only mount: %v\n%s", cmd, err, out)
			}
		}
		if after := testnet.Snapshot(t, tp.Gateway); after != before {
			t.Fatalf("kernel state changed by a failed run\n%s", after)
		}
		if mi, err := os.ReadFile("/proc/self/mountinfo"); err != nil || strings.Contains(string(mi), " "+ro+" ") {
			t.Errorf("the read-only mount shows on the host (%v)", err)
		}
	})

	// A start that fails late (the TPROXY port is taken) installs nothing either.
	t.Run("port taken", func(t *testing.T) {
		var ln net.Listener
		if err := tp.Gateway.Do(func() (err error) { ln, err = net.Listen("tcp", ":7893"); return err }); err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		cfg := writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"}, ""))
		code, _, stderr := tpgwCmd(t, tp.Gateway, "run", "-c", cfg)
		if code == 0 || !strings.Contains(stderr, "7893") {
			t.Fatalf("run with the port taken: exit %d, stderr %q", code, stderr)
		}
		if after := testnet.Snapshot(t, tp.Gateway); after != before {
			t.Fatalf("kernel state changed by a failed run\n%s", after)
		}
	})
}

// waitFor polls f until it reports done or the timeout passes; it returns
// f's last value when done, "" otherwise.
func waitFor(t testing.TB, timeout time.Duration, f func() (string, bool)) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		v, ok := f()
		if ok {
			return v
		}
		if time.Now().After(deadline) {
			t.Logf("waitFor: last value %q", v)
			return ""
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func checkEcho(t testing.TB, tp *testnet.Topology, body []byte) {
	t.Helper()
	f := writeConfig(t, string(body)) // any temp file will do
	out, err := tp.Client.Run(t, 60*time.Second, "curl", "-sS", "--noproxy", "*", "--max-time", "30",
		"--data-binary", "@"+f, "-H", "Content-Type: application/octet-stream", "http://203.0.113.2:8080/echo")
	if err != nil {
		t.Fatalf("echo through tpgw: %v", err)
	}
	if out != string(body) {
		t.Fatalf("echo through tpgw: sent %d bytes, got %d back (different)", len(body), len(out))
	}
}

// startHalfCloseServer runs, in the upstream, a TCP server that reads until
// the client's FIN and only then answers "read N bytes".
func startHalfCloseServer(t testing.TB, tp *testnet.Topology, port int) {
	t.Helper()
	var ln net.Listener
	if err := tp.Upstream.Do(func() (err error) { ln, err = net.Listen("tcp", fmt.Sprintf(":%d", port)); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	testsrv.ServeEach(ln, func(c net.Conn) {
		c.SetDeadline(time.Now().Add(20 * time.Second))
		n, _ := io.Copy(io.Discard, c)
		fmt.Fprintf(c, "read %d bytes", n)
	})
}

func halfCloseRoundTrip(t testing.TB, tp *testnet.Topology, addr, msg string) string {
	t.Helper()
	var c net.Conn
	if err := tp.Client.Do(func() (err error) { c, err = net.DialTimeout("tcp", addr, 5*time.Second); return err }); err != nil {
		t.Fatalf("dial %s from the client: %v", addr, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatal(err)
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read after half-close: %v", err)
	}
	return string(b)
}

// TestTunIgnored: a config brought from a desktop client often has mihomo's
// TUN on (tun.enable, or a listener of type tun). tpgw turns it off and says
// so. Before, mihomo's auto-route rules sent every packet of the gateway into
// its own device, and the clients reached nothing.
func TestTunIgnored(t *testing.T) {
	requirePeers(t)
	tp := testnet.New(t)
	tp.StartHTTPServer(t, httpPort)
	before := testnet.Snapshot(t, tp.Gateway)
	rulesBefore := map[string]int{}
	for _, fam := range []string{"-4", "-6"} {
		rulesBefore[fam] = len(strings.Split(strings.TrimSpace(tp.Gateway.MustRun(t, "ip", fam, "rule")), "\n"))
	}
	extra := `tun: {enable: true, stack: system, auto-route: true, auto-detect-interface: true, dns-hijack: ["any:53"]}
listeners:
  - {name: tun-in, type: tun, stack: system, auto-route: true, inet4-address: [198.19.0.1/30]}
  - {name: socks-in, type: socks, port: 17894, listen: 127.0.0.1}
`
	cfg := writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"}, extra))

	code, _, stderr := tpgwCmd(t, tp.Gateway, "check", "-c", cfg)
	if code != 0 {
		t.Fatalf("tpgw check: exit %d\n%s", code, stderr)
	}
	for _, key := range []string{"key=tun.enable", `key="listeners[0] tun-in (type tun)"`} {
		if !strings.Contains(stderr, "config key ignored") || !strings.Contains(stderr, key) {
			t.Errorf("tpgw check: no warning with %s:\n%s", key, stderr)
		}
	}
	if strings.Contains(stderr, "socks-in") {
		t.Errorf("tpgw check warned about the socks listener, which is kept:\n%s", stderr)
	}

	p := startTPGW(t, tp, cfg)
	wantSeen(t, tp, "http://203.0.113.2:8080/", "203.0.113.1", "DIRECT through tpgw, TUN asked for")
	if tuns := tp.Gateway.MustRun(t, "ip", "-br", "link", "show", "type", "tun"); strings.TrimSpace(tuns) != "" {
		t.Errorf("a TUN device appeared:\n%s", tuns)
	}
	// Only tpgw's own policy rule (one per family) beside the kernel's.
	for _, fam := range []string{"-4", "-6"} {
		rules := strings.TrimSpace(tp.Gateway.MustRun(t, "ip", fam, "rule"))
		if n := len(strings.Split(rules, "\n")); n != rulesBefore[fam]+1 {
			t.Errorf("ip %s rule: %d rules, want the %d from before and tpgw's:\n%s", fam, n, rulesBefore[fam], rules)
		}
	}
	if err := testnet.WaitTCP(tp.Gateway, "127.0.0.1:17894", 5*time.Second); err != nil {
		t.Errorf("the socks listener beside it: %v", err)
	}
	stopTPGW(t, p, syscall.SIGTERM)
	sameKernelState(t, tp, before, "after SIGTERM")
}

// TestIPv6Disabled: on a gateway with IPv6 disabled (disable_ipv6=1, a
// common setting) tpgw used to fail at start: the kernel refuses the IPv6
// local route on lo ("permission denied"). With IPv6 off on every interface
// tpgw now intercepts IPv4 only and says so; with it off on lo alone, IPv6
// flows would pass unproxied, so the start fails, names the setting and
// changes nothing.
func TestIPv6Disabled(t *testing.T) {
	requireDNSPeers(t)
	tp := testnet.New(t)
	tp.StartHTTPServer(t, httpPort)
	tp.StartDNSMasq(t, map[string]string{"web.test": "203.0.113.2"})
	cfg := writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"}, dnsConfig))

	tp.Gateway.SetSysctl(t, "net.ipv6.conf.lo.disable_ipv6", "1")
	before := testnet.Snapshot(t, tp.Gateway)
	code, _, stderr := tpgwCmd(t, tp.Gateway, "run", "-c", cfg)
	for _, w := range []string{"net.ipv6.conf.lo.disable_ipv6=1", "lan0", "wan0", "ipv6: false"} {
		if code == 0 || !strings.Contains(stderr, w) {
			t.Errorf("run with IPv6 off on lo only: exit %d, want a failure naming %q:\n%s", code, w, stderr)
		}
	}
	if after := testnet.Snapshot(t, tp.Gateway); after != before {
		t.Fatalf("kernel state changed by a failed run\n%s", after)
	}

	for _, k := range []string{"all", "default", "lan0", "wan0"} {
		tp.Gateway.SetSysctl(t, "net.ipv6.conf."+k+".disable_ipv6", "1")
	}
	before = testnet.Snapshot(t, tp.Gateway)
	p := startTPGW(t, tp, cfg)
	if err := waitLog(p, "intercepting IPv4 only", 5*time.Second, 50*time.Millisecond); err != nil {
		t.Errorf("no word of IPv4 only: %v", err)
	}
	wantSeen(t, tp, "http://203.0.113.2:8080/", "203.0.113.1", "DIRECT through tpgw, IPv6 off")
	if a := digAnswer(t, tp.Client, "@203.0.113.2", "web.test"); !fakeRange.Contains(a) {
		t.Errorf("dig web.test = %v, want a fake IP", a)
	}
	if _, _, ipRules := ourRules(t, tp.Gateway); ipRules != 1 {
		t.Errorf("%d ip rules of tpgw's, want the IPv4 one", ipRules)
	}
	stopTPGW(t, p, syscall.SIGTERM)
	sameKernelState(t, tp, before, "after SIGTERM")
}

// TestMissingInterface: tpgw.interfaces naming an interface the gateway does
// not have (a typo, or one that appears later) is said at check and at start,
// with the interfaces that are there: the LAN's flows otherwise passed
// unproxied without a word.
// TestFakeIPOverlap: a network of the gateway that lies in the fake-ip range
// is named, by interface, by tpgw check and at a start: flows to its hosts
// would be taken for fake IPs. A range clear of it gives no warning.
func TestFakeIPOverlap(t *testing.T) {
	requirePeers(t)
	tp := testnet.New(t)
	tp.Gateway.MustRun(t, "ip", "addr", "add", "198.18.44.1/24", "dev", "lan0")
	wantWarned(t, tp, writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"}, dnsConfig)),
		"dns.fake-ip-range overlaps a network of this host", "network=lan0:198.18.44.0/24")
	clear := writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"}, strings.Replace(dnsConfig, "198.18.0.1/16", "198.19.0.1/16", 1)))
	if code, _, stderr := tpgwCmd(t, tp.Gateway, "check", "-c", clear); code != 0 || strings.Contains(stderr, "fake-ip-range") {
		t.Errorf("tpgw check with a range clear of the host's networks: exit %d\n%s", code, stderr)
	}
}

func TestMissingInterface(t *testing.T) {
	requirePeers(t)
	tp := testnet.New(t)
	cfg := writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"}, "tpgw:\n  interfaces: [lan1, lan0]\n  state-dir: "+t.TempDir()+"\n"))
	wantWarned(t, tp, cfg, "tpgw.interfaces: not on this host", "missing=lan1 ", "interfaces_here=lan0,wan0")
}

// wantWarned checks that tpgw check succeeds with cfg and warns with each
// of want, and that a start says the same.
func wantWarned(t *testing.T, tp *testnet.Topology, cfg string, want ...string) {
	t.Helper()
	code, _, stderr := tpgwCmd(t, tp.Gateway, "check", "-c", cfg)
	for _, w := range want {
		if code != 0 || !strings.Contains(stderr, w) {
			t.Errorf("tpgw check: exit %d, want success and a warning with %q:\n%s", code, w, stderr)
		}
	}
	p := startTPGW(t, tp, cfg)
	for _, w := range want {
		if !strings.Contains(p.Output(), w) {
			t.Errorf("run: no warning with %q:\n%s", w, p.Output())
		}
	}
	stopTPGW(t, p, syscall.SIGTERM)
}

// TestOneGatewayPerNamespace: a second `tpgw run` in the same network
// namespace fails at once and names the running one, which keeps working;
// `tpgw cleanup` refuses to pull a running gateway's rules from under it.
// After a kill -9, a restart right away waits for the dead one's watchdog,
// which must not remove the new gateway's rules.
func TestOneGatewayPerNamespace(t *testing.T) {
	requirePeers(t)
	tp := testnet.New(t)
	tp.StartHTTPServer(t, httpPort)
	before := testnet.Snapshot(t, tp.Gateway)
	cfg := writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"}, ""))
	p := startTPGW(t, tp, cfg)
	pid := fmt.Sprintf("(pid %d)", p.Cmd.Process.Pid)
	table, nft, ip := ourRules(t, tp.Gateway)

	for _, args := range [][]string{{"run", "-c", cfg}, {"cleanup", "-c", cfg}} {
		code, _, stderr := tpgwCmd(t, tp.Gateway, args...)
		if code == 0 || !strings.Contains(stderr, "running in this network namespace") || !strings.Contains(stderr, pid) {
			t.Errorf("tpgw %s beside a running gateway: exit %d, want a failure naming %s:\n%s", args[0], code, pid, stderr)
		}
		if table2, nft2, ip2 := ourRules(t, tp.Gateway); table2 != table || nft2 != nft || ip2 != ip {
			t.Fatalf("tpgw %s changed the running gateway's rules: %d/%d nft, %d/%d ip rules", args[0], nft2, nft, ip2, ip)
		}
	}
	wantSeen(t, tp, "http://203.0.113.2:8080/", "203.0.113.1", "the first gateway, still")

	p.Kill()
	if exited, _ := p.Wait(10 * time.Second); !exited {
		t.Fatal("tpgw survived SIGKILL")
	}
	p = startTPGW(t, tp, cfg)
	time.Sleep(500 * time.Millisecond) // the dead one's watchdog has long finished
	if table2, nft2, ip2 := ourRules(t, tp.Gateway); table2 != table || nft2 != nft || ip2 != ip {
		t.Fatalf("restart after kill -9: %d/%d nft, %d/%d ip rules\n%s", nft2, nft, ip2, ip, table2)
	}
	wantSeen(t, tp, "http://203.0.113.2:8080/", "203.0.113.1", "the restarted gateway")
	stopTPGW(t, p, syscall.SIGTERM)
	sameKernelState(t, tp, before, "after SIGTERM")
}

// TestUnprivileged: run and cleanup without root say so before touching
// anything (they failed at the backend probe with netlink's "operation not
// permitted").
func TestUnprivileged(t *testing.T) {
	requirePeers(t)
	testenv.RequireTools(t, "setpriv")
	tp := testnet.New(t)
	before := testnet.Snapshot(t, tp.Gateway)
	// The binary and the config where nobody can reach them (t.TempDir's
	// parent is private; the checkout may be too).
	dir, err := os.MkdirTemp("", "tpgw-unprivileged-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	bin, cfg := filepath.Join(dir, "tpgw"), filepath.Join(dir, "config.yaml")
	exe, err := os.ReadFile(tpgwBin)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []struct {
		path string
		data []byte
		mode os.FileMode
	}{{bin, exe, 0o755}, {cfg, []byte(baseConfig(t, []string{"MATCH,DIRECT"}, "")), 0o644}} {
		if err := os.WriteFile(f.path, f.data, f.mode); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, cmd := range []string{"run", "cleanup"} {
		_, err := tp.Gateway.Run(t, 20*time.Second, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", bin, cmd, "-c", cfg)
		if err == nil || !strings.Contains(err.Error(), "not privileged") || !strings.Contains(err.Error(), "CAP_NET_ADMIN") {
			t.Errorf("tpgw %s as nobody: %v; want a failure saying it needs root or CAP_NET_ADMIN", cmd, err)
		}
	}
	if after := testnet.Snapshot(t, tp.Gateway); after != before {
		t.Fatalf("kernel state changed by an unprivileged run\n%s", after)
	}
}

// TestOutOfDescriptors: at its descriptor limit the relay's accept loop
// failed at once, again and again (the connection stays queued): it spun a
// core and logged 877,003 warnings in 3 s. Now it backs off, warns once, and
// takes new connections again once descriptors are free.
func TestOutOfDescriptors(t *testing.T) {
	requirePeers(t)
	testenv.RequireTools(t, "prlimit")
	tp := testnet.New(t)
	tp.StartHTTPServer(t, httpPort)
	cfg := writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"}, ""))
	p := tp.Gateway.Start(t, "prlimit", "--nofile=60:60", tpgwBin, "run", "-c", cfg) // prlimit execs tpgw: same PID
	if waitFor(t, 30*time.Second, func() (string, bool) { return "up", strings.Contains(p.Output(), "gateway running") }) == "" {
		t.Fatalf("tpgw did not start:\n%s", p.Output())
	}
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	if err := tp.Client.Do(func() error {
		for range 80 { // 2 descriptors each through tpgw: well past 60
			c, err := net.DialTimeout("tcp", "203.0.113.2:8080", 2*time.Second)
			if err != nil {
				return err
			}
			conns = append(conns, c)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := waitLog(p, "out of file descriptors", 5*time.Second, 50*time.Millisecond); err != nil {
		t.Fatalf("the limit was not reached: %v", err)
	}
	before, err := bench.ProcCPUSeconds(p.Cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * time.Second)
	after, _ := bench.ProcCPUSeconds(p.Cmd.Process.Pid)
	if used := after - before; used > 0.5 {
		t.Errorf("tpgw used %.2f CPU-seconds in 3 s at its descriptor limit, want it waiting", used)
	}
	if n := strings.Count(p.Output(), "out of file descriptors"); n > 2 {
		t.Errorf("%d warnings about the limit, want one per 10 s", n)
	}
	for _, c := range conns {
		c.Close()
	}
	conns = nil
	// The relay frees its descriptors as it sees the closes, and accepts
	// the connections still queued (closed by now) meanwhile: a request
	// that comes while it is at the limit still gets a reset.
	got := waitFor(t, 10*time.Second, func() (string, bool) {
		body, err := tp.Curl(t, "http://203.0.113.2:8080/")
		if err != nil {
			return err.Error(), false
		}
		return strings.TrimSpace(body), true
	})
	if got != "203.0.113.1" {
		t.Fatalf("through tpgw once descriptors are free: upstream saw %q, want 203.0.113.1", got)
	}
	stopTPGW(t, p, syscall.SIGTERM)
}

// TestGlobalIPv6LAN: with tpgw.interfaces empty only LAN sources (private,
// ULA, link-local) are intercepted, so a LAN numbered from a global IPv6
// prefix (the ISP's, on most dual-stack home networks) sends its IPv6 flows
// out unproxied. tpgw check and the start name that network and the key
// that fixes it; with the interface listed, its flows are intercepted.
func TestGlobalIPv6LAN(t *testing.T) {
	requirePeers(t)
	tp := testnet.New(t)
	tp.StartHTTPServer(t, httpPort)
	tp.Client.MustRun(t, "ip", "-6", "addr", "add", "2001:db8:77::2/64", "dev", "eth0", "nodad")
	tp.Gateway.MustRun(t, "ip", "-6", "addr", "add", "2001:db8:77::1/64", "dev", "lan0", "nodad")
	tp.Upstream.MustRun(t, "ip", "-6", "route", "add", "2001:db8:77::/64", "via", "2001:db8:1::1")
	seen := func() string {
		out, err := tp.Client.Run(t, 10*time.Second, "curl", "-sS", "--max-time", "3", "--interface", "2001:db8:77::2", "http://[2001:db8:1::2]:8080/")
		if err != nil {
			t.Fatalf("curl from 2001:db8:77::2: %v", err)
		}
		return strings.TrimSpace(out)
	}

	cfg := writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"}, ""))
	want := []string{"IPv6 clients numbered from these global prefixes are not", "networks=lan0:2001:db8:77::/64\n"}
	code, _, stderr := tpgwCmd(t, tp.Gateway, "check", "-c", cfg)
	p := startTPGW(t, tp, cfg)
	for _, w := range want {
		if code != 0 || !strings.Contains(stderr, w) {
			t.Errorf("tpgw check: exit %d, want success and a warning with %q:\n%s", code, w, stderr)
		}
		if !strings.Contains(p.Output(), w) {
			t.Errorf("run: no warning with %q:\n%s", w, p.Output())
		}
	}
	if strings.Contains(p.Output(), "wan0:") {
		t.Errorf("the warning names the WAN (it holds the default route):\n%s", p.Output())
	}
	if got := seen(); got != "2001:db8:77::2" {
		t.Errorf("interfaces empty: upstream saw %s, want the client's own 2001:db8:77::2 (not intercepted)", got)
	}
	stopTPGW(t, p, syscall.SIGTERM)

	cfg = writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"}, "tpgw:\n  interfaces: [lan0]\n  state-dir: "+t.TempDir()+"\n"))
	p = startTPGW(t, tp, cfg)
	if strings.Contains(p.Output(), want[0]) {
		t.Errorf("a warning with tpgw.interfaces set:\n%s", p.Output())
	}
	if got := seen(); got != "2001:db8:1::1" {
		t.Errorf("interfaces: [lan0]: upstream saw %s, want the gateway's 2001:db8:1::1 (DIRECT through tpgw)", got)
	}
	stopTPGW(t, p, syscall.SIGTERM)
}
