package e2e

import (
	"fmt"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tpgw/tpgw/internal/testenv"
	"github.com/tpgw/tpgw/internal/testnet"
)

// TestProxySelf: with proxy-self, the gateway's own connections go through
// tpgw too: an HTTP request made on the gateway itself reaches the upstream
// via the ss-server, within seconds (the engine's own sockets carry the
// routing-mark and are exempt, so there is no loop); the gateway's own DNS
// gets fake IPs, and a fake-ip-filter name still gets dnsmasq's real answer
// (the engine's resolver is exempt too). The LAN keeps working, and SIGTERM
// restores the kernel state.
func TestProxySelf(t *testing.T) {
	requireDNSPeers(t)
	testenv.RequireTools(t, "ping")
	for _, backend := range bothBackends {
		t.Run(backend, func(t *testing.T) {
			requireBackend(t, backend)
			tp := testnet.New(t)
			tp.StartHTTPServer(t, httpPort)
			tp.StartSSServer(t, ssPort, ssPassword, ssMethod)
			tp.StartDNSMasq(t, map[string]string{"web.test": "203.0.113.2", "host.direct.test": "203.0.113.3"})
			before := testnet.Snapshot(t, tp.Gateway)
			cfg := writeConfig(t, baseConfig(t, []string{"MATCH,ss"}, dnsConfig+tpgwSection(t, backend, "proxy-self: true")))
			p := runTPGW(t, tp, cfg)

			for _, url := range []string{"http://203.0.113.2:8080/", "http://[2001:db8:1::2]:8080/"} {
				start := time.Now()
				out, err := tp.Gateway.Run(t, 15*time.Second, "curl", "-sS", "--noproxy", "*", "--max-time", "10", url)
				took := time.Since(start)
				want := "198.51.100.2"
				if strings.Contains(url, "[") {
					want = "2001:db8:2::2"
				}
				if err != nil || strings.TrimSpace(out) != want || took > 5*time.Second {
					t.Fatalf("gateway's own curl %s: upstream saw %q after %v (want %s within 5s): %v\n%s",
						url, strings.TrimSpace(out), took.Round(time.Millisecond), want, err, p.Output())
				}
				t.Logf("gateway's own curl %s: upstream saw %s (via ss) in %v", url, want, took.Round(time.Millisecond))
			}

			// The gateway's own DNS, to any server, is answered by tpgw.
			if a := digAnswer(t, tp.Gateway, "@203.0.113.2", "web.test"); !fakeRange.Contains(a) {
				t.Errorf("gateway's own dig @203.0.113.2 web.test = %v, want a fake IP in %s", a, fakeRange)
			}
			// A fake-ip-filter name is resolved by the engine against dnsmasq:
			// that query must leave the gateway, not loop back into tpgw.
			start := time.Now()
			if a := digAnswer(t, tp.Gateway, "@203.0.113.2", "host.direct.test"); a != netip.MustParseAddr("203.0.113.3") {
				t.Errorf("gateway's own dig host.direct.test = %v after %v, want dnsmasq's 203.0.113.3", a, time.Since(start).Round(time.Millisecond))
			}
			// By name from the gateway: resolv.conf points at dnsmasq, hijacked to a fake IP.
			out, err := tp.Gateway.Run(t, 15*time.Second, "curl", "-sS", "--noproxy", "*", "--max-time", "10", "http://web.test:8080/")
			if err != nil || strings.TrimSpace(out) != "198.51.100.2" {
				t.Errorf("gateway's own curl http://web.test:8080/: %q, %v; want 198.51.100.2", out, err)
			}
			// The gateway's own ping to a name is answered from its fake IP.
			fake := digAnswer(t, tp.Gateway, "@203.0.113.2", "web.test")
			out, err = tp.Gateway.Run(t, 15*time.Second, "ping", "-n", "-c", "2", "-i", "0.2", "-W", "2", "web.test")
			if err != nil || !strings.Contains(out, "2 received") || !strings.Contains(out, fmt.Sprintf("from %s:", fake)) {
				t.Errorf("gateway's own ping web.test: want 2 replies from %s: %v\n%s", fake, err, out)
			}
			// The LAN is unaffected.
			wantSeen(t, tp, "http://203.0.113.2:8080/", "198.51.100.2", "LAN client via ss-server")

			stopTPGW(t, p, syscall.SIGTERM)
			sameKernelState(t, tp, before, "after SIGTERM")
		})
	}
}

// TestProxySelfOnFailureOpen: with proxy-self and on-failure: open, a kill -9
// must not leave the gateway's own traffic marked towards a dead listener:
// the watchdog removes the output divert too, and the gateway's own HTTP
// leaves directly (the upstream sees the WAN address) within 3s.
func TestProxySelfOnFailureOpen(t *testing.T) {
	requirePeers(t)
	for _, backend := range bothBackends {
		t.Run(backend, func(t *testing.T) {
			requireBackend(t, backend)
			tp := testnet.New(t)
			tp.StartHTTPServer(t, httpPort)
			tp.StartSSServer(t, ssPort, ssPassword, ssMethod)
			before := testnet.Snapshot(t, tp.Gateway)
			cfg := writeConfig(t, baseConfig(t, []string{"MATCH,ss"}, tpgwSection(t, backend, "proxy-self: true", "on-failure: open")))
			p := runTPGW(t, tp, cfg)
			gatewayCurl := func() (string, error) {
				out, err := tp.Gateway.Run(t, 5*time.Second, "curl", "-sS", "--noproxy", "*", "--max-time", "1", "http://203.0.113.2:8080/")
				return strings.TrimSpace(out), err
			}
			if got, err := gatewayCurl(); got != "198.51.100.2" {
				t.Fatalf("gateway's own curl while running: %q, %v; want 198.51.100.2 (via ss)", got, err)
			}
			killExpectDirect(t, p, "gateway's own HTTP", func() (string, bool) {
				got, err := gatewayCurl()
				return got, err == nil && got == "203.0.113.1"
			})
			cleanupRestores(t, tp, cfg, before)
		})
	}
}
