package e2e

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/tpgw/tpgw/internal/testenv"
	"github.com/tpgw/tpgw/internal/testnet"
)

// Docker-style container network inside the gateway namespace.
const (
	ctrBridge     = "docker0"
	ctrBridgeAddr = "172.17.0.1/16"
	ctrSubnet     = "172.17.0.0/16"
	ctrIP         = "172.17.0.2"
	ctrPort       = 80   // the container's HTTP server
	publishedPort = 8081 // published on the gateway's WAN address (DNAT)
)

// bridgeNFSysctls are br_netfilter's switches: 1 on every Docker host.
var bridgeNFSysctls = []string{"net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables"}

// TestContainers: a container behind a bridge of the gateway, with a
// published port, on a gateway that runs tpgw with the default config
// (interfaces: [], so every LAN source is intercepted). With and without
// br_netfilter's bridge-nf-call (the Docker host default is on), and with
// both backends: the published port answers a WAN host, the container's own
// outbound HTTP goes through tpgw (DIRECT: the upstream sees the gateway's WAN
// address; an IP-CIDR rule to ss: the upstream sees the proxy), and after
// SIGTERM the Docker rules are as they were and tpgw's are gone.
func TestContainers(t *testing.T) {
	requirePeers(t)
	testenv.RequireTools(t, "iptables", "iptables-save")
	for _, backend := range []string{"nftables", "iptables"} {
		for _, bridgeNF := range []string{"1", "0"} {
			t.Run(fmt.Sprintf("%s/bridge-nf-call=%s", backend, bridgeNF), func(t *testing.T) {
				testContainers(t, backend, bridgeNF)
			})
		}
	}
}

func testContainers(t *testing.T, backend, bridgeNF string) {
	tp := testnet.New(t)
	tp.StartHTTPServer(t, httpPort)
	tp.StartSSServer(t, ssPort, ssPassword, ssMethod)
	// A second upstream address that the rules send through the proxy.
	tp.Upstream.MustRun(t, "ip", "addr", "add", "203.0.113.3/24", "dev", "eth0")

	ctr := newContainer(t, tp)
	requireBridgeNetfilter(t, tp.Gateway)
	for _, key := range bridgeNFSysctls {
		tp.Gateway.SetSysctl(t, key, bridgeNF)
	}
	installDockerRules(t, tp.Gateway)
	// Docker turns forwarding on; tpgw's forward: true then changes nothing.
	tp.Gateway.SetSysctl(t, "net.ipv4.ip_forward", "1")
	ctr.serveRemoteAddr(t, ctrPort)

	// The setup works on its own: published port and masqueraded outbound.
	wantPublished(t, tp, "before tpgw")
	if got := ctr.curl(t, "http://203.0.113.2:8080/"); got != "203.0.113.1" {
		t.Fatalf("before tpgw: container's outbound HTTP: upstream saw %q, want 203.0.113.1 (masquerade)", got)
	}
	before := testnet.Snapshot(t, tp.Gateway)
	docker := dockerRules(t, tp.Gateway)

	rules := []string{"IP-CIDR,203.0.113.3/32,ss,no-resolve", "MATCH,DIRECT"}
	section := fmt.Sprintf("tpgw:\n  state-dir: %s\n  backend: %s\n", t.TempDir(), backend)
	p := startTPGW(t, tp, writeConfig(t, baseConfig(t, rules, section)))
	if !strings.Contains(p.Output(), backend) {
		t.Errorf("tpgw log does not name the %s backend:\n%s", backend, p.Output())
	}
	for _, key := range bridgeNFSysctls {
		if got := tp.Gateway.Sysctl(t, key); got != "0" {
			t.Errorf("%s while tpgw runs = %s, want 0 (tproxy cannot work at br_netfilter's bridge-layer prerouting)", key, got)
		}
	}

	// (a) The published port still answers the WAN host; the reply of the
	// DNATed connection is not intercepted.
	wantPublished(t, tp, "with tpgw")
	// (b) The container's own outbound HTTP goes through tpgw.
	if got := ctr.curl(t, "http://203.0.113.3:8080/"); got != "198.51.100.2" {
		t.Errorf("container → 203.0.113.3 (IP-CIDR → ss): upstream saw %q, want the proxy 198.51.100.2\ntpgw log:\n%s", got, p.Output())
	}
	if got := ctr.curl(t, "http://203.0.113.2:8080/"); got != "203.0.113.1" {
		t.Errorf("container → 203.0.113.2 (MATCH → DIRECT): upstream saw %q, want 203.0.113.1", got)
	}
	if !strings.Contains(p.Output(), ctrIP) {
		t.Errorf("tpgw log shows no flow from the container %s:\n%s", ctrIP, p.Output())
	}

	// (c) SIGTERM: Docker's rules untouched, tpgw's gone, sysctls restored.
	stopTPGW(t, p, syscall.SIGTERM)
	if got := dockerRules(t, tp.Gateway); got != docker {
		t.Errorf("Docker's rules changed\n--- before\n%s\n--- after\n%s", docker, got)
	}
	if after := testnet.Snapshot(t, tp.Gateway); after != before {
		t.Errorf("kernel state differs after SIGTERM\n--- before\n%s\n--- after\n%s", before, after)
	}
	for _, key := range bridgeNFSysctls {
		if got := tp.Gateway.Sysctl(t, key); got != bridgeNF {
			t.Errorf("%s after tpgw = %s, want %s again", key, got, bridgeNF)
		}
	}
	wantPublished(t, tp, "after tpgw")
}

// wantPublished checks that the WAN host reaches the container through the
// published port, and that the container sees the WAN host's own address.
func wantPublished(t testing.TB, tp *testnet.Topology, when string) {
	t.Helper()
	url := fmt.Sprintf("http://%s:%d/", tp.GatewayWAN, publishedPort)
	out, err := tp.Upstream.Run(t, 10*time.Second, "curl", "-sS", "--max-time", "5", url)
	if err != nil {
		t.Fatalf("%s: WAN host → published port %s: %v", when, url, err)
	}
	if got := strings.TrimSpace(out); got != tp.UpstreamIP.String() {
		t.Fatalf("%s: container behind the published port saw %q, want the WAN host %s", when, got, tp.UpstreamIP)
	}
}

// requireBridgeNetfilter makes sure br_netfilter's sysctls exist in ns:
// they appear in every namespace once the module is loaded (a host-wide load).
func requireBridgeNetfilter(t testing.TB, ns *testnet.NS) {
	t.Helper()
	present := func() bool {
		return ns.Do(func() error { _, err := os.Stat("/proc/sys/net/bridge/bridge-nf-call-iptables"); return err }) == nil
	}
	if present() {
		return
	}
	if out, err := exec.Command("modprobe", "br_netfilter").CombinedOutput(); err != nil {
		t.Fatalf("modprobe br_netfilter: %v: %s", err, out)
	}
	if !present() {
		t.Fatal("br_netfilter loaded, but /proc/sys/net/bridge is missing in the gateway namespace")
	}
}

// installDockerRules adds what dockerd installs for docker0 and one container
// publishing port 80 as publishedPort, with the iptables command Docker uses.
func installDockerRules(t testing.TB, gw *testnet.NS) {
	t.Helper()
	dnatTo := fmt.Sprintf("%s:%d", ctrIP, ctrPort)
	cmds := [][]string{
		{"-t", "nat", "-N", "DOCKER"},
		{"-t", "nat", "-A", "PREROUTING", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "DOCKER"},
		{"-t", "nat", "-A", "OUTPUT", "!", "-d", "127.0.0.0/8", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "DOCKER"},
		{"-t", "nat", "-A", "POSTROUTING", "-s", ctrSubnet, "!", "-o", ctrBridge, "-j", "MASQUERADE"},
		{"-t", "nat", "-A", "DOCKER", "-i", ctrBridge, "-j", "RETURN"},
		{"-t", "nat", "-A", "DOCKER", "-d", "203.0.113.1/32", "!", "-i", ctrBridge, "-p", "tcp", "-m", "tcp", "--dport", fmt.Sprint(publishedPort), "-j", "DNAT", "--to-destination", dnatTo},
		{"-t", "filter", "-N", "DOCKER"},
		{"-t", "filter", "-P", "FORWARD", "DROP"},
		{"-t", "filter", "-A", "FORWARD", "-o", ctrBridge, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"},
		{"-t", "filter", "-A", "FORWARD", "-o", ctrBridge, "-j", "DOCKER"},
		{"-t", "filter", "-A", "FORWARD", "-i", ctrBridge, "!", "-o", ctrBridge, "-j", "ACCEPT"},
		{"-t", "filter", "-A", "FORWARD", "-i", ctrBridge, "-o", ctrBridge, "-j", "ACCEPT"},
		{"-t", "filter", "-A", "DOCKER", "-d", ctrIP + "/32", "!", "-i", ctrBridge, "-o", ctrBridge, "-p", "tcp", "-m", "tcp", "--dport", fmt.Sprint(ctrPort), "-j", "ACCEPT"},
	}
	for _, c := range cmds {
		gw.MustRun(t, "iptables", c...)
	}
}

// dockerRules is the Docker part of the gateway's iptables rules: the DOCKER
// chains and every rule that names docker0 or the container network.
func dockerRules(t testing.TB, gw *testnet.NS) string {
	t.Helper()
	var keep []string
	table := ""
	for _, l := range strings.Split(gw.MustRun(t, "iptables-save"), "\n") {
		l = strings.TrimSpace(counterSuffix(l))
		switch {
		case strings.HasPrefix(l, "*"):
			table = l[1:]
		case strings.Contains(l, "DOCKER") || strings.Contains(l, ctrBridge) || strings.Contains(l, "172.17.") ||
			table == "filter" && strings.HasPrefix(l, ":FORWARD"):
			keep = append(keep, table+": "+l)
		}
	}
	return strings.Join(keep, "\n")
}

// counterSuffix drops iptables-save's "[packets:bytes]" counters.
func counterSuffix(l string) string {
	if i := strings.Index(l, " ["); i >= 0 && strings.HasPrefix(l, ":") {
		return l[:i]
	}
	return l
}

// container is a network namespace behind the gateway's bridge, as Docker
// makes one: eth0 with ctrIP, default route via the bridge address.
type container struct {
	name string
}

func newContainer(t testing.TB, tp *testnet.Topology) *container {
	t.Helper()
	var suffix [3]byte
	if _, err := rand.Read(suffix[:]); err != nil {
		t.Fatal(err)
	}
	c := &container{name: "tpgw-ctr-" + hex.EncodeToString(suffix[:])}
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	run("netns", "add", c.name)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", c.name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", c.name, err, out)
		}
	})
	gw := tp.Gateway.Name
	veth := "veth" + hex.EncodeToString(suffix[:])
	run("-n", c.name, "link", "set", "lo", "up")
	run("-n", gw, "link", "add", ctrBridge, "type", "bridge")
	run("-n", gw, "addr", "add", ctrBridgeAddr, "dev", ctrBridge)
	run("-n", gw, "link", "set", ctrBridge, "up")
	run("-n", gw, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", c.name)
	run("-n", gw, "link", "set", veth, "master", ctrBridge, "up")
	run("-n", c.name, "addr", "add", ctrIP+"/16", "dev", "eth0")
	run("-n", c.name, "link", "set", "eth0", "up")
	run("-n", c.name, "route", "add", "default", "via", "172.17.0.1")
	// Wait until the bridge port forwards (the veth carrier comes up asynchronously).
	deadline := time.Now().Add(10 * time.Second)
	// A refused TCP connection to the bridge address proves the path.
	reachable := func() bool {
		err := c.do(func() error {
			conn, err := net.DialTimeout("tcp4", "172.17.0.1:9", time.Second)
			if err == nil {
				conn.Close()
			}
			return err
		})
		return err == nil || errors.Is(err, syscall.ECONNREFUSED)
	}
	for !reachable() {
		if time.Now().After(deadline) {
			t.Fatalf("container %s cannot reach the bridge address 172.17.0.1", c.name)
		}
		time.Sleep(100 * time.Millisecond)
	}
	return c
}

// do runs fn on a locked OS thread inside the container namespace.
func (c *container) do(fn func() error) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		origin, err := netns.Get()
		if err != nil {
			done <- err
			return
		}
		defer origin.Close()
		h, err := netns.GetFromName(c.name)
		if err != nil {
			done <- err
			return
		}
		defer h.Close()
		if err := netns.Set(h); err != nil {
			done <- err
			return
		}
		ferr := fn()
		if err := netns.Set(origin); err != nil {
			// The thread stays locked and ends with this goroutine.
			done <- errors.Join(ferr, err)
			return
		}
		runtime.UnlockOSThread()
		done <- ferr
	}()
	return <-done
}

// serveRemoteAddr serves HTTP on port in the container, answering every
// request with the remote IP the container sees.
func (c *container) serveRemoteAddr(t testing.TB, port int) {
	t.Helper()
	var ln net.Listener
	if err := c.do(func() (err error) { ln, err = net.Listen("tcp4", fmt.Sprintf(":%d", port)); return err }); err != nil {
		t.Fatalf("listen in container: %v", err)
	}
	srv := &http.Server{
		ReadHeaderTimeout: 5 * time.Second,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			host, _, _ := net.SplitHostPort(r.RemoteAddr)
			fmt.Fprintln(w, host)
		}),
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
}

// curl fetches url from inside the container and returns the trimmed body.
func (c *container) curl(t testing.TB, url string) string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "exec", c.name, "curl", "-sS", "--max-time", "5", url).CombinedOutput()
	if err != nil {
		return fmt.Sprintf("(curl failed: %v: %s)", err, strings.TrimSpace(string(out)))
	}
	return strings.TrimSpace(string(out))
}
