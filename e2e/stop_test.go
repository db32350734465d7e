package e2e

import (
	"errors"
	"fmt"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tpgw/tpgw/internal/testnet"
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
func TestStopResetsOpenConnections(t *testing.T) {
	requirePeers(t)
	for _, c := range []struct{ name, backend, rule, seen string }{
		{"DIRECT", "nftables", "MATCH,DIRECT", "203.0.113.1"},
		{"ss", "nftables", "MATCH,ss", "198.51.100.2"},
		{"DIRECT-iptables", "iptables", "MATCH,DIRECT", "203.0.113.1"},
		{"ss-iptables", "iptables", "MATCH,ss", "198.51.100.2"},
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
			p := startTPGW(t, tp, writeConfig(t, baseConfig(t, []string{c.rule}, tpgwSection(t, c.backend))))

			server := net.JoinHostPort(tp.UpstreamIP.String(), fmt.Sprint(httpPort))
			conn := dialClient(t, tp, server)
			defer conn.Close()
			if got := httpOn(t, conn); got != c.seen {
				t.Fatalf("through tpgw (%s): upstream saw %q, want %q", c.rule, got, c.seen)
			}
			local := conn.LocalAddr().(*net.TCPAddr)

			stopTPGW(t, p, syscall.SIGTERM)
			conn.SetReadDeadline(time.Now().Add(3 * time.Second))
			n, err := conn.Read(make([]byte, 1))
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("the open connection after tpgw stopped: read %d bytes, %v; want a reset (ECONNRESET)", n, err)
			}
			conn.Close()

			tuple := fmt.Sprintf("%s:%d", tp.ClientIP, local.Port)
			if left := waitFor(t, 3*time.Second, func() (string, bool) {
				out := tp.Gateway.MustRun(t, "ss", "-tanH")
				return "none", !strings.Contains(out, tuple)
			}); left == "" {
				out := tp.Gateway.MustRun(t, "ss", "-tanH")
				t.Fatalf("the gateway still holds a socket for %s after tpgw stopped:\n%s", tuple, out)
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
			sameKernelState(t, tp, before, "after SIGTERM")
		})
	}
}
