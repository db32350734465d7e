package engine

import (
	"bufio"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/metacubex/mihomo/tunnel/statistic"
)

// The engine holds mihomo's process-wide state, so the tests in this package
// share one running engine started in TestMain.
var testEngine *Engine

const testConfig = `
mode: rule
log-level: warning
tproxy-port: 7893
dns:
  enable: true
  listen: 127.0.0.1:1053
  enhanced-mode: fake-ip
  fake-ip-range: 198.18.0.1/16
  nameserver: [127.0.0.1:1]
proxies:
  - name: nowhere
    type: socks5
    server: 127.0.0.1
    port: 1
rules:
  - IP-CIDR,127.0.0.2/32,REJECT
  - MATCH,DIRECT
`

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "tpgw-engine")
	if err != nil {
		panic(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	testEngine, err = Start([]byte(testConfig), Options{HomeDir: dir, Logger: log})
	if err != nil {
		panic(err)
	}
	code := m.Run()
	testEngine.Close()
	os.RemoveAll(dir)
	os.Exit(code)
}

func TestOnlyOneEngine(t *testing.T) {
	_, err := Start([]byte(testConfig), Options{HomeDir: t.TempDir()})
	if err == nil || !strings.Contains(err.Error(), "already running") {
		t.Fatalf("second Start: %v", err)
	}
}

// TestHandleTCPDirect hands a flow to mihomo as the relay does and checks the
// bytes reach the destination and come back, with half-close: the server
// answers only after it has read the client's EOF.
func TestHandleTCPDirect(t *testing.T) {
	dst := serveOne(t, func(c net.Conn) {
		b, _ := io.ReadAll(c) // until the client's FIN
		c.Write([]byte("got " + string(b)))
	})
	client, inbound := tcpPair(t)
	done := relayAsync(inbound, client, dst)
	client.Write([]byte("hello"))
	client.(*net.TCPConn).CloseWrite()
	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, err := io.ReadAll(client)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != "got hello" {
		t.Fatalf("got %q", got)
	}
	waitDone(t, done)
}

// serveOne listens on loopback, hands the first connection to handle (and
// closes it after), and returns the address: the destination of a flow.
func serveOne(t *testing.T, handle func(net.Conn)) netip.AddrPort {
	t.Helper()
	srv, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	go func() {
		c, err := srv.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		handle(c)
	}()
	return srv.Addr().(*net.TCPAddr).AddrPort()
}

// relayAsync hands inbound (the accepted side of client) to the engine as
// the relay does, towards dst; the channel closes when the flow has ended:
// HandleTCP has returned (early for a DIRECT flow, which goes on without
// it) and the flow has left mihomo's connection statistics.
func relayAsync(inbound, client net.Conn, dst netip.AddrPort) <-chan struct{} {
	done := make(chan struct{})
	src := client.LocalAddr().(*net.TCPAddr).AddrPort()
	go func() {
		testEngine.HandleTCP(inbound, src, dst)
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
			if !tracked(src) {
				break
			}
		}
		close(done)
	}()
	return done
}

// tracked reports whether mihomo's statistics hold a connection from src.
func tracked(src netip.AddrPort) bool {
	found := false
	statistic.DefaultManager.Range(func(c statistic.Tracker) bool {
		md := c.Info().Metadata
		found = md.SrcPort == src.Port() && md.SrcIP == src.Addr().Unmap()
		return !found
	})
	return found
}

// waitDone fails the test unless HandleTCP returns within 5 s.
func waitDone(t *testing.T, done <-chan struct{}) {
	t.Helper()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("HandleTCP did not return after both sides closed")
	}
}

func TestHandleTCPRejectRule(t *testing.T) {
	client, inbound := tcpPair(t)
	done := make(chan struct{})
	go func() {
		testEngine.HandleTCP(inbound, netip.MustParseAddrPort("127.0.0.1:40000"), netip.MustParseAddrPort("127.0.0.2:80"))
		close(done)
	}()
	// mihomo's REJECT answers nothing; the flow ends when the client gives up.
	client.SetReadDeadline(time.Now().Add(time.Second))
	if b, err := bufio.NewReader(client).ReadByte(); err == nil {
		t.Fatalf("REJECT rule: read %q from a rejected flow", b)
	}
	client.Close()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("HandleTCP did not return after the client closed")
	}
}

func TestCheck(t *testing.T) {
	if err := Check([]byte(testConfig), t.TempDir()); err != nil {
		t.Fatalf("valid config: %v", err)
	}
	bad := testConfig + "  - MATCH,NO-SUCH-PROXY\n"
	err := Check([]byte(bad), t.TempDir())
	if err == nil || !strings.Contains(err.Error(), "NO-SUCH-PROXY") {
		t.Fatalf("want error naming the proxy, got %v", err)
	}
}

// tcpPair returns the two ends of a loopback TCP connection: a client on
// 127.0.0.2, so that no client port is taken for the local end of one of
// mihomo's outbound connections (all from 127.0.0.1 here), which mihomo's
// loopback detector would reject as a loop. (LAN clients never share the
// gateway's addresses.)
func tcpPair(t testing.TB) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}}
	client, err = d.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server, err = ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

func TestExplainFlow(t *testing.T) {
	cfg := []byte(`
mode: rule
proxies:
  - {name: ss1, type: ss, server: 198.51.100.2, port: 8388, cipher: chacha20-ietf-poly1305, password: x, udp: true}
proxy-groups:
  - {name: PROXY, type: select, proxies: [ss1, DIRECT]}
rules:
  - DOMAIN-SUFFIX,example.com,PROXY
  - IP-CIDR,203.0.113.3/32,ss1,no-resolve
  - DST-PORT,25,REJECT
  - MATCH,DIRECT
`)
	src := netip.MustParseAddrPort("192.168.1.2:40000")
	cases := []struct {
		host, dst, want string
	}{
		{"www.example.com", "198.18.0.5:443", "rule DomainSuffix,example.com → PROXY → ss1"},
		{"", "203.0.113.3:80", "rule IPCIDR,203.0.113.3/32 → ss1"},
		{"", "203.0.113.9:25", "rule DstPort,25 → REJECT"},
		{"", "203.0.113.2:80", "rule Match → DIRECT"},
	}
	for _, tc := range cases {
		d, err := ExplainFlow(cfg, t.TempDir(), "tcp", src, tc.host, netip.MustParseAddrPort(tc.dst))
		if err != nil {
			t.Fatal(err)
		}
		if d.String() != tc.want {
			t.Errorf("%s %s: got %q, want %q", tc.host, tc.dst, d, tc.want)
		}
	}
}
