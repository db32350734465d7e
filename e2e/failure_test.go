package e2e

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tpgw/tpgw/internal/testnet"
)

// TestOnFailure: after kill -9, on-failure: open lets client HTTP and DNS
// flow directly within 3s (nftables: tproxy falls through; iptables: the
// watchdog removes the divert), and the watchdog exits; on-failure: closed
// lets nothing through. Either way `tpgw cleanup` restores the gateway's
// kernel state exactly.
func TestOnFailure(t *testing.T) {
	requireDNSPeers(t)
	for _, backend := range bothBackends {
		for _, policy := range []string{"open", "closed"} {
			t.Run(backend+"/"+policy, func(t *testing.T) {
				requireBackend(t, backend)
				tp := testnet.New(t)
				tp.StartHTTPServer(t, httpPort)
				tp.StartDNSMasq(t, map[string]string{"web.test": "203.0.113.2"})
				before := testnet.Snapshot(t, tp.Gateway)
				cfg := writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"}, dnsConfig+tpgwSection(t, backend, "on-failure: "+policy)))
				p := runTPGW(t, tp, cfg)
				pid := p.Cmd.Process.Pid

				wantSeen(t, tp, "http://203.0.113.2:8080/", "203.0.113.1", "DIRECT through tpgw")
				if a := digAnswer(t, tp.Client, "@203.0.113.2", "web.test"); !fakeRange.Contains(a) {
					t.Fatalf("dig web.test while running = %v, want a fake IP", a)
				}
				watchdogs := watchdogPIDs(pid)
				if policy == "open" && len(watchdogs) != 1 {
					t.Fatalf("on-failure open: %d watchdogs of tpgw %d, want 1", len(watchdogs), pid)
				}
				if policy == "closed" && len(watchdogs) != 0 {
					t.Fatalf("on-failure closed: watchdog %v runs, want none", watchdogs)
				}

				p.Kill()
				killed := time.Now()
				if exited, _ := p.Wait(10 * time.Second); !exited {
					t.Fatal("tpgw survived SIGKILL")
				}

				if policy == "open" {
					// Kernel-forwarded: the upstream sees the client's own address.
					seen := waitFor(t, 3*time.Second, func() (string, bool) {
						out, err := tp.Curl(t, "http://203.0.113.2:8080/", "--max-time", "1")
						return strings.TrimSpace(out), err == nil && strings.TrimSpace(out) == "192.168.77.2"
					})
					if seen == "" {
						t.Fatalf("on-failure open: client HTTP not forwarded directly within 3s of kill -9\n%s", p.Output())
					}
					httpAfter := time.Since(killed)
					// DNS reaches dnsmasq itself: the real answer, not a fake IP.
					var ans netip.Addr
					waitFor(t, 3*time.Second, func() (string, bool) {
						ans = digAnswer(t, tp.Client, "@203.0.113.2", "web.test")
						return ans.String(), ans == netip.MustParseAddr("203.0.113.2")
					})
					if ans != netip.MustParseAddr("203.0.113.2") {
						t.Fatalf("on-failure open: dig @203.0.113.2 web.test = %v after kill -9, want dnsmasq's 203.0.113.2", ans)
					}
					t.Logf("on-failure open (%s): HTTP direct %v and DNS direct %v after kill -9",
						backend, httpAfter.Round(time.Millisecond), time.Since(killed).Round(time.Millisecond))
					if left := waitWatchdogGone(pid, 5*time.Second); len(left) > 0 {
						t.Fatalf("watchdog %v still running 5s after tpgw died", left)
					}
					if !strings.Contains(p.Output(), "tpgw died") {
						t.Errorf("watchdog log line missing:\n%s", p.Output())
					}
				} else {
					// Both probes at once, each bounded (curl 3s, dig 2s).
					curlErr := make(chan error, 1)
					go func() {
						out, err := tp.Curl(t, "http://203.0.113.2:8080/", "--max-time", "3")
						if err == nil {
							t.Errorf("on-failure closed: client HTTP got through after kill -9: %q", out)
						}
						curlErr <- err
					}()
					out, err := digIn(t, tp.Client, "@203.0.113.2", "web.test")
					if strings.Contains(out, "->>HEADER<<-") {
						t.Errorf("on-failure closed: DNS answered after kill -9:\n%s", out)
					}
					t.Logf("on-failure closed (%s): after kill -9 HTTP: %v; DNS: %s", backend, <-curlErr, firstLine(out, err))
					if t.Failed() {
						t.FailNow()
					}
				}

				cleanupRestores(t, tp, cfg, before)
			})
		}
	}
}

// TestOnFailureKilledAtOnce: a tpgw killed the moment it reports running
// (before its watchdog process has got far in its own start-up) is still
// watched: the divert goes and the client's HTTP flows directly within 3s.
func TestOnFailureKilledAtOnce(t *testing.T) {
	requirePeers(t)
	for _, backend := range bothBackends {
		t.Run(backend, func(t *testing.T) {
			requireBackend(t, backend)
			tp := testnet.New(t)
			tp.StartHTTPServer(t, httpPort)
			cfg := writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"}, tpgwSection(t, backend, "on-failure: open")))
			for i := range 3 {
				p := tp.Gateway.Start(t, tpgwBin, "run", "-c", cfg)
				// Kill it the moment it says it runs: poll the log every millisecond.
				if waitLog(p, "gateway running", 30*time.Second, time.Millisecond) != nil {
					t.Fatalf("tpgw did not report running:\n%s", p.Output())
				}
				killExpectDirect(t, p, fmt.Sprintf("run %d: client HTTP", i), clientSeenDirect(t, tp))
			}
		})
	}
}

// waitLog polls p's output every interval until it contains s, the process
// exits or timeout passes.
func waitLog(p *testnet.Proc, s string, timeout, interval time.Duration) error {
	deadline := time.Now().Add(timeout)
	for !strings.Contains(p.Output(), s) {
		if exited, _ := p.Wait(0); exited {
			return fmt.Errorf("exited before logging %q", s)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no %q after %v", s, timeout)
		}
		time.Sleep(interval)
	}
	return nil
}
