package engine

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"runtime/pprof"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/metacubex/mihomo/tunnel"
	"github.com/metacubex/mihomo/tunnel/statistic"

	"github.com/tpgw/tpgw/internal/testsrv"
)

// count is the number of flows the parker relays now.
func (p *parker) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.flows)
}

// relayGoroutines counts goroutines that relay flows: tpgw's pumps and
// mihomo's relay.
func relayGoroutines(t *testing.T) int {
	t.Helper()
	var b strings.Builder
	if err := pprof.Lookup("goroutine").WriteTo(&b, 2); err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, g := range strings.Split(b.String(), "\n\n") {
		if strings.Contains(g, "tpgw/engine.(*flow)") || strings.Contains(g, "mihomo/common/net.Relay") {
			n++
		}
	}
	return n
}

// echoServer answers each line with "echo: " and the line, for every
// connection, until the client's FIN; then it says "bye" and closes.
func echoServer(t testing.TB) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	testsrv.ServeEach(ln, func(c net.Conn) {
		r := bufio.NewReader(c)
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				c.Write([]byte("bye\n"))
				return
			}
			c.Write([]byte("echo: " + line))
		}
	})
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

type testFlow struct {
	client net.Conn
	r      *bufio.Reader
	done   <-chan struct{}
}

func (f *testFlow) say(t *testing.T, s string) {
	t.Helper()
	f.client.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := f.client.Write([]byte(s + "\n")); err != nil {
		t.Fatal(err)
	}
	if line, err := f.r.ReadString('\n'); err != nil || line != "echo: "+s+"\n" {
		t.Fatalf("reply %q, %v", line, err)
	}
}

// parkedFlow is a DIRECT flow to an echo server that has said hello and
// gone idle (parked).
func parkedFlow(t *testing.T) *testFlow {
	t.Helper()
	dst := echoServer(t)
	client, inbound := tcpPair(t)
	f := &testFlow{client: client, r: bufio.NewReader(client), done: relayAsync(inbound, client, dst)}
	f.say(t, "hello")
	waitParked(t)
	return f
}

// wantEOF checks that the client sees the flow end (EOF, no bytes) and
// that the flow has left mihomo's statistics.
func (f *testFlow) wantEOF(t *testing.T, when string) {
	t.Helper()
	f.client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if got, err := io.ReadAll(f.r); err != nil || len(got) != 0 {
		t.Fatalf("client %s: %q, %v; want EOF", when, got, err)
	}
	waitDone(t, f.done)
}

// waitParked waits (bounded) until no goroutine relays a flow.
func waitParked(t *testing.T) {
	t.Helper()
	n := 0
	for deadline := time.Now().Add(idleAfter + 3*time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if n = relayGoroutines(t); n == 0 {
			return
		}
	}
	t.Fatalf("%d goroutines still relay idle flows %v after their last byte", n, idleAfter+3*time.Second)
}

// TestIdleFlowsPark opens DIRECT flows, lets them go idle, and checks that
// none holds a goroutine, that parked flows wake for data both ways, that
// mihomo's statistics count every byte, and that half-close and the end of
// the flow pass through a parked flow.
func TestIdleFlowsPark(t *testing.T) {
	dst := echoServer(t)
	const n = 50
	flows := make([]*testFlow, n)
	for i := range flows {
		client, inbound := tcpPair(t)
		flows[i] = &testFlow{client: client, r: bufio.NewReader(client), done: relayAsync(inbound, client, dst)}
		flows[i].say(t, "hello")
	}
	waitParked(t)
	if got := testEngine.parker.count(); got < n {
		t.Fatalf("parker holds %d flows, want ≥ %d", got, n)
	}
	for round := range 2 { // wake each flow twice from the parked state
		for _, f := range flows {
			f.say(t, strings.Repeat("again", round+1))
		}
		waitParked(t)
	}

	src := flows[0].client.LocalAddr().(*net.TCPAddr).AddrPort()
	var up, down int64
	statistic.DefaultManager.Range(func(c statistic.Tracker) bool {
		if md := c.Info().Metadata; md.SrcPort == src.Port() {
			up, down = c.Info().UploadTotal.Load(), c.Info().DownloadTotal.Load()
		}
		return true
	})
	wantUp := int64(len("hello\nagain\nagainagain\n"))
	if wantDown := wantUp + 3*int64(len("echo: ")); up != wantUp || down != wantDown {
		t.Errorf("statistics of a parked flow: upload %d, download %d; want %d, %d", up, down, wantUp, wantDown)
	}

	// Half-close of a parked flow: the server sees EOF, answers, closes.
	for _, f := range flows {
		f.client.(*net.TCPConn).CloseWrite()
	}
	for _, f := range flows {
		f.client.SetReadDeadline(time.Now().Add(5 * time.Second))
		got, err := io.ReadAll(f.r)
		if err != nil || string(got) != "bye\n" {
			t.Fatalf("after half-close: %q, %v", got, err)
		}
		waitDone(t, f.done)
	}
	waitParked(t)
}

// TestDashboardClosesParkedFlow: closing a parked flow's connection in
// mihomo's statistics (what the dashboard's close button does) ends it: the
// client sees EOF, and the flow leaves the parker.
func TestDashboardClosesParkedFlow(t *testing.T) {
	f := parkedFlow(t)
	before := testEngine.parker.count()
	src := f.client.LocalAddr().(*net.TCPAddr).AddrPort()
	statistic.DefaultManager.Range(func(c statistic.Tracker) bool {
		if c.Info().Metadata.SrcPort == src.Port() {
			c.Close()
		}
		return true
	})
	f.wantEOF(t, "after the dashboard's close")
	if after := testEngine.parker.count(); after != before-1 {
		t.Errorf("parker holds %d flows after the close, want %d", after, before-1)
	}
}

// TestAbortFlowsResetsBothEnds: AbortFlows (a gateway that stops; the
// engine's Close) ends every flow the engine relays, parked or moving
// bytes, with a reset to the client and to the server: neither may take a
// cut-off stream for a finished one.
func TestAbortFlowsResetsBothEnds(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	serverErr := make(chan error, 2)
	testsrv.ServeEach(ln, func(c net.Conn) {
		c.SetDeadline(time.Now().Add(10 * time.Second))
		r := bufio.NewReader(c)
		line, err := r.ReadString('\n')
		switch {
		case err != nil:
		case line == "stream\n": // bulk: write until the flow ends
			buf := make([]byte, 64<<10)
			for err == nil {
				_, err = c.Write(buf)
			}
		default: // answer, then wait for the flow to end
			c.Write([]byte("ok\n"))
			_, err = r.ReadString('\n')
		}
		serverErr <- err
	})
	dst := ln.Addr().(*net.TCPAddr).AddrPort()
	start := func(first string) (net.Conn, <-chan struct{}) {
		client, inbound := tcpPair(t)
		done := relayAsync(inbound, client, dst)
		client.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := client.Write([]byte(first + "\n")); err != nil {
			t.Fatal(err)
		}
		return client, done
	}

	idle, idleDone := start("hello")
	if line, err := bufio.NewReader(idle).ReadString('\n'); err != nil || line != "ok\n" {
		t.Fatalf("idle flow's answer %q, %v", line, err)
	}
	waitParked(t)
	bulk, bulkDone := start("stream")
	if _, err := io.CopyN(io.Discard, bulk, 4<<20); err != nil {
		t.Fatalf("bulk flow: %v", err)
	}

	testEngine.AbortFlows()
	for name, c := range map[string]net.Conn{"idle": idle, "bulk": bulk} {
		if _, err := io.Copy(io.Discard, c); !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("%s flow's client after AbortFlows: %v, want a reset (ECONNRESET)", name, err)
		}
	}
	for range 2 {
		select {
		case err := <-serverErr:
			// The idle server reads (a FIN would be io.EOF); the bulk one
			// writes (ECONNRESET, or EPIPE on the write after it).
			if !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.EPIPE) {
				t.Errorf("server after AbortFlows: %v, want a reset", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("a server did not see its flow end within 5s of AbortFlows")
		}
	}
	waitDone(t, idleDone)
	waitDone(t, bulkDone)
	if n := testEngine.parker.count(); n != 0 {
		t.Errorf("parker holds %d flows after AbortFlows", n)
	}
}

// TestSniffingFlowsUseMihomo: with mihomo's sniffer on, a flow goes through
// mihomo's own handling (the sniffer reads the first bytes before the rule
// match), so a rule on the sniffed HTTP host decides it; with it off, the
// same flow is parked by tpgw.
func TestSniffingFlowsUseMihomo(t *testing.T) {
	sniffCfg := testConfig + `
sniffer:
  enable: true
  force-dns-mapping: true
  parse-pure-ip: true
  sniff:
    HTTP:
      ports: [1-65535]
      override-destination: false
`
	sniffCfg = strings.Replace(sniffCfg, "rules:\n", "rules:\n  - DOMAIN,blocked.example,REJECT\n", 1)
	if err := reloadEngine(t, []byte(sniffCfg)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := reloadEngine(t, []byte(testConfig)); err != nil {
			t.Error(err)
		}
	})
	if !tunnel.IsSniffing() {
		t.Fatal("sniffer on, but tunnel.IsSniffing is false")
	}
	dst := echoServer(t)

	// The sniffed host matches the REJECT rule: the flow closes unanswered.
	client, inbound := tcpPair(t)
	done := relayAsync(inbound, client, dst)
	client.Write([]byte("GET / HTTP/1.1\r\nHost: blocked.example\r\n\r\n"))
	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if got, _ := io.ReadAll(client); len(got) != 0 {
		t.Fatalf("a flow to a sniffed REJECT host got %q", got)
	}
	waitDone(t, done)

	// Another host goes DIRECT through mihomo's relay, which keeps its
	// goroutines while idle.
	client, inbound = tcpPair(t)
	f := &testFlow{client: client, r: bufio.NewReader(client), done: relayAsync(inbound, client, dst)}
	client.Write([]byte("GET / HTTP/1.1\r\nHost: fine.example\r\n\r\n"))
	for range 3 { // the echo server answers each line
		f.client.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := f.r.ReadString('\n'); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(idleAfter + 200*time.Millisecond)
	if n := relayGoroutines(t); n == 0 {
		t.Error("a sniffed flow holds no relay goroutine: it did not go through mihomo's relay")
	}
	client.Close()
	waitDone(t, f.done)
}

// TestParkerClose: closing a parker stops its poller (no goroutine left
// behind) and closes its epoll and eventfd descriptors.
func TestParkerClose(t *testing.T) {
	openFDs := func() int {
		ents, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Fatal(err)
		}
		return len(ents)
	}
	before := openFDs()
	p, err := newParker()
	if err != nil {
		t.Fatal(err)
	}
	if n := openFDs(); n != before+2 {
		t.Errorf("a parker opened %d descriptors, want 2 (epoll, eventfd)", n-before)
	}
	// The poller waits in Go's poller, not in a system call that holds a
	// thread and its P.
	var state string
	for range 100 {
		buf := make([]byte, 1<<20)
		for _, g := range strings.Split(string(buf[:runtime.Stack(buf, true)]), "\n\n") {
			if strings.Contains(g, "engine.(*parker).poll(") {
				state, _, _ = strings.Cut(g, "\n")
			}
		}
		if strings.Contains(state, "[IO wait") {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !strings.Contains(state, "[IO wait") {
		t.Errorf("the idle poller's goroutine is %q, want it in IO wait", state)
	}
	p.close()
	select {
	case <-p.done:
	default:
		t.Fatal("poller still running after close")
	}
	if n := openFDs(); n != before {
		t.Errorf("%d descriptors left after close", n-before)
	}
}

// BenchmarkFlowRoundTrip: small request and answer through one DIRECT
// flow relayed by tpgw (chunked, not spliced); -benchmem counts the
// allocations of tpgw's and mihomo's per-chunk path (the echo server and
// client are in the same process and counted too).
func BenchmarkFlowRoundTrip(b *testing.B) {
	dst := echoServer(b)
	client, inbound := tcpPair(b)
	src := client.LocalAddr().(*net.TCPAddr).AddrPort()
	go testEngine.HandleTCP(inbound, src, dst)
	r := bufio.NewReader(client)
	msg := []byte("ping\n")
	b.ReportAllocs()
	for b.Loop() {
		if _, err := client.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := r.ReadSlice('\n'); err != nil {
			b.Fatal(err)
		}
	}
}

// TestFlowChunksAllocateNothing: relaying a small chunk each way through a
// DIRECT flow allocates nothing in tpgw's path (the buffers are pooled, the
// read state lives in the flow). The server echoes with a fixed buffer, so
// whatever is counted comes from the relay or from the background.
func TestFlowChunksAllocateNothing(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts: the race detector makes sync.Pool drop items on purpose")
	}
	dst := serveOne(t, func(c net.Conn) {
		io.CopyBuffer(struct{ io.Writer }{c}, struct{ io.Reader }{c}, make([]byte, 1024))
	})
	client, inbound := tcpPair(t)
	go testEngine.HandleTCP(inbound, client.LocalAddr().(*net.TCPAddr).AddrPort(), dst)
	client.SetDeadline(time.Now().Add(20 * time.Second))
	msg, reply := []byte("ping"), make([]byte, 4)
	roundTrip := func() {
		if _, err := client.Write(msg); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(client, reply); err != nil {
			t.Fatal(err)
		}
	}
	roundTrip() // dial, pumps started, pool warm
	if n := testing.AllocsPerRun(500, roundTrip); n > 0.2 {
		t.Errorf("%.2f allocations per round trip through a DIRECT flow, want 0", n)
	}
}

// TestIdleFromStartHoldsNoGoroutine: a flow with nothing to read when it
// starts is parked at once; no pump runs once HandleTCP has returned, and
// the flow still wakes for the first bytes.
func TestIdleFromStartHoldsNoGoroutine(t *testing.T) {
	dst := echoServer(t)
	waitParked(t) // flows of earlier tests
	client, inbound := tcpPair(t)
	testEngine.HandleTCP(inbound, client.LocalAddr().(*net.TCPAddr).AddrPort(), dst)
	if n := relayGoroutines(t); n != 0 {
		t.Fatalf("%d relay goroutines right after a new idle flow started, want 0", n)
	}
	f := &testFlow{client: client, r: bufio.NewReader(client)}
	f.say(t, "first words")
	client.Close()
}

// TestFlowEndedBeforeStart: the tracker is in mihomo's statistics before
// start runs, so the dashboard can end a flow first, or while start sets it
// up. Such a flow must not stay in the parker (it would for the engine's
// life), and end must not read what start is still writing (go test -race).
func TestFlowEndedBeforeStart(t *testing.T) {
	p, err := newParker()
	if err != nil {
		t.Fatal(err)
	}
	defer p.close()
	for i := range 50 {
		_, inbound := tcpPair(t)
		remote, _ := tcpPair(t)
		f := newFlow(p, inbound.(*net.TCPConn), remote.(*net.TCPConn))
		done := make(chan struct{})
		if i == 0 {
			f.shutdown() // wholly before
			close(done)
		} else {
			go func() { defer close(done); f.shutdown() }()
		}
		f.start(nil)
		<-done
	}
	for deadline := time.Now().Add(5 * time.Second); p.count() != 0 && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	if n := p.count(); n != 0 {
		t.Errorf("%d flows ended from the dashboard are left in the parker", n)
	}
}
