package e2e

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tpgw/tpgw/internal/testnet"
)

// TestReloadBypass: SIGHUP applies a changed bypass list while a long
// transfer goes on through tpgw: afterwards the new bypassed destination is
// kernel-forwarded (the upstream sees the client's own address), others
// still go through tpgw, and the transfer completes with every byte. A
// SIGHUP with an invalid config keeps the running one (the log says so) and
// traffic still flows.
func TestReloadBypass(t *testing.T) {
	requirePeers(t)
	const size = 6_000_000
	for _, backend := range bothBackends {
		t.Run(backend, func(t *testing.T) {
			requireBackend(t, backend)
			tp := testnet.New(t)
			tp.StartHTTPServer(t, httpPort)
			tp.Upstream.MustRun(t, "ip", "addr", "add", "203.0.113.3/24", "dev", "eth0")
			before := testnet.Snapshot(t, tp.Gateway)

			section := tpgwSection(t, backend)
			cfg := writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"}, section))
			p := runTPGW(t, tp, cfg)
			wantSeen(t, tp, "http://203.0.113.3:8080/", "203.0.113.1", "not bypassed yet: DIRECT through tpgw")

			// A download read at 4 MB/s that pauses halfway until the reload
			// has been checked: it is mid-flow during the reload, however long
			// the reload takes.
			long := startSlowDownload(t, tp.Client, "203.0.113.2:8080", size, 4_000_000)
			if err := long.waitHalfway(10 * time.Second); err != nil {
				t.Fatal(err)
			}

			bypassed := baseConfig(t, []string{"MATCH,DIRECT"}, section+"  bypass: [203.0.113.3/32]\n")
			if err := os.WriteFile(cfg, []byte(bypassed), 0o600); err != nil {
				t.Fatal(err)
			}
			hup := time.Now()
			reloadTPGW(t, p)
			t.Logf("reloaded %v after SIGHUP", time.Since(hup).Round(time.Millisecond))
			wantSeen(t, tp, "http://203.0.113.3:8080/", "192.168.77.2", "bypassed after the reload: kernel-forwarded")
			wantSeen(t, tp, "http://203.0.113.2:8080/", "203.0.113.1", "still DIRECT through tpgw")

			long.resume()
			got, err := long.wait(20 * time.Second)
			if err != nil || got != size {
				t.Fatalf("long transfer across the reload: got %d of %d bytes: %v", got, size, err)
			}
			t.Logf("long transfer across the reload: %d bytes intact (%v reading, plus the hold)", got, long.took.Round(time.Millisecond))

			// An invalid config: the running one stays.
			if err := os.WriteFile(cfg, []byte(bypassed+"  mark: [1\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := p.Signal(syscall.SIGHUP); err != nil {
				t.Fatal(err)
			}
			if waitFor(t, 10*time.Second, func() (string, bool) {
				return "failed", strings.Contains(p.Output(), "reload failed")
			}) == "" {
				t.Fatalf("no \"reload failed\" log line within 10s of SIGHUP with an invalid config:\n%s", p.Output())
			}
			if exited, _ := p.Wait(0); exited {
				t.Fatalf("tpgw exited on an invalid reload:\n%s", p.Output())
			}
			wantSeen(t, tp, "http://203.0.113.3:8080/", "192.168.77.2", "bypass of the running config still applies")
			wantSeen(t, tp, "http://203.0.113.2:8080/", "203.0.113.1", "still DIRECT through tpgw after a failed reload")

			stopTPGW(t, p, syscall.SIGTERM)
			sameKernelState(t, tp, before, "after SIGTERM")
		})
	}
}

// slowDownload is a GET /bytes?n=N from the upstream's HTTP server, read at
// a fixed rate, that stops reading halfway until resume is called (or 15s
// pass), so that an established flow spans a reload.
type slowDownload struct {
	halfway chan struct{} // closed when half the body has been read
	hold    chan struct{} // closed by resume
	done    chan struct{}
	n       int64         // body bytes read, all 'x'; valid after done
	err     error         // valid after done
	took    time.Duration // valid after done
}

func startSlowDownload(t testing.TB, ns *testnet.NS, addr string, n int64, bytesPerSec int) *slowDownload {
	t.Helper()
	var c net.Conn
	if err := ns.Do(func() (err error) { c, err = net.DialTimeout("tcp", addr, 5*time.Second); return err }); err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	d := &slowDownload{halfway: make(chan struct{}), hold: make(chan struct{}), done: make(chan struct{})}
	t.Cleanup(func() { c.Close(); d.resume(); <-d.done })
	go func() {
		defer close(d.done)
		start := time.Now()
		defer func() { d.took = time.Since(start) }()
		c.SetDeadline(start.Add(30 * time.Second))
		if _, err := fmt.Fprintf(c, "GET /bytes?n=%d HTTP/1.0\r\nHost: %s\r\n\r\n", n, addr); err != nil {
			d.err = err
			return
		}
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			d.err = err
			return
		}
		defer resp.Body.Close()
		buf := make([]byte, 32<<10)
		for {
			k, err := resp.Body.Read(buf)
			if bytes.IndexFunc(buf[:k], func(r rune) bool { return r != 'x' }) >= 0 {
				d.err = fmt.Errorf("corrupt body after %d bytes", d.n)
				return
			}
			d.n += int64(k)
			if d.n >= n/2 && d.n-int64(k) < n/2 {
				close(d.halfway)
				select {
				case <-d.hold:
				case <-time.After(15 * time.Second):
				}
				start = time.Now().Add(-time.Duration(d.n * int64(time.Second) / int64(bytesPerSec)))
			}
			if err == io.EOF {
				return
			}
			if err != nil {
				d.err = err
				return
			}
			// Pace: byte d.n is due at start + d.n/rate.
			if due := start.Add(time.Duration(d.n * int64(time.Second) / int64(bytesPerSec))); time.Until(due) > 0 {
				time.Sleep(time.Until(due))
			}
		}
	}()
	return d
}

// waitHalfway waits until half the body has been read and the download holds.
func (d *slowDownload) waitHalfway(timeout time.Duration) error {
	select {
	case <-d.halfway:
		return nil
	case <-d.done:
		return fmt.Errorf("download ended before halfway: %d bytes, %v", d.n, d.err)
	case <-time.After(timeout):
		return fmt.Errorf("download not halfway after %v", timeout)
	}
}

// resume lets a held download read the rest.
func (d *slowDownload) resume() {
	select {
	case <-d.hold:
	default:
		close(d.hold)
	}
}

// wait returns the bytes read and the error, or an error after timeout.
func (d *slowDownload) wait(timeout time.Duration) (int64, error) {
	select {
	case <-d.done:
		return d.n, d.err
	case <-time.After(timeout):
		return 0, fmt.Errorf("download not finished after %v", timeout)
	}
}

// TestReloadThenCrash: after a SIGHUP reload replaced the rules (iptables:
// new chains renamed into place), a kill -9 with on-failure: open is still
// handled: the watchdog finds the divert of the reloaded rules, the client's
// HTTP flows directly, and `tpgw cleanup` restores the kernel state.
func TestReloadThenCrash(t *testing.T) {
	requirePeers(t)
	for _, backend := range bothBackends {
		t.Run(backend, func(t *testing.T) {
			requireBackend(t, backend)
			tp := testnet.New(t)
			tp.StartHTTPServer(t, httpPort)
			before := testnet.Snapshot(t, tp.Gateway)
			section := tpgwSection(t, backend, "on-failure: open")
			cfg := writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"}, section))
			p := runTPGW(t, tp, cfg)
			if err := os.WriteFile(cfg, []byte(baseConfig(t, []string{"MATCH,DIRECT"}, section+"  bypass: [203.0.113.3/32]\n")), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := p.Signal(syscall.SIGHUP); err != nil {
				t.Fatal(err)
			}
			if err := waitLog(p, "msg=reloaded", 10*time.Second, 20*time.Millisecond); err != nil {
				t.Fatalf("reload: %v\n%s", err, p.Output())
			}
			wantSeen(t, tp, "http://203.0.113.2:8080/", "203.0.113.1", "DIRECT through the reloaded tpgw")
			killExpectDirect(t, p, "client HTTP (after a reload)", clientSeenDirect(t, tp))
			cleanupRestores(t, tp, cfg, before)
		})
	}
}

// TestSideRouterNoRedirects: a side router shares one LAN with the main
// router. A flow it forwards (a bypassed address, dns-bypass, everything
// while tpgw is down with on-failure: open) leaves by the interface it came
// in on, and the kernel then sends the client an ICMP redirect: send to the
// main router itself. Clients that take it (Windows, macOS, Linux with
// accept_redirects) keep it for minutes, and their later flows to the
// address skip the gateway, proxy rules and all, also after a reload or
// after tpgw came back. The gateway sends none while tpgw's rules are in.
func TestSideRouterNoRedirects(t *testing.T) {
	requirePeers(t)
	for _, backend := range bothBackends {
		t.Run(backend, func(t *testing.T) {
			requireBackend(t, backend)
			tp := testnet.New(t)
			tp.StartHTTPServer(t, httpPort)
			// One LAN (bridge br-lan in the gateway) with the client, the
			// gateway (192.168.77.1) and a main router (the upstream
			// namespace, 192.168.77.254), which holds 203.0.113.77.
			gw, up := tp.Gateway, tp.Upstream
			gw.MustRun(t, "ip", "link", "add", "br-lan", "type", "bridge")
			gw.MustRun(t, "ip", "addr", "flush", "dev", "lan0")
			gw.MustRun(t, "ip", "link", "set", "lan0", "master", "br-lan")
			gw.MustRun(t, "ip", "addr", "add", "192.168.77.1/24", "dev", "br-lan")
			gw.MustRun(t, "ip", "link", "add", "mr", "type", "veth", "peer", "name", "mr0", "netns", up.Name)
			gw.MustRun(t, "ip", "link", "set", "mr", "master", "br-lan")
			gw.MustRun(t, "ip", "link", "set", "mr", "up")
			gw.MustRun(t, "ip", "link", "set", "br-lan", "up")
			up.MustRun(t, "ip", "route", "del", "192.168.77.0/24")
			up.MustRun(t, "ip", "addr", "add", "192.168.77.254/24", "dev", "mr0")
			up.MustRun(t, "ip", "link", "set", "mr0", "up")
			up.MustRun(t, "ip", "addr", "add", "203.0.113.77/32", "dev", "lo")
			gw.MustRun(t, "ip", "route", "add", "203.0.113.77/32", "via", "192.168.77.254", "dev", "br-lan")
			before := testnet.Snapshot(t, gw)

			cfg := writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"}, tpgwSection(t, backend)+"  bypass: [203.0.113.77/32]\n"))
			p := runTPGW(t, tp, cfg)
			for i := range 3 {
				wantSeen(t, tp, "http://203.0.113.77:8080/", "192.168.77.2", "bypassed: forwarded to the main router")
				if i < 2 {
					time.Sleep(100 * time.Millisecond) // the kernel spaces redirects to one host 40 ms and more apart
				}
			}
			wantSeen(t, tp, "http://203.0.113.2:8080/", "203.0.113.1", "DIRECT through tpgw")
			if n := icmpCounter(t, tp.Client, "InRedirects"); n != 0 {
				t.Errorf("the client received %d ICMP redirects from the gateway", n)
			}
			stopTPGW(t, p, syscall.SIGTERM)
			sameKernelState(t, tp, before, "after SIGTERM")
		})
	}
}

// icmpCounter reads one Icmp: counter of /proc/net/snmp in ns.
func icmpCounter(t testing.TB, ns *testnet.NS, name string) int {
	t.Helper()
	var head []string
	for l := range strings.Lines(ns.MustRun(t, "cat", "/proc/net/snmp")) {
		f := strings.Fields(l)
		if len(f) == 0 || f[0] != "Icmp:" {
			continue
		}
		if head == nil {
			head = f
			continue
		}
		if i := slices.Index(head, name); i > 0 && i < len(f) {
			n, err := strconv.Atoi(f[i])
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatalf("no Icmp: %s in /proc/net/snmp", name)
	return 0
}

// TestSignalsWhileStarting: a proxy provider whose server answers slowly
// holds tpgw's start (mihomo loads providers before it runs). A SIGHUP in
// that moment (systemd's reload, a script) must not kill tpgw, SIGHUP's
// default action: it starts, then reloads, and traffic flows. A SIGTERM in
// that moment stops it at once, with nothing installed in the kernel.
func TestSignalsWhileStarting(t *testing.T) {
	requirePeers(t)
	tp := testnet.New(t)
	tp.StartHTTPServer(t, httpPort)
	before := testnet.Snapshot(t, tp.Gateway)
	slowConfig := func(holdMS int) string {
		providers := fmt.Sprintf(`proxy-providers:
  slow:
    type: http
    url: http://203.0.113.2:%d/hold?ms=%d
    path: ./providers/slow.yaml
    interval: 0
`, httpPort, holdMS)
		return writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"}, providers+tpgwSection(t, "")))
	}
	const loading = "Start initial provider slow"

	t.Run("SIGTERM", func(t *testing.T) {
		p := tp.Gateway.Start(t, tpgwBin, "run", "-c", slowConfig(30_000))
		if err := waitLog(p, loading, 10*time.Second, 5*time.Millisecond); err != nil {
			t.Fatalf("%v:\n%s", err, p.Output())
		}
		if err := p.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		if exited, _ := p.Wait(5 * time.Second); !exited {
			t.Fatalf("tpgw still starting 5s after SIGTERM:\n%s", p.Output())
		}
		if strings.Contains(p.Output(), "gateway running") {
			t.Fatalf("the start finished before the SIGTERM; the test proved nothing:\n%s", p.Output())
		}
		sameKernelState(t, tp, before, "after a SIGTERM while starting")
	})

	t.Run("SIGHUP", func(t *testing.T) {
		p := tp.Gateway.Start(t, tpgwBin, "run", "-c", slowConfig(1500))
		t.Cleanup(func() {
			if p.Signal(syscall.SIGTERM) == nil {
				p.Wait(15 * time.Second)
			}
		})
		if err := waitLog(p, loading, 10*time.Second, 5*time.Millisecond); err != nil {
			t.Fatalf("%v:\n%s", err, p.Output())
		}
		if err := p.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		if err := waitLog(p, "gateway running", 30*time.Second, 20*time.Millisecond); err != nil {
			t.Fatalf("SIGHUP while starting: %v:\n%s", err, p.Output())
		}
		out := p.Output()
		if strings.Contains(out[:strings.Index(out, "gateway running")], "msg=reloaded") {
			t.Fatalf("reloaded before the gateway ran:\n%s", out)
		}
		if err := waitLog(p, "msg=reloaded", 10*time.Second, 20*time.Millisecond); err != nil {
			t.Fatalf("the SIGHUP sent while starting: %v:\n%s", err, p.Output())
		}
		wantSeen(t, tp, "http://203.0.113.2:8080/", "203.0.113.1", "DIRECT through tpgw, reloaded after a SIGHUP while starting")
		stopTPGW(t, p, syscall.SIGTERM)
		sameKernelState(t, tp, before, "after SIGTERM")
	})
}
