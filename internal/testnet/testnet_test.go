package testnet

import (
	"context"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tpgw/tpgw/internal/testenv"
)

const httpPort = 8080

// The upstream's answer tells the path: kernel forwarding shows the client's
// own address, the gateway's own traffic its WAN address, the proxy's its own.
func TestTopologyPaths(t *testing.T) {
	t.Parallel()
	testenv.RequireTools(t, "curl")
	tp := New(t)
	tp.StartHTTPServer(t, httpPort)

	if got := tp.Gateway.Sysctl(t, "net.ipv4.ip_forward"); got != "0" {
		t.Fatalf("gateway net.ipv4.ip_forward = %q at start, want 0", got)
	}
	if got := tp.Gateway.Sysctl(t, "net.ipv6.conf.all.forwarding"); got != "0" {
		t.Fatalf("gateway net.ipv6.conf.all.forwarding = %q at start, want 0", got)
	}
	// With forwarding off the client cannot reach the upstream.
	if body, err := tp.Curl(t, "http://203.0.113.2:8080/", "--max-time", "1"); err == nil {
		t.Fatalf("client reached the upstream with forwarding off: %q", body)
	}
	tp.Gateway.SetSysctl(t, "net.ipv4.ip_forward", "1")
	tp.Gateway.SetSysctl(t, "net.ipv6.conf.all.forwarding", "1")

	curlFrom := func(ns *NS, url string) string {
		t.Helper()
		out, err := ns.Run(t, 15*time.Second, "curl", "-sS", "--max-time", "10", "--noproxy", "*", url)
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	tests := []struct {
		name string
		get  func(url string) string
		url  string
		want string
	}{
		{"client v4 kernel-forwarded", clientCurl(t, tp), "http://203.0.113.2:8080/", "192.168.77.2\n"},
		{"client v6 kernel-forwarded", clientCurl(t, tp), "http://[2001:db8:1::2]:8080/", "fd77::2\n"},
		{"proxy v4", func(u string) string { return curlFrom(tp.Proxy, u) }, "http://203.0.113.2:8080/", "198.51.100.2\n"},
		{"proxy v6", func(u string) string { return curlFrom(tp.Proxy, u) }, "http://[2001:db8:1::2]:8080/", "2001:db8:2::2\n"},
		{"gateway v4", func(u string) string { return curlFrom(tp.Gateway, u) }, "http://203.0.113.2:8080/", "203.0.113.1\n"},
		{"gateway v6", func(u string) string { return curlFrom(tp.Gateway, u) }, "http://[2001:db8:1::2]:8080/", "2001:db8:1::1\n"},
	}
	for _, tc := range tests {
		if got := tc.get(tc.url); got != tc.want {
			t.Errorf("%s: GET %s = %q, want %q", tc.name, tc.url, got, tc.want)
		}
	}

	body, err := tp.Curl(t, "http://203.0.113.2:8080/bytes?n=100000")
	if err != nil || len(body) != 100000 || strings.Trim(body, "x") != "" {
		t.Errorf("GET /bytes?n=100000: %d bytes, err %v", len(body), err)
	}
	body, err = tp.Curl(t, "http://[2001:db8:1::2]:8080/echo", "--data-binary", "hello tpgw")
	if err != nil || body != "hello tpgw" {
		t.Errorf("POST /echo = %q, %v; want %q", body, err, "hello tpgw")
	}
}

func clientCurl(t *testing.T, tp *Topology) func(string) string {
	return func(url string) string {
		t.Helper()
		body, err := tp.Curl(t, url)
		if err != nil {
			t.Fatal(err)
		}
		return body
	}
}

// The echo comes back from the address it was sent to, so connected sockets
// (which drop datagrams from any other source) receive it, including from the
// proxy, which reaches the upstream's 203.0.113.2 through its 198.51.100.1 side.
func TestUDPEcho(t *testing.T) {
	t.Parallel()
	tp := New(t)
	const port = 5353
	tp.StartUDPEcho(t, port)
	tp.Gateway.SetSysctl(t, "net.ipv4.ip_forward", "1")
	tp.Gateway.SetSysctl(t, "net.ipv6.conf.all.forwarding", "1")

	for _, from := range []*NS{tp.Client, tp.Gateway, tp.Proxy} {
		for _, to := range []string{"203.0.113.2", "2001:db8:1::2"} {
			addr := net.JoinHostPort(to, strconv.Itoa(port))
			var conn net.Conn
			if err := from.Do(func() (err error) {
				conn, err = net.Dial("udp", addr)
				return err
			}); err != nil {
				t.Fatal(err)
			}
			msg := "ping from " + from.Name
			if err := conn.SetDeadline(time.Now().Add(3 * time.Second)); err != nil {
				t.Fatal(err)
			}
			if _, err := conn.Write([]byte(msg)); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 100)
			n, err := conn.Read(buf)
			conn.Close()
			if err != nil || string(buf[:n]) != msg {
				t.Errorf("%s -> %s: echo %q, %v; want %q", from.Name, addr, buf[:n], err, msg)
			}
		}
	}
}

func TestSSServer(t *testing.T) {
	t.Parallel()
	testenv.RequireTools(t, "ss-server")
	tp := New(t)
	p := tp.StartSSServer(t, 8388, "test-password", "chacha20-ietf-poly1305")
	for _, addr := range []string{"198.51.100.2:8388", "[2001:db8:2::2]:8388"} {
		// From the gateway, as tpgw will dial it: through the upstream router.
		if err := WaitTCP(tp.Gateway, addr, 5*time.Second); err != nil {
			t.Errorf("gateway -> ss-server %s: %v\n%s", addr, err, p.Output())
		}
	}
}

func TestDNSMasq(t *testing.T) {
	t.Parallel()
	testenv.RequireTools(t, "dnsmasq", "dig")
	tp := New(t)
	tp.StartDNSMasq(t, map[string]string{
		"example.test": "203.0.113.2,2001:db8:1::2",
		"proxy.test":   "198.51.100.2",
	})
	dig := func(ns *NS, typ, name string) string {
		t.Helper()
		out, err := ns.Run(t, 10*time.Second, "dig", "+short", "+time=2", "+tries=2", "@203.0.113.2", typ, name)
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(out)
	}
	if got := dig(tp.Gateway, "A", "example.test"); got != "203.0.113.2" {
		t.Errorf("gateway: dig A example.test = %q, want 203.0.113.2", got)
	}
	if got := dig(tp.Gateway, "AAAA", "example.test"); got != "2001:db8:1::2" {
		t.Errorf("gateway: dig AAAA example.test = %q, want 2001:db8:1::2", got)
	}
	// The proxy resolves through the upstream too (ss-server's -d).
	if got := dig(tp.Proxy, "A", "proxy.test"); got != "198.51.100.2" {
		t.Errorf("proxy: dig A proxy.test = %q, want 198.51.100.2", got)
	}
	tp.Gateway.SetSysctl(t, "net.ipv4.ip_forward", "1")
	if got := dig(tp.Client, "A", "example.test"); got != "203.0.113.2" {
		t.Errorf("client: dig A example.test = %q, want 203.0.113.2", got)
	}
}

// After a test's cleanup no namespace, /etc/netns entry or process is left.
func TestCleanupRemovesEverything(t *testing.T) {
	t.Parallel()
	testenv.RequireRoot(t)
	var names []string
	var procs []*Proc
	t.Run("topology", func(t *testing.T) {
		tp := New(t)
		for _, ns := range tp.Namespaces() {
			names = append(names, ns.Name)
		}
		procs = append(procs, tp.Upstream.Start(t, "sleep", "300"))
		// A process that ignores SIGTERM must still be gone (SIGKILL after 3s).
		procs = append(procs, tp.Proxy.Start(t, "sh", "-c", "trap '' TERM; sleep 300 & wait"))
		tp.StartHTTPServer(t, httpPort)
		list := tp.Client.MustRun(t, "ip", "netns", "list")
		for _, name := range names {
			if !strings.Contains(list, name) {
				t.Errorf("ip netns list lacks %s while the test runs:\n%s", name, list)
			}
		}
	})
	for i, p := range procs {
		if exited, _ := p.Wait(time.Second); !exited {
			t.Errorf("process %d (%v) still running after cleanup", i, p.Cmd.Args)
		}
		// The process group (the backgrounded sleep) is gone as well, once
		// init has reaped the orphan that got SIGKILL.
		deadline := time.Now().Add(5 * time.Second)
		for syscall.Kill(-p.Cmd.Process.Pid, 0) == nil {
			if time.Now().After(deadline) {
				t.Errorf("process group %d still has members after cleanup", p.Cmd.Process.Pid)
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	ipPath, err := lookTool("ip")
	if err != nil {
		t.Fatal(err)
	}
	outBytes, err := exec.Command(ipPath, "netns", "list").CombinedOutput()
	if err != nil {
		t.Fatalf("ip netns list: %v: %s", err, outBytes)
	}
	out := string(outBytes)
	for _, name := range names {
		if strings.Contains(out, name) {
			t.Errorf("namespace %s left behind:\n%s", name, out)
		}
		if _, err := os.Stat("/etc/netns/" + name); !os.IsNotExist(err) {
			t.Errorf("/etc/netns/%s left behind (stat: %v)", name, err)
		}
	}
}

// A build that stops halfway is undone by the same cleanup.
func TestDestroyAfterPartialBuild(t *testing.T) {
	t.Parallel()
	testenv.RequireRoot(t)
	ipPath, err := lookTool("ip")
	if err != nil {
		testenv.Unavailable(t, "%v", err)
	}
	tp := &Topology{ipPath: ipPath}
	ns, err := tp.newNS("tpgw-partial-"+strconv.Itoa(os.Getpid()), netip.MustParseAddr("192.0.2.1"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat("/run/netns/" + ns.Name); err != nil {
		t.Fatalf("namespace not created: %v", err)
	}
	if err := tp.destroy(); err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{"/run/netns/" + ns.Name, "/etc/netns/" + ns.Name} {
		if _, err := os.Stat(path); !os.IsNotExist(err) {
			t.Errorf("%s left behind (stat: %v)", path, err)
		}
	}
}

func TestNewRegistersNames(t *testing.T) {
	t.Parallel()
	tp := New(t)
	roles := []string{"cli", "gw", "up", "prx"}
	suffix := strings.TrimPrefix(tp.Client.Name, "tpgw-cli-")
	if len(suffix) != 6 {
		t.Fatalf("client namespace %q: want tpgw-cli-<6 hex>", tp.Client.Name)
	}
	for i, ns := range tp.Namespaces() {
		if want := "tpgw-" + roles[i] + "-" + suffix; ns.Name != want {
			t.Errorf("namespace %d = %q, want %q", i, ns.Name, want)
		}
	}
	// Each namespace sees only its own interfaces: nothing leaks to the host.
	links := tp.Gateway.MustRun(t, "ip", "-o", "link", "show")
	for _, want := range []string{"lo:", "lan0@", "wan0@"} {
		if !strings.Contains(links, want) {
			t.Errorf("gateway links lack %q:\n%s", want, links)
		}
	}
	if n := strings.Count(links, "\n"); n != 3 {
		t.Errorf("gateway has %d links, want 3:\n%s", n, links)
	}
}

func TestProcSignalAndWait(t *testing.T) {
	t.Parallel()
	tp := New(t)
	p := tp.Client.Start(t, "sh", "-c", "echo started; exec sleep 300")
	if exited, _ := p.Wait(200 * time.Millisecond); exited {
		t.Fatalf("sleep exited early:\n%s", p.Output())
	}
	if err := p.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	exited, err := p.Wait(5 * time.Second)
	if !exited || err == nil {
		t.Fatalf("after SIGTERM: exited=%v err=%v, want exited with a signal error", exited, err)
	}
	if got := p.Output(); got != "started\n" {
		t.Errorf("Output() = %q, want %q", got, "started\n")
	}
	if err := p.Signal(syscall.SIGTERM); err != os.ErrProcessDone {
		t.Errorf("Signal after exit = %v, want os.ErrProcessDone", err)
	}

	out, err := tp.Client.Run(t, 300*time.Millisecond, "sleep", "5")
	if err == nil || !strings.Contains(err.Error(), "timed out") {
		t.Errorf("Run past its timeout: out %q, err %v; want a timeout error", out, err)
	}
	_, err = tp.Client.Run(t, 5*time.Second, "sh", "-c", "echo oops >&2; exit 3")
	if err == nil || !strings.Contains(err.Error(), "oops") {
		t.Errorf("Run of a failing command: err %v, want it to carry stderr", err)
	}
}

// A snapshot is stable across time and does not see the empty built-in
// tables and chains iptables-nft leaves behind, but does see real rules.
func TestSnapshot(t *testing.T) {
	t.Parallel()
	requireTool(t, "nft")
	requireTool(t, "iptables")
	tp := New(t)
	before := Snapshot(t, tp.Gateway)
	if again := Snapshot(t, tp.Gateway); again != before {
		t.Fatalf("snapshot not stable:\n%s\n---\n%s", before, again)
	}
	for _, want := range []string{"### ip -4 route show table all", "default via 203.0.113.2 dev wan0", "### sysctl net.ipv4.ip_forward\n0\n"} {
		if !strings.Contains(before, want) {
			t.Errorf("snapshot lacks %q:\n%s", want, before)
		}
	}

	tp.Gateway.MustRun(t, "iptables", "-t", "mangle", "-A", "PREROUTING", "-i", "lan0", "-j", "ACCEPT")
	tp.Gateway.SetSysctl(t, "net.ipv4.ip_forward", "1")
	during := Snapshot(t, tp.Gateway)
	if during == before {
		t.Fatal("snapshot did not change with a rule added and ip_forward on")
	}
	if !strings.Contains(during, "-A PREROUTING -i lan0 -j ACCEPT") {
		t.Errorf("snapshot lacks the added rule:\n%s", during)
	}

	tp.Gateway.MustRun(t, "iptables", "-t", "mangle", "-D", "PREROUTING", "-i", "lan0", "-j", "ACCEPT")
	tp.Gateway.SetSysctl(t, "net.ipv4.ip_forward", "0")
	if after := Snapshot(t, tp.Gateway); after != before {
		t.Errorf("snapshot after removing the rule differs:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

func TestNormalizeIPTablesSave(t *testing.T) {
	in := `# Generated by iptables-nft-save v1.8.9 (nf_tables) on Mon Jan  1 00:00:00 2026
*mangle
:PREROUTING ACCEPT [12:720]
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:TPGW - [0:0]
-A PREROUTING -i lan0 -j TPGW
COMMIT
# Completed on Mon Jan  1 00:00:00 2026
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
COMMIT
`
	want := `*mangle
:PREROUTING ACCEPT
:FORWARD DROP
:TPGW -
-A PREROUTING -i lan0 -j TPGW
COMMIT
`
	if got := normalizeIPTablesSave(in); got != want {
		t.Errorf("normalizeIPTablesSave:\n%s\nwant:\n%s", got, want)
	}
}

func TestNormalizeNFT(t *testing.T) {
	in := "# Warning: table ip mangle is managed by iptables-nft, do not touch!\n" +
		"table ip mangle {\n" +
		"\tchain PREROUTING {\n" +
		"\t\ttype filter hook prerouting priority mangle; policy accept;\n" +
		"\t}\n" +
		"}\n" +
		"table ip filter {\n" +
		"\tchain FORWARD {\n" +
		"\t\ttype filter hook forward priority filter; policy accept;\n" +
		"\t\tiifname \"lan0\" counter packets 3 bytes 180 accept\n" +
		"\t}\n" +
		"}\n" +
		"table inet tpgw {\n" +
		"\tchain prerouting {\n" +
		"\t\ttype filter hook prerouting priority mangle; policy accept;\n" +
		"\t}\n" +
		"}\n"
	want := "table ip filter {\n" +
		"\tchain FORWARD {\n" +
		"\t\ttype filter hook forward priority filter; policy accept;\n" +
		"\t\tiifname \"lan0\" counter accept\n" +
		"\t}\n" +
		"}\n" +
		"table inet tpgw {\n" +
		"\tchain prerouting {\n" +
		"\t\ttype filter hook prerouting priority mangle; policy accept;\n" +
		"\t}\n" +
		"}\n"
	if got := normalizeNFT(in); got != want {
		t.Errorf("normalizeNFT:\n%s\nwant:\n%s", got, want)
	}
}

// TestRunCPU: RunCPU reports the CPU time the program itself used (the
// bench's "cores kept busy" rows): a busy loop's (a few hundred ms here, and
// never more than its wall time), a sleep's next to none. CPU amounts, not
// shares of the wall time, so that a loaded host does not fail it.
func TestRunCPU(t *testing.T) {
	t.Parallel()
	tp := New(t)
	start := time.Now()
	_, busy, err := tp.Client.RunCPU(t, 30*time.Second, "sh", "-c", "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done")
	wall := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	if busy < 100*time.Millisecond || busy > wall+50*time.Millisecond {
		t.Fatalf("busy loop: %v of CPU in %v of wall time; want at least 100ms, at most the wall time", busy, wall)
	}
	_, idle, err := tp.Client.RunCPU(t, 30*time.Second, "sleep", "0.3")
	if err != nil {
		t.Fatal(err)
	}
	if idle > 100*time.Millisecond {
		t.Fatalf("sleep 0.3: %v of CPU; want next to none", idle)
	}
	if _, _, err := tp.Client.RunCPU(t, 5*time.Second, "false"); err == nil {
		t.Fatal("false: no error")
	}
}

// rundirChildEnv runs TestNamespacesSurviveIPNetnsAdd's body in the child
// that the test starts in a mount namespace of its own.
const rundirChildEnv = "TPGW_TESTNET_RUNDIR_CHILD"

// On a fresh machine /run/netns is a plain directory until the first
// `ip netns add`, which turns it into a mount point with a recursive bind of
// itself: the namespaces bound there before are copied, and deleting one
// then unmounts only the visible copy, and removing its file fails with
// EBUSY (a CI run of e2e failed so when TestContainers' `ip netns add` ran
// while another test's topology was up, and left its namespaces behind).
// The test makes that fresh state in a mount namespace of its own (slave to
// the host's, so nothing it mounts reaches the host).
func TestNamespacesSurviveIPNetnsAdd(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTools(t, "unshare", "ip")
	if os.Getenv(rundirChildEnv) == "1" {
		rundirChild(t)
		return
	}
	probe := "tpgw-rundir-" + strconv.Itoa(os.Getpid())
	t.Cleanup(func() {
		// A child that died halfway leaves plain files (its mounts died
		// with its mount namespace).
		for _, name := range []string{probe + "-a", probe + "-b"} {
			_ = os.Remove("/run/netns/" + name)
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "unshare", "--mount", "--propagation", "slave",
		os.Args[0], "-test.run", "^TestNamespacesSurviveIPNetnsAdd$", "-test.count", "1", "-test.v")
	cmd.Env = append(os.Environ(), rundirChildEnv+"=1", "TPGW_TESTNET_RUNDIR_PROBE="+probe)
	b, err := cmd.CombinedOutput()
	if out := string(b); err != nil || !strings.Contains(out, "--- PASS: TestNamespacesSurviveIPNetnsAdd") {
		t.Fatalf("child: %v\n%s", err, out)
	}
}

func rundirChild(t *testing.T) {
	probe := os.Getenv("TPGW_TESTNET_RUNDIR_PROBE")
	// The fresh machine's state: /run/netns not a mount point.
	for isMountPoint(t, "/run/netns") {
		if err := syscall.Unmount("/run/netns", syscall.MNT_DETACH); err != nil {
			t.Fatalf("unmount /run/netns in the child's mount namespace: %v", err)
		}
	}
	ipPath, err := lookTool("ip")
	if err != nil {
		t.Fatal(err)
	}
	tp := &Topology{ipPath: ipPath}
	if _, err := tp.newNS(probe+"-a", netip.MustParseAddr("192.0.2.1")); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("ip", "netns", "add", probe+"-b").CombinedOutput(); err != nil {
		_ = tp.destroy()
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	defer func() {
		if out, err := exec.Command("ip", "netns", "delete", probe+"-b").CombinedOutput(); err != nil {
			t.Errorf("ip netns delete: %v: %s", err, out)
		}
	}()
	if err := tp.destroy(); err != nil {
		t.Fatalf("destroy after `ip netns add`: %v", err)
	}
	if _, err := os.Stat("/run/netns/" + probe + "-a"); !os.IsNotExist(err) {
		t.Errorf("/run/netns/%s-a left behind (stat: %v)", probe, err)
	}
}

// isMountPoint tells whether path is a mount point in this process's mount
// namespace.
func isMountPoint(t *testing.T, path string) bool {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == path {
			return true
		}
	}
	return false
}
