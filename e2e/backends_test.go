package e2e

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tpgw/tpgw/internal/hostfwtest"
	"github.com/tpgw/tpgw/internal/testenv"
	"github.com/tpgw/tpgw/internal/testnet"
)

// bothBackends are the packet filter backends every kernel-facing behaviour is
// proved with.
var bothBackends = []string{"nftables", "iptables"}

func requireBackend(t testing.TB, backend string) {
	t.Helper()
	if backend == "iptables" {
		testenv.RequireTools(t, "iptables", "ip6tables", "iptables-save", "ip6tables-save")
	}
}

// tpgwSection is a `tpgw:` block with its own state dir, the backend ("" =
// the default) and further "key: value" lines.
func tpgwSection(t testing.TB, backend string, keys ...string) string {
	t.Helper()
	var b strings.Builder
	fmt.Fprintf(&b, "tpgw:\n  state-dir: %s\n", t.TempDir())
	if backend != "" {
		fmt.Fprintf(&b, "  backend: %s\n", backend)
	}
	for _, k := range keys {
		fmt.Fprintf(&b, "  %s\n", k)
	}
	return b.String()
}

// runTPGW is startTPGW that also proves, when the test ends, that no
// `tpgw watchdog` of this run is left: it stops tpgw (SIGTERM) if the test
// has not, then waits (bounded) for its watchdog to be gone.
func runTPGW(t testing.TB, tp *testnet.Topology, cfg string) *testnet.Proc {
	t.Helper()
	p := startTPGW(t, tp, cfg)
	pid := p.Cmd.Process.Pid
	// Registered after the Proc's own cleanup, so it runs before it.
	t.Cleanup(func() {
		if p.Signal(syscall.SIGTERM) == nil {
			p.Wait(15 * time.Second)
		}
		if left := waitWatchdogGone(pid, 5*time.Second); len(left) > 0 {
			for _, w := range left {
				syscall.Kill(w, syscall.SIGKILL)
			}
			t.Errorf("tpgw watchdog %v (watching tpgw %d) still running after tpgw exited", left, pid)
		}
	})
	return p
}

// watchdogPIDs returns the running `tpgw watchdog -pid tpgwPID` processes of
// the binary under test, found in /proc.
func watchdogPIDs(tpgwPID int) []int {
	bins := []string{tpgwBin}
	if real, err := filepath.EvalSymlinks(tpgwBin); err == nil {
		bins = append(bins, real)
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || len(b) == 0 {
			continue // gone, or a zombie
		}
		args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
		if len(args) >= 4 && slices.Contains(bins, args[0]) && args[1] == "watchdog" &&
			slices.Contains(args[2:], strconv.Itoa(tpgwPID)) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// waitWatchdogGone waits up to timeout for tpgw's watchdog to exit and
// returns the ones still running.
func waitWatchdogGone(tpgwPID int, timeout time.Duration) []int {
	deadline := time.Now().Add(timeout)
	for {
		left := watchdogPIDs(tpgwPID)
		if len(left) == 0 || time.Now().After(deadline) {
			return left
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// digIn runs dig in ns and returns its full output (not +short), so callers
// can tell an answer from none at all.
func digIn(t testing.TB, ns *testnet.NS, args ...string) (string, error) {
	t.Helper()
	full := append([]string{"+time=2", "+tries=1"}, args...)
	return ns.Run(t, 10*time.Second, "dig", full...)
}

// digAnswer returns the last address of a +short dig in ns, or an invalid
// address when there is none.
func digAnswer(t testing.TB, ns *testnet.NS, args ...string) netip.Addr {
	t.Helper()
	full := append([]string{"+short", "+time=2", "+tries=1"}, args...)
	out, err := ns.Run(t, 10*time.Second, "dig", full...)
	if err != nil {
		return netip.Addr{}
	}
	lines := strings.Fields(out)
	if len(lines) == 0 {
		return netip.Addr{}
	}
	a, _ := netip.ParseAddr(lines[len(lines)-1])
	return a
}

// TestBackends: the core paths (HTTP DIRECT and via ss-server, v4 and v6,
// UDP echo, fake-ip DNS) work with either packet filter backend; the log
// says which backend runs and why; SIGTERM, and kill -9 followed by
// `tpgw cleanup`, leave the gateway's kernel state exactly as before
// (iptables-save, ip6tables-save, nft ruleset, ip rules, routes, sysctls).
func TestBackends(t *testing.T) {
	requireDNSPeers(t)
	for _, backend := range bothBackends {
		t.Run(backend, func(t *testing.T) {
			requireBackend(t, backend)
			tp := testnet.New(t)
			tp.StartHTTPServer(t, httpPort)
			tp.StartUDPEcho(t, 7000)
			tp.StartSSServer(t, ssPort, ssPassword, ssMethod)
			tp.StartDNSMasq(t, map[string]string{"web.test": "203.0.113.2"})
			// Second upstream addresses, routed to the proxy by rule.
			tp.Upstream.MustRun(t, "ip", "addr", "add", "203.0.113.3/24", "dev", "eth0")
			tp.Upstream.MustRun(t, "ip", "addr", "add", "2001:db8:1::3/64", "dev", "eth0", "nodad")
			before := testnet.Snapshot(t, tp.Gateway)

			rules := []string{"IP-CIDR,203.0.113.3/32,ss,no-resolve", "IP-CIDR6,2001:db8:1::3/128,ss,no-resolve", "MATCH,DIRECT"}
			cfg := writeConfig(t, baseConfig(t, rules, dnsConfig+tpgwSection(t, backend)))
			start := time.Now()
			p := runTPGW(t, tp, cfg)
			t.Logf("%s: running after %v", backend, time.Since(start).Round(time.Millisecond))
			why := map[string]string{"nftables": `why="nftables: configured"`, "iptables": `why="iptables: configured"`}[backend]
			if out := p.Output(); !strings.Contains(out, "backend="+backend) || !strings.Contains(out, why) {
				t.Errorf("log does not say backend=%s and %s:\n%s", backend, why, out)
			}
			checkBackendInKernel(t, tp, backend)

			wantSeen(t, tp, "http://203.0.113.2:8080/", "203.0.113.1", "DIRECT through tpgw")
			wantSeen(t, tp, "http://203.0.113.3:8080/", "198.51.100.2", "IP-CIDR → ss-server")
			wantSeen(t, tp, "http://[2001:db8:1::2]:8080/", "2001:db8:1::1", "IPv6 DIRECT through tpgw")
			wantSeen(t, tp, "http://[2001:db8:1::3]:8080/", "2001:db8:2::2", "IPv6 IP-CIDR6 → ss-server")
			for _, dst := range []string{"203.0.113.2:7000", "203.0.113.3:7000", "[2001:db8:1::2]:7000"} {
				if got := udpEcho(t, tp.Client, netip.MustParseAddrPort(dst), 50); got < 48 {
					t.Errorf("UDP %s: %d of 50 echoed, want ≥ 48", dst, got)
				} else {
					t.Logf("UDP %s: %d/50 echoed", dst, got)
				}
			}
			if a := digOne(t, tp, "@203.0.113.2", "web.test"); !fakeRange.Contains(a) {
				t.Errorf("dig web.test = %s, want a fake IP in %s", a, fakeRange)
			}
			// By name: the fake IP maps back to web.test, DIRECT resolves it with dnsmasq.
			wantSeen(t, tp, "http://web.test:8080/", "203.0.113.1", "by name (fake IP) DIRECT")

			stopTPGW(t, p, syscall.SIGTERM)
			if left := waitWatchdogGone(p.Cmd.Process.Pid, 5*time.Second); len(left) > 0 {
				t.Errorf("watchdog %v still running after a clean exit", left)
			}
			sameKernelState(t, tp, before, "after SIGTERM")

			// kill -9: nothing in tpgw can clean up; `tpgw cleanup` must.
			p = runTPGW(t, tp, cfg)
			wantSeen(t, tp, "http://203.0.113.2:8080/", "203.0.113.1", "DIRECT through the second run")
			p.Kill()
			if exited, _ := p.Wait(10 * time.Second); !exited {
				t.Fatal("tpgw survived SIGKILL")
			}
			// The watchdog (on-failure: open) removes the divert and exits; wait
			// for it so that cleanup does not race with it.
			if left := waitWatchdogGone(p.Cmd.Process.Pid, 5*time.Second); len(left) > 0 {
				t.Fatalf("watchdog %v still running 5s after tpgw was killed", left)
			}
			if after := testnet.Snapshot(t, tp.Gateway); after == before {
				t.Fatalf("kill -9 left nothing behind: the test proves nothing")
			}
			cleanupRestores(t, tp, cfg, before)
		})
	}

	// auto picks nftables on this kernel, and says why.
	t.Run("auto", func(t *testing.T) {
		tp := testnet.New(t)
		tp.StartHTTPServer(t, httpPort)
		before := testnet.Snapshot(t, tp.Gateway)
		p := runTPGW(t, tp, writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"}, tpgwSection(t, "auto"))))
		if out := p.Output(); !strings.Contains(out, "backend=nftables") || !strings.Contains(out, `why="auto: nftables available`) {
			t.Errorf("backend auto: log does not say backend=nftables and why:\n%s", out)
		}
		checkBackendInKernel(t, tp, "nftables")
		wantSeen(t, tp, "http://203.0.113.2:8080/", "203.0.113.1", "DIRECT through tpgw (auto)")
		stopTPGW(t, p, syscall.SIGTERM)
		sameKernelState(t, tp, before, "after SIGTERM")
	})
}

// checkBackendInKernel: the running backend's rules are in the kernel and
// the other backend's are not.
func checkBackendInKernel(t testing.TB, tp *testnet.Topology, backend string) {
	t.Helper()
	table, nftRules, ipRules := ourRules(t, tp.Gateway)
	if ipRules != 2 {
		t.Errorf("%d ip rules at tpgw's priority, want 2 (v4, v6)", ipRules)
	}
	var iptChains []string
	for _, tool := range []string{"iptables-save", "ip6tables-save"} {
		out, err := tp.Gateway.Run(t, 10*time.Second, tool)
		if err != nil && backend == "iptables" {
			t.Fatal(err)
		}
		for l := range strings.Lines(out) {
			if strings.HasPrefix(l, ":TPGW") {
				iptChains = append(iptChains, tool+" "+strings.Fields(l)[0])
			}
		}
	}
	switch backend {
	case "nftables":
		if table == "" || nftRules == 0 || len(iptChains) > 0 {
			t.Errorf("backend nftables: nft table rules %d, iptables chains %v\n%s", nftRules, iptChains, table)
		}
	case "iptables":
		// TPGW, TPGW_DIVERT, v4 and v6 at least.
		if table != "" || len(iptChains) < 4 {
			t.Errorf("backend iptables: nft table inet tpgw present: %v; iptables chains %v", table != "", iptChains)
		}
	}
}

// TestNoOpenProxy: the TPROXY and DNS ports, and transit through the
// gateway, are not an open proxy or resolver for the WAN side; the LAN keeps
// using both. With interfaces unset (LAN known by source address) and with
// interfaces: [lan0], for both backends.
func TestNoOpenProxy(t *testing.T) {
	requireDNSPeers(t)
	for _, backend := range bothBackends {
		for _, ifaces := range []string{"interfaces: []", "interfaces: [lan0]"} {
			t.Run(backend+"/"+ifaces, func(t *testing.T) {
				requireBackend(t, backend)
				tp := testnet.New(t)
				tp.StartHTTPServer(t, httpPort)
				tp.StartDNSMasq(t, map[string]string{"web.test": "203.0.113.2"})
				// A WAN host that routes some internet address via the gateway,
				// hoping it intercepts (and proxies) that too.
				tp.Upstream.MustRun(t, "ip", "route", "add", "9.9.9.9/32", "via", "203.0.113.1")
				cfg := writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"}, dnsConfig+tpgwSection(t, backend, ifaces)))
				p := runTPGW(t, tp, cfg)
				defer stopTPGW(t, p, syscall.SIGTERM)

				// From the LAN: DNS (hijacked and direct to the DNS port) and HTTP work.
				for _, server := range []string{"@192.168.77.1", "@203.0.113.2"} {
					if a := digAnswer(t, tp.Client, server, "web.test"); !fakeRange.Contains(a) {
						t.Errorf("client dig %s web.test = %v, want a fake IP", server, a)
					}
				}
				if a := digAnswer(t, tp.Client, "@192.168.77.1", "-p", "1053", "web.test"); !fakeRange.Contains(a) {
					t.Errorf("client dig @192.168.77.1 -p 1053 web.test = %v, want a fake IP", a)
				}
				wantSeen(t, tp, "http://203.0.113.2:8080/", "203.0.113.1", "LAN client DIRECT through tpgw")

				// From the WAN: nothing accepts. The probes run side by side, each
				// bounded by a 1s timeout.
				var wg sync.WaitGroup
				for _, addr := range []string{"203.0.113.1:7893", "[2001:db8:1::1]:7893", "9.9.9.9:80"} {
					wg.Go(func() {
						var c net.Conn
						err := tp.Upstream.Do(func() (err error) { c, err = net.DialTimeout("tcp", addr, time.Second); return err })
						if err == nil {
							c.Close()
							t.Errorf("WAN: TCP connect to %s accepted (open proxy)", addr)
						} else {
							t.Logf("WAN: TCP connect to %s: %v", addr, err)
						}
					})
				}
				for _, q := range [][]string{
					{"@203.0.113.1", "-p", "1053", "web.test"},
					{"@203.0.113.1", "-p", "1053", "+tcp", "web.test"},
					{"@2001:db8:1::1", "-p", "1053", "web.test"},
					{"@203.0.113.1", "-p", "53", "web.test"},
					{"@9.9.9.9", "web.test"},
				} {
					wg.Go(func() {
						out, err := tp.Upstream.Run(t, 10*time.Second, "dig", append([]string{"+time=1", "+tries=1"}, q...)...)
						if strings.Contains(out, "->>HEADER<<-") {
							t.Errorf("WAN: dig %v got an answer (open resolver):\n%s", q, out)
						} else {
							t.Logf("WAN: dig %v: no answer (%v)", q, firstLine(out, err))
						}
					})
				}
				wg.Wait()
			})
		}
	}
}

func firstLine(out string, err error) string {
	for l := range strings.Lines(out) {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "; <<>>") && !strings.HasPrefix(l, ";; global") {
			return l
		}
	}
	if err != nil {
		return err.Error()
	}
	return ""
}

// TestRulesPutBack: something else takes tpgw's rules out of the kernel
// while it runs (nftables.service starts with `flush ruleset`, a firewall
// reload flushes iptables chains, a network manager deletes ip rules it did
// not make). The LAN's flows then went out unproxied without a word; tpgw now
// puts the rules back within seconds and says so.
func TestRulesPutBack(t *testing.T) {
	requirePeers(t)
	for _, backend := range bothBackends {
		t.Run(backend, func(t *testing.T) {
			requireBackend(t, backend)
			tp := testnet.New(t)
			tp.StartHTTPServer(t, httpPort)
			before := testnet.Snapshot(t, tp.Gateway)
			cfg := writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"}, tpgwSection(t, backend)))
			p := runTPGW(t, tp, cfg)
			table, nft, ip := ourRules(t, tp.Gateway)
			var saved string
			if backend == "iptables" {
				saved = tp.Gateway.MustRun(t, "iptables-save", "-t", "mangle")
			}
			removals := [][][]string{
				{{"ip", "-4", "rule", "del", "priority", "9766"}, {"ip", "-6", "rule", "del", "priority", "9766"}},
				{{"ip", "-4", "route", "flush", "table", "666"}},
			}
			if backend == "nftables" {
				removals = append(removals, [][]string{{"nft", "flush", "ruleset"}})
			} else {
				removals = append(removals, [][]string{{"iptables", "-t", "mangle", "-F"}, {"ip6tables", "-t", "mangle", "-F"}})
			}
			for _, cmds := range removals {
				for _, cmd := range cmds {
					tp.Gateway.MustRun(t, cmd[0], cmd[1:]...)
				}
				// The client's flow now leaves the way the kernel forwards it.
				if got := seenBy(t, tp, "http://203.0.113.2:8080/"); got != "192.168.77.2" && got != "203.0.113.1" {
					t.Fatalf("after %v: upstream saw %q", cmds, got)
				}
				back := waitFor(t, 8*time.Second, func() (string, bool) {
					table2, nft2, ip2 := ourRules(t, tp.Gateway)
					same := table2 == table && nft2 == nft && ip2 == ip
					if backend == "iptables" {
						same = same && stripIPTCounters(tp.Gateway.MustRun(t, "iptables-save", "-t", "mangle")) == stripIPTCounters(saved)
					}
					return "back", same
				})
				if back == "" {
					table2, nft2, ip2 := ourRules(t, tp.Gateway)
					t.Fatalf("after %v: rules not back within 8s: %d/%d nft, %d/%d ip rules\n%s\n%s\n%s", cmds, nft2, nft, ip2, ip, table2,
						tp.Gateway.MustRun(t, "iptables-save", "-t", "mangle"), p.Output())
				}
				wantSeen(t, tp, "http://203.0.113.2:8080/", "203.0.113.1", fmt.Sprintf("through tpgw again after %v", cmds))
			}
			if err := waitLog(p, "put back", 2*time.Second, 50*time.Millisecond); err != nil {
				t.Errorf("no word of the rules put back: %v", err)
			}
			// What was put back goes at the exit like the rest.
			stopTPGW(t, p, syscall.SIGTERM)
			sameKernelState(t, tp, before, "after SIGTERM")
		})
	}
}

// stripIPTCounters drops iptables-save's comment lines and packet counters.
func stripIPTCounters(s string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, "#") {
			continue
		}
		out = append(out, regexp.MustCompile(`\[\d+:\d+\]`).ReplaceAllString(l, ""))
	}
	return strings.Join(out, "\n")
}

// TestHostFirewallDeniesInput: on a host whose firewall denies incoming
// packets in the iptables INPUT chain (ufw's default: established, lo and
// ICMPv6 allowed, policy DROP), the flows tpgw diverts are delivered locally
// as new connections and met that policy: the LAN reached nothing. Both
// backends accept them first (with nftables, in an opening in the iptables
// chain), only them: the TPROXY port stays closed to the WAN. The nftables
// backend's opening is put back when something removes it, and every
// change is gone after SIGTERM.
func TestHostFirewallDeniesInput(t *testing.T) {
	requireDNSPeers(t)
	for _, backend := range bothBackends {
		t.Run(backend, func(t *testing.T) {
			requireBackend(t, "iptables") // the host firewall, with either backend
			tp := testnet.New(t)
			tp.StartHTTPServer(t, httpPort)
			tp.StartUDPEcho(t, 7000)
			tp.StartDNSMasq(t, map[string]string{"web.test": "203.0.113.2"})
			for _, cmd := range []string{"iptables", "ip6tables"} {
				tp.Gateway.MustRun(t, cmd, "-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
				tp.Gateway.MustRun(t, cmd, "-A", "INPUT", "-i", "lo", "-j", "ACCEPT")
				tp.Gateway.MustRun(t, cmd, "-P", "INPUT", "DROP")
			}
			tp.Gateway.MustRun(t, "ip6tables", "-I", "INPUT", "-p", "ipv6-icmp", "-j", "ACCEPT")
			before := testnet.Snapshot(t, tp.Gateway)

			cfg := writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"}, dnsConfig+tpgwSection(t, backend)))
			p := runTPGW(t, tp, cfg)
			for _, cmd := range []string{"iptables", "ip6tables"} {
				rules := strings.Split(tp.Gateway.MustRun(t, cmd, "-S", "INPUT"), "\n")
				if len(rules) < 2 || !strings.HasSuffix(rules[1], "-j TPGW_IN") {
					t.Errorf("%s -S INPUT: the first rule is not the jump to TPGW_IN:\n%s", cmd, strings.Join(rules, "\n"))
				}
			}
			if backend == "nftables" && !strings.Contains(p.Output(), "the packets tpgw diverts are accepted there first") {
				t.Errorf("no log line about the opening:\n%s", p.Output())
			}
			wantSeen(t, tp, "http://203.0.113.2:8080/", "203.0.113.1", "DIRECT through tpgw")
			wantSeen(t, tp, "http://[2001:db8:1::2]:8080/", "2001:db8:1::1", "IPv6 DIRECT through tpgw")
			if got := udpEcho(t, tp.Client, netip.MustParseAddrPort("203.0.113.2:7000"), 20); got < 19 {
				t.Errorf("UDP echo: %d of 20 echoed through tpgw", got)
			}
			if a := digOne(t, tp, "@203.0.113.2", "web.test"); !fakeRange.Contains(a) {
				t.Errorf("dig web.test = %s, want a fake IP in %s", a, fakeRange)
			}
			if out, err := tp.Upstream.Run(t, 5*time.Second, "curl", "-sS", "--max-time", "2", "http://203.0.113.1:7893/"); err == nil {
				t.Errorf("the TPROXY port answered the WAN: %s", out)
			}

			if backend == "nftables" {
				// Something else (ufw reload, a script) removes the opening:
				// tpgw's check every 2 s puts it back.
				tp.Gateway.MustRun(t, "iptables", "-D", "INPUT", "-m", "comment", "--comment", "tpgw", "-j", "TPGW_IN")
				deadline := time.Now().Add(8 * time.Second)
				for !strings.Contains(tp.Gateway.MustRun(t, "iptables", "-S", "INPUT"), "-j TPGW_IN") {
					if time.Now().After(deadline) {
						t.Fatalf("the opening was not put back within 8 s:\n%s", p.Output())
					}
					time.Sleep(200 * time.Millisecond)
				}
				wantSeen(t, tp, "http://203.0.113.2:8080/", "203.0.113.1", "DIRECT through tpgw, opening put back")
			}
			// A reload keeps the accept in place, once.
			reloadTPGW(t, p)
			for _, cmd := range []string{"iptables", "ip6tables"} {
				if n := strings.Count(tp.Gateway.MustRun(t, cmd, "-S", "INPUT"), "-j TPGW_IN"); n != 1 {
					t.Errorf("%s INPUT after a reload: %d jumps to TPGW_IN, want 1", cmd, n)
				}
			}
			wantSeen(t, tp, "http://203.0.113.2:8080/", "203.0.113.1", "DIRECT through tpgw, after a reload")
			stopTPGW(t, p, syscall.SIGTERM)
			sameKernelState(t, tp, before, "after SIGTERM")
		})
	}
	// A firewall written in nftables cannot be opened from tpgw's table:
	// the start warns, naming the chain and the rule to add, and that rule
	// is enough. Two shapes: a chain with policy drop (an nftables.conf),
	// and firewalld's nftables backend, whose filter_INPUT accepts by policy
	// but ends with a reject for what no zone allowed; the warning also
	// names the firewalld command, whose effect (the LAN interface's zone
	// accepts) is emulated here.
	for _, c := range []struct {
		name, setup, want, fix string
		keys                   []string // of the tpgw section
	}{
		{
			name: "nft policy drop",
			setup: `table inet hostfw {
	chain input { type filter hook input priority 0; policy drop;
		ct state established,related accept
		iifname lo accept
	}
}`,
			want: `chain="inet hostfw input" drops_by="policy drop" add_to_it="meta mark 0x29a accept"`,
			fix:  "insert rule inet hostfw input meta mark 0x29a accept",
		},
		{
			name:  "firewalld",
			setup: hostfwtest.Firewalld(""),
			want:  `chain="inet firewalld filter_INPUT" drops_by="last rule: reject" add_to_it="meta mark 0x29a accept" firewalld="firewall-cmd --permanent --zone=trusted --add-interface=lan0 && firewall-cmd --reload"`,
			fix:   `add rule inet firewalld filter_INPUT_dispatch iifname "lan0" accept`,
			keys:  []string{"interfaces: [lan0]"},
		},
	} {
		t.Run(c.name, func(t *testing.T) {
			tp := testnet.New(t)
			tp.StartHTTPServer(t, httpPort)
			ruleset := filepath.Join(t.TempDir(), "hostfw.nft")
			if err := os.WriteFile(ruleset, []byte(c.setup+"\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			tp.Gateway.MustRun(t, "nft", "-f", ruleset)
			cfg := writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"}, tpgwSection(t, "nftables", c.keys...)))
			// tpgw check says it before a start.
			if code, _, stderr := tpgwCmd(t, tp.Gateway, "check", "-c", cfg); code != 0 || !strings.Contains(stderr, c.want) {
				t.Errorf("tpgw check: exit %d, no warning with %s:\n%s", code, c.want, stderr)
			}
			p := runTPGW(t, tp, cfg)
			if !strings.Contains(p.Output(), c.want) {
				t.Fatalf("no warning with %s:\n%s", c.want, p.Output())
			}
			if out, err := tp.Client.Run(t, 10*time.Second, "curl", "-sS", "--max-time", "2", "--noproxy", "*", "http://203.0.113.2:8080/"); err == nil {
				t.Fatalf("reached the upstream through a firewall that drops the diverted packets: %s", out)
			}
			tp.Gateway.MustRun(t, "nft", c.fix)
			wantSeen(t, tp, "http://203.0.113.2:8080/", "203.0.113.1", "DIRECT through tpgw, with the rule the warning named")
			stopTPGW(t, p, syscall.SIGTERM)
		})
	}
	// OpenWrt's fw4 drops by policy but accepts whatever comes in on the LAN
	// zone: no warning there, and the flows go through from the start.
	t.Run("fw4 accepts the LAN", func(t *testing.T) {
		tp := testnet.New(t)
		tp.StartHTTPServer(t, httpPort)
		ruleset := filepath.Join(t.TempDir(), "fw4.nft")
		if err := os.WriteFile(ruleset, []byte(hostfwtest.FW4), 0o600); err != nil {
			t.Fatal(err)
		}
		tp.Gateway.MustRun(t, "nft", "-f", ruleset)
		cfg := writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"}, tpgwSection(t, "nftables", "interfaces: [lan0]")))
		p := runTPGW(t, tp, cfg)
		wantSeen(t, tp, "http://203.0.113.2:8080/", "203.0.113.1", "DIRECT through tpgw, behind fw4")
		if strings.Contains(p.Output(), `chain="inet fw4 input"`) {
			t.Errorf("warned about fw4, which accepts the LAN:\n%s", p.Output())
		}
		stopTPGW(t, p, syscall.SIGTERM)
	})
}

// TestHostFirewallLater: a host firewall switched on while tpgw runs
// (`ufw enable` after tpgw started at boot) no longer leaves the LAN with
// nothing until a restart. With nftables, tpgw's check opens iptables'
// INPUT chain once it filters, within seconds, and warns about an nftables
// chain that drops by default, once. The opening goes with tpgw's exit.
func TestHostFirewallLater(t *testing.T) {
	requirePeers(t)
	testenv.RequireTools(t, "iptables", "nft")
	tp := testnet.New(t)
	tp.StartHTTPServer(t, httpPort)
	cfg := writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"}, tpgwSection(t, "nftables")))
	p := runTPGW(t, tp, cfg)
	wantSeen(t, tp, "http://203.0.113.2:8080/", "203.0.113.1", "DIRECT through tpgw, no host firewall")

	// What ufw enable leaves in INPUT, in short.
	for _, args := range [][]string{
		{"-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"},
		{"-A", "INPUT", "-i", "lo", "-j", "ACCEPT"},
		{"-P", "INPUT", "DROP"},
	} {
		tp.Gateway.MustRun(t, "iptables", args...)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		out, err := tp.Client.Run(t, 10*time.Second, "curl", "-sS", "--max-time", "1", "--noproxy", "*", "http://203.0.113.2:8080/")
		if err == nil && strings.TrimSpace(out) == "203.0.113.1" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the LAN reaches nothing 10 s after the host firewall came up:\n%s", p.Output())
		}
		time.Sleep(200 * time.Millisecond)
	}
	if !strings.Contains(p.Output(), "the host's iptables INPUT chain filters incoming packets") {
		t.Errorf("the opening is not logged:\n%s", p.Output())
	}

	tp.Gateway.MustRun(t, "nft", "add table inet latefw; add chain inet latefw input { type filter hook input priority 0; policy drop; }; add rule inet latefw input ct state established,related accept")
	want := `chain="inet latefw input" drops_by="policy drop"`
	deadline = time.Now().Add(10 * time.Second)
	for !strings.Contains(p.Output(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("no warning with %s 10 s after the chain came:\n%s", want, p.Output())
		}
		time.Sleep(200 * time.Millisecond)
	}
	time.Sleep(5 * time.Second) // two more checks
	if n := strings.Count(p.Output(), want); n != 1 {
		t.Errorf("warned %d times about the same chain, want once", n)
	}
	stopTPGW(t, p, syscall.SIGTERM)
	if out := tp.Gateway.MustRun(t, "iptables", "-S"); strings.Contains(out, "TPGW") {
		t.Errorf("the opening is left after tpgw's exit:\n%s", out)
	}
}
