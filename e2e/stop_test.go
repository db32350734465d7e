package e2e

import (
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tpgw/tpgw/internal/testnet"
	"github.com/tpgw/tpgw/internal/testsrv"
)

// TestStopResetsOpenConnections: when tpgw stops, each connection it relays
// ends with a reset the client sees at once, before the rules go. Closed
// after the rules were gone, it ended with a FIN (a cut-off stream that
// looks complete), and the client's answers to that FIN were routed past
// the relay's socket and dropped, so the socket lingered in the gateway,
// retrying its FIN; until it gave up, a new connection from the same
// client port to the same server had its SYN dropped too (the kernel does
// not forward a packet that belongs to a local socket).
//
// Both paths, DIRECT (spliced, then parked while idle) and ss (mihomo's
// relay), with both backends.
func TestStopResetsOpenConnections(t *testing.T) { testEndResetsOpenConnections(t, syscall.SIGTERM) }

// TestCrashResetsOpenConnections: the same when tpgw dies (kill -9). The
// kernel closes a dead process's sockets; each relayed one is armed to
// reset then, so the client sees the cut, and on-failure: open's watchdog
// then removes the rules. Before, each ended with a FIN as after a stop
// that came too late (above), so a crash left the same lingering sockets.
func TestCrashResetsOpenConnections(t *testing.T) { testEndResetsOpenConnections(t, syscall.SIGKILL) }

func testEndResetsOpenConnections(t *testing.T, sig syscall.Signal) {
	requirePeers(t)
	// With mihomo's sniffer on, mihomo's tunnel relays the flow (tpgw arms
	// the client's side only).
	const sniffer = "sniffer:\n  enable: true\n  sniff:\n    HTTP:\n      ports: [8080]\n      override-destination: false\n"
	for _, c := range []struct{ name, backend, rule, seen, extra string }{
		{"DIRECT", "nftables", "MATCH,DIRECT", "203.0.113.1", ""},
		{"ss", "nftables", "MATCH,ss", "198.51.100.2", ""},
		{"DIRECT-sniffer", "nftables", "MATCH,DIRECT", "203.0.113.1", sniffer},
		{"DIRECT-iptables", "iptables", "MATCH,DIRECT", "203.0.113.1", ""},
		{"ss-iptables", "iptables", "MATCH,ss", "198.51.100.2", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			requireBackend(t, c.backend)
			tp := testnet.New(t)
			tp.StartHTTPServer(t, httpPort)
			tp.StartSSServer(t, ssPort, ssPassword, ssMethod)
			// A router that forwards on its own, so that the client
			// reaches the server once tpgw is gone.
			tp.Gateway.SetSysctl(t, "net.ipv4.ip_forward", "1")
			before := testnet.Snapshot(t, tp.Gateway)
			p := startTPGW(t, tp, writeConfig(t, baseConfig(t, []string{c.rule}, tpgwSection(t, c.backend))+c.extra))

			server := net.JoinHostPort(tp.UpstreamIP.String(), fmt.Sprint(httpPort))
			conn := dialClient(t, tp, server)
			defer conn.Close()
			if got := httpOn(t, conn); got != c.seen {
				t.Fatalf("through tpgw (%s): upstream saw %q, want %q", c.rule, got, c.seen)
			}
			local := conn.LocalAddr().(*net.TCPAddr)
			// An upload in progress: a server that reads until its
			// connection ends must learn that it was cut (DIRECT: it talks
			// to tpgw's socket; behind ss-server it is ss-server's to say).
			var upload <-chan error
			if c.rule == "MATCH,DIRECT" && c.extra == "" {
				upload = startUpload(t, tp)
			}

			stopTPGW(t, p, sig)
			if sig == syscall.SIGKILL {
				if left := waitWatchdogGone(p.Cmd.Process.Pid, 5*time.Second); len(left) > 0 {
					t.Fatalf("watchdog %v still running", left)
				}
			}
			conn.SetReadDeadline(time.Now().Add(3 * time.Second))
			n, err := conn.Read(make([]byte, 1))
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("the open connection after tpgw ended (%v): read %d bytes, %v; want a reset (ECONNRESET)", sig, n, err)
			}
			conn.Close()
			if upload != nil {
				select {
				case err := <-upload:
					if !errors.Is(err, syscall.ECONNRESET) {
						t.Fatalf("the server of an upload in progress after tpgw ended (%v): %v; want a reset (ECONNRESET), not the end of a complete upload", sig, err)
					}
				case <-time.After(5 * time.Second):
					t.Fatalf("the server of an upload in progress saw no end within 5s of tpgw's end (%v)", sig)
				}
			}

			tuple := fmt.Sprintf("%s:%d", tp.ClientIP, local.Port)
			if left := waitFor(t, 3*time.Second, func() (string, bool) {
				out := tp.Gateway.MustRun(t, "ss", "-tanH")
				return "none", !strings.Contains(out, tuple)
			}); left == "" {
				out := tp.Gateway.MustRun(t, "ss", "-tanH")
				t.Fatalf("the gateway still holds a socket for %s after tpgw ended (%v):\n%s", tuple, sig, out)
			}

			// The same client port to the same server again: tpgw is gone,
			// so the kernel forwards it and the upstream sees the client.
			var again net.Conn
			if err := tp.Client.Do(func() (err error) {
				d := net.Dialer{LocalAddr: &net.TCPAddr{IP: local.IP, Port: local.Port}, Timeout: 5 * time.Second}
				again, err = d.Dial("tcp", server)
				return err
			}); err != nil {
				t.Fatalf("a new connection from the same port %d after tpgw stopped: %v", local.Port, err)
			}
			defer again.Close()
			if got := httpOn(t, again); got != tp.ClientIP.String() {
				t.Fatalf("the new connection after tpgw stopped: upstream saw %q, want the client's %s (forwarded)", got, tp.ClientIP)
			}
			if sig == syscall.SIGTERM {
				sameKernelState(t, tp, before, "after SIGTERM")
			}
		})
	}
}

// startUpload opens a connection from the client through tpgw to a server
// in the upstream namespace and keeps writing to it; the channel gets the
// server's read error when the connection ends (nil for a clean EOF). It
// returns once bytes flow.
func startUpload(t *testing.T, tp *testnet.Topology) <-chan error {
	t.Helper()
	var ln net.Listener
	if err := tp.Upstream.Do(func() (err error) { ln, err = net.Listen("tcp", ":9300"); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	got := make(chan error, 1)
	flowing := make(chan struct{})
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- err
			return
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(20 * time.Second))
		buf := make([]byte, 64<<10)
		if _, err := io.ReadFull(c, buf); err != nil {
			got <- err
			return
		}
		close(flowing)
		for err == nil {
			_, err = c.Read(buf)
		}
		if err == io.EOF {
			err = nil
		}
		got <- err
	}()
	up := dialClient(t, tp, net.JoinHostPort(tp.UpstreamIP.String(), "9300"))
	t.Cleanup(func() { up.Close() })
	go func() {
		buf := make([]byte, 64<<10)
		up.SetWriteDeadline(time.Now().Add(20 * time.Second))
		for {
			if _, err := up.Write(buf); err != nil {
				return
			}
		}
	}()
	select {
	case <-flowing:
	case <-time.After(5 * time.Second):
		t.Fatal("no upload through tpgw within 5s")
	}
	return got
}

// TestServerResetReachesClient: a server that aborts a download with a
// reset; through tpgw (DIRECT) the client reads every byte sent before it,
// then the reset, as through a router, not a FIN that would make the cut
// download look complete.
func TestServerResetReachesClient(t *testing.T) {
	tp := testnet.New(t)
	startTPGW(t, tp, writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"}, tpgwSection(t, ""))))
	var ln net.Listener
	if err := tp.Upstream.Do(func() (err error) { ln, err = net.Listen("tcp", ":9301"); return err }); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	body := strings.Repeat("part of a download that is cut short\n", 20000) // 740 KB
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		tc := c.(*net.TCPConn)
		tc.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(tc, body)
		testsrv.WaitSent(tc, 5*time.Second) // tpgw's kernel has every byte
		tc.SetLinger(0)
		tc.Close()
	}()
	conn := dialClient(t, tp, net.JoinHostPort(tp.UpstreamIP.String(), "9301"))
	defer conn.Close()
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	time.Sleep(200 * time.Millisecond) // the rest waits in tpgw's socket
	got, err := io.ReadAll(conn)
	if len(got) != len(body) || !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("client read %d of %d bytes, then %v; want all of them, then a reset (ECONNRESET)", len(got), len(body), err)
	}
}
