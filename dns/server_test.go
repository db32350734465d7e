package dns

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	D "github.com/miekg/dns"

	"github.com/tpgw/tpgw/internal/testenv"
	"github.com/tpgw/tpgw/internal/tsock"
)

// fakeEngine answers like a fake-ip engine: A queries get 198.18.0.x (x from
// the name), AAAA queries fc00::x; "fail.test." fails, "slow.test." waits for
// the context, "big.test." has 100 A records, anything else gets NXDOMAIN.
type fakeEngine struct{}

func fakeIP(name string) netip.Addr {
	h := fnv.New32a()
	h.Write([]byte(name))
	return netip.AddrFrom4([4]byte{198, 18, 0, byte(h.Sum32()%253) + 1})
}

func (fakeEngine) ServeDNS(ctx context.Context, q *D.Msg) (*D.Msg, error) {
	qs := q.Question[0]
	r := new(D.Msg)
	r.SetReply(q)
	switch {
	case qs.Name == "fail.test.":
		return nil, errors.New("engine failure")
	case qs.Name == "slow.test.":
		<-ctx.Done()
		return nil, ctx.Err()
	case qs.Name == "big.test." && qs.Qtype == D.TypeA:
		for i := range 100 {
			r.Answer = append(r.Answer, &D.A{
				Hdr: D.RR_Header{Name: qs.Name, Rrtype: D.TypeA, Class: D.ClassINET, Ttl: 1},
				A:   netip.AddrFrom4([4]byte{198, 18, 1, byte(i)}).AsSlice(),
			})
		}
	case qs.Qtype == D.TypeA:
		r.Answer = append(r.Answer, &D.A{
			Hdr: D.RR_Header{Name: qs.Name, Rrtype: D.TypeA, Class: D.ClassINET, Ttl: 1},
			A:   fakeIP(qs.Name).AsSlice(),
		})
	case qs.Qtype == D.TypeAAAA:
		ip := fakeIP(qs.Name).As4()
		r.Answer = append(r.Answer, &D.AAAA{
			Hdr:  D.RR_Header{Name: qs.Name, Rrtype: D.TypeAAAA, Class: D.ClassINET, Ttl: 1},
			AAAA: netip.AddrFrom16([16]byte{0: 0xfc, 15: ip[3]}).AsSlice(),
		})
	default:
		r.Rcode = D.RcodeNameError
	}
	return r, nil
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

// startServer listens on addr with the fake engine and serves until the test ends.
func startServer(t testing.TB, addr string) *Server {
	t.Helper()
	s, err := Listen(netip.MustParseAddrPort(addr), fakeEngine{}, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	serveUntilCleanup(t, s)
	return s
}

func serveUntilCleanup(t testing.TB, s *Server) {
	done := make(chan error, 1)
	go func() { done <- s.Serve() }()
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Serve returned %v after Close, want nil", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("Serve did not return after Close")
		}
	})
}

func query(name string, qtype uint16) *D.Msg {
	m := new(D.Msg)
	m.SetQuestion(D.Fqdn(name), qtype)
	return m
}

func exchange(t testing.TB, network string, server netip.AddrPort, q *D.Msg) *D.Msg {
	t.Helper()
	c := &D.Client{Net: network, Timeout: 2 * time.Second}
	r, _, err := c.Exchange(q, server.String())
	if err != nil {
		t.Fatalf("%s exchange with %v for %v: %v", network, server, q.Question, err)
	}
	if r.Id != q.Id {
		t.Fatalf("reply id %d, want %d", r.Id, q.Id)
	}
	return r
}

func wantA(t testing.TB, r *D.Msg, name string) {
	t.Helper()
	if r.Rcode != D.RcodeSuccess || len(r.Answer) != 1 {
		t.Fatalf("reply for %s: rcode %s, %d answers, want one A:\n%v", name, D.RcodeToString[r.Rcode], len(r.Answer), r)
	}
	a, ok := r.Answer[0].(*D.A)
	if !ok {
		t.Fatalf("answer %v is not an A record", r.Answer[0])
	}
	got, _ := netip.AddrFromSlice(a.A)
	if want := fakeIP(D.Fqdn(name)); got.Unmap() != want {
		t.Fatalf("A %s = %v, want %v", name, got, want)
	}
}

func TestServeUDPAndTCP(t *testing.T) {
	s := startServer(t, "127.0.0.1:0")
	for _, network := range []string{"udp", "tcp"} {
		t.Run(network, func(t *testing.T) {
			wantA(t, exchange(t, network, s.Addr(), query("foo.test", D.TypeA)), "foo.test")
			r := exchange(t, network, s.Addr(), query("foo.test", D.TypeAAAA))
			if len(r.Answer) != 1 || r.Answer[0].Header().Rrtype != D.TypeAAAA {
				t.Fatalf("AAAA reply: %v", r)
			}
			if r := exchange(t, network, s.Addr(), query("fail.test", D.TypeA)); r.Rcode != D.RcodeServerFailure {
				t.Errorf("engine error: rcode %s, want SERVFAIL", D.RcodeToString[r.Rcode])
			}
			if r := exchange(t, network, s.Addr(), query("nope.test", D.TypeMX)); r.Rcode != D.RcodeNameError {
				t.Errorf("NXDOMAIN from the engine: rcode %s", D.RcodeToString[r.Rcode])
			}
		})
	}
	st := s.Stats()
	if st.Queries != 8 || st.Errors != 2 || st.Malformed != 0 {
		t.Errorf("Stats = %+v, want 8 queries, 2 errors, 0 malformed", st)
	}
}

// "0.0.0.0:port" means every address: one dual-stack socket serves v4 and v6.
func TestListenUnspecifiedIsDualStack(t *testing.T) {
	s := startServer(t, "0.0.0.0:0")
	if s.Addr().Addr() != netip.IPv6Unspecified() {
		t.Fatalf("Addr() = %v, want [::]:port", s.Addr())
	}
	for _, ip := range []string{"127.0.0.1", "::1"} {
		server := netip.AddrPortFrom(netip.MustParseAddr(ip), s.Addr().Port())
		for _, network := range []string{"udp", "tcp"} {
			wantA(t, exchange(t, network, server, query("dual.test", D.TypeA)), "dual.test")
		}
	}
}

// A UDP reply larger than the client's buffer is truncated with TC set; the
// same query over TCP gets every record.
func TestTruncation(t *testing.T) {
	s := startServer(t, "127.0.0.1:0")
	r := exchange(t, "udp", s.Addr(), query("big.test", D.TypeA))
	if !r.Truncated || len(r.Answer) >= 100 {
		t.Errorf("UDP without EDNS0: TC=%v, %d answers; want TC and fewer than 100", r.Truncated, len(r.Answer))
	}
	r.Compress = true // as sent
	if b, _ := r.Pack(); len(b) > 512 {
		t.Errorf("UDP reply is %d bytes, over 512", len(b))
	}
	q := query("big.test", D.TypeA)
	q.SetEdns0(4096, false)
	if r := exchange(t, "udp", s.Addr(), q); r.Truncated || len(r.Answer) != 100 {
		t.Errorf("UDP with EDNS0 4096: TC=%v, %d answers; want all 100", r.Truncated, len(r.Answer))
	}
	if r := exchange(t, "tcp", s.Addr(), query("big.test", D.TypeA)); r.Truncated || len(r.Answer) != 100 {
		t.Errorf("TCP: TC=%v, %d answers; want all 100", r.Truncated, len(r.Answer))
	}
}

// Several queries on one TCP connection, then garbage, which ends it.
func TestTCPConnection(t *testing.T) {
	s := startServer(t, "127.0.0.1:0")
	c, err := D.Dial("tcp", s.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	for i := range 5 {
		name := fmt.Sprintf("n%d.test", i)
		q := query(name, D.TypeA)
		if err := c.WriteMsg(q); err != nil {
			t.Fatal(err)
		}
		r, err := c.ReadMsg()
		if err != nil {
			t.Fatalf("query %d on the same connection: %v", i, err)
		}
		wantA(t, r, name)
	}
	if _, err := c.Write([]byte{0xde, 0xad, 0xbe, 0xef}); err != nil { // framed as a 4-byte message
		t.Fatal(err)
	}
	if _, err := c.ReadMsg(); err == nil {
		t.Fatal("garbage on TCP got a reply; want the connection closed")
	}
	if st := s.Stats(); st.Malformed != 1 {
		t.Errorf("Stats = %+v, want 1 malformed", st)
	}
}

// A query the engine does not answer in time gets SERVFAIL, and Close does
// not wait for queries in flight longer than it takes to cancel them.
// TestWorkersReused: queries the reply cache cannot answer, asked one after
// another, are answered by a worker that answered one before, not by a new
// goroutine each.
func TestWorkersReused(t *testing.T) {
	s := startServer(t, "127.0.0.1:0")
	const n = 100
	for i := range n {
		name := fmt.Sprintf("reuse%d.test", i)
		wantA(t, exchange(t, "udp", s.Addr(), query(name, D.TypeA)), name)
	}
	if w := s.workers.Load(); w < 1 || w > n/2 {
		t.Errorf("%d workers started for %d queries in a row, want a few", w, n)
	}
}

// Answers that UDP workers finish while another worker sends wait for
// that worker, which sends them with its own in batches: their senders
// return at once, and their query slots stay taken until they are sent.
func TestWorkerAnswersSentTogether(t *testing.T) {
	s := startServer(t, "127.0.0.1:0")
	wantA(t, exchange(t, "udp", s.Addr(), query("first.test", D.TypeA)), "first.test") // serving
	c, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	client := c.LocalAddr().(*net.UDPAddr).AddrPort()
	const n = 2*udpBatch + 5 // three batches
	name := func(i int) string { return fmt.Sprintf("together%d.test", i) }
	answer := func(i int) pendingReply {
		q := query(name(i), D.TypeA)
		q.Id = uint16(i)
		req, err := q.Pack()
		if err != nil {
			t.Fatal(err)
		}
		if !s.acquire() {
			t.Fatal("no query slot")
		}
		return pendingReply{reply: s.answer(req, true, netip.AddrPort{}), client: client}
	}

	rc := &s.workerReplies
	// The worker of first.test may still be on its way out of sendReply
	// after its answer arrived.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
		rc.mu.Lock()
		if !rc.sending && len(s.sem) == 0 {
			break
		}
		rc.mu.Unlock()
		if time.Now().After(deadline) {
			t.Fatal("the first worker did not finish sending in 5 s")
		}
	}
	rc.sending = true // as if a worker were sending
	rc.mu.Unlock()
	for i := range n - 1 {
		s.sendReply(answer(i)) // returns: left to the sender
	}
	if held := len(s.sem); held != n-1 {
		t.Errorf("%d query slots taken with %d answers waiting, want %d", held, n-1, n-1)
	}
	if err := c.SetReadDeadline(time.Now().Add(100 * time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	if k, _, err := c.ReadFrom(make([]byte, 512)); err == nil {
		t.Fatalf("an answer (%d bytes) left while they waited for the sender", k)
	}
	rc.mu.Lock()
	rc.sending = false // that worker is done
	rc.mu.Unlock()
	s.sendReply(answer(n - 1)) // the next answer's worker sends them all
	wantAnswers(t, c, s, n, name)
	if held := len(s.sem); held != 0 {
		t.Errorf("%d query slots still taken after the answers went", held)
	}
	rc.mu.Lock()
	defer rc.mu.Unlock()
	if rc.sending || len(rc.pending) != 0 {
		t.Errorf("after the send: sending %v, %d answers pending", rc.sending, len(rc.pending))
	}
}

func TestSlowEngine(t *testing.T) {
	s := startServer(t, "127.0.0.1:0")
	c := &D.Client{Net: "udp", Timeout: queryTimeout + 2*time.Second}
	start := time.Now()
	r, _, err := c.Exchange(query("slow.test", D.TypeA), s.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if r.Rcode != D.RcodeServerFailure {
		t.Errorf("rcode %s, want SERVFAIL", D.RcodeToString[r.Rcode])
	}
	if d := time.Since(start); d < queryTimeout-time.Second || d > queryTimeout+time.Second {
		t.Errorf("answered after %v, want about %v", d, queryTimeout)
	}
	// A query in flight at Close.
	go c.Exchange(query("slow.test", D.TypeA), s.Addr().String())
	time.Sleep(100 * time.Millisecond)
	start = time.Now()
	s.Close()
	if d := time.Since(start); d > time.Second {
		t.Errorf("Close took %v with a query in flight", d)
	}
}

// 10,000 malformed datagrams (random bytes, truncated and bit-flipped queries)
// are counted and dropped; a valid query is answered afterwards.
func TestMalformedFlood(t *testing.T) {
	s := startServer(t, "127.0.0.1:0")
	conn, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(s.Addr()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	valid, err := query("flood.test", D.TypeA).Pack()
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	const total = 10000
	unpackable := 0 // datagrams miekg/dns itself rejects
	for i := range total {
		var pkt []byte
		switch i % 3 {
		case 0: // random bytes, 0..599 long
			pkt = make([]byte, rng.IntN(600))
			for j := range pkt {
				pkt[j] = byte(rng.Uint32())
			}
		case 1: // a valid query cut short
			pkt = valid[:rng.IntN(len(valid))]
		case 2: // a valid query with bits flipped
			pkt = append([]byte(nil), valid...)
			for range 1 + rng.IntN(4) {
				pkt[rng.IntN(len(pkt))] ^= 1 << rng.IntN(8)
			}
		}
		if err := new(D.Msg).Unpack(pkt); err != nil {
			unpackable++
		}
		if _, err := conn.Write(pkt); err != nil {
			t.Fatal(err)
		}
		// Pace the flood so the socket buffer never overflows and every
		// datagram is accounted for.
		if i%200 == 199 {
			waitAccounted(t, s, uint64(i+1))
		}
	}
	waitAccounted(t, s, total)
	st := s.Stats()
	// Some bit flips leave a well-formed query (e.g. a flipped id or a
	// letter of the name), which is answered; every datagram that does not
	// unpack must be counted malformed (and so must responses, other opcodes...).
	if st.Queries+st.Malformed != total || st.Malformed < uint64(unpackable) {
		t.Errorf("Stats = %+v: want %d datagrams in all, at least %d malformed", st, total, unpackable)
	}
	t.Logf("after the flood: %+v", st)
	wantA(t, exchange(t, "udp", s.Addr(), query("after.test", D.TypeA)), "after.test")
}

// waitAccounted waits until the server has counted n messages; an empty
// datagram is also a message (malformed).
func waitAccounted(t *testing.T, s *Server, n uint64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		st := s.Stats()
		if st.Queries+st.Malformed >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("server counted %d of %d datagrams: %+v", st.Queries+st.Malformed, n, st)
		}
		time.Sleep(time.Millisecond)
	}
}

// Close works before Serve, twice, and Serve then returns nil at once.
func TestCloseBeforeServe(t *testing.T) {
	s, err := Listen(netip.MustParseAddrPort("127.0.0.1:0"), fakeEngine{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := s.Serve(); err != nil {
		t.Fatalf("Serve after Close = %v, want nil", err)
	}
}

// Connections beyond maxTCPConns are closed at once; the ones within keep working.
func TestTCPConnectionLimit(t *testing.T) {
	s := startServer(t, "127.0.0.1:0")
	var conns []*D.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range maxTCPConns {
		c, err := D.Dial("tcp", s.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	// Each held connection is registered once the server accepted it.
	deadline := time.Now().Add(5 * time.Second)
	for {
		s.mu.Lock()
		n := len(s.conns)
		s.mu.Unlock()
		if n == maxTCPConns {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d connections registered, want %d", n, maxTCPConns)
		}
		time.Sleep(5 * time.Millisecond)
	}
	extra, err := D.Dial("tcp", s.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer extra.Close()
	extra.SetDeadline(time.Now().Add(2 * time.Second))
	if err := extra.WriteMsg(query("over.test", D.TypeA)); err == nil {
		if _, err := extra.ReadMsg(); err == nil {
			t.Error("connection over the limit was answered")
		}
	}
	c := conns[0]
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if err := c.WriteMsg(query("held.test", D.TypeA)); err != nil {
		t.Fatal(err)
	}
	r, err := c.ReadMsg()
	if err != nil {
		t.Fatal(err)
	}
	wantA(t, r, "held.test")
}

// sendQueries writes n A queries from c to to, query i with ID i for
// name(i), reading no answer.
func sendQueries(t *testing.T, c net.PacketConn, to netip.AddrPort, n int, name func(int) string) {
	t.Helper()
	for i := range n {
		q := query(name(i), D.TypeA)
		q.Id = uint16(i)
		b, err := q.Pack()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.WriteTo(b, net.UDPAddrFromAddrPort(to)); err != nil {
			t.Fatal(err)
		}
	}
}

// wantAnswers reads until each query of sendQueries has had its answer,
// once, with the fake IP of its name; 10 s at most.
func wantAnswers(t *testing.T, c net.PacketConn, s *Server, n int, name func(int) string) {
	t.Helper()
	wantAnswersEach(t, c, s, n, name, nil)
}

// wantAnswersEach is wantAnswers that calls each (when not nil) with the
// id of every answer as it arrives.
func wantAnswersEach(t *testing.T, c net.PacketConn, s *Server, n int, name func(int) string, each func(id int)) {
	t.Helper()
	a := readAnswers(t, c, n, name)
	for a.got < n {
		id := a.next(fmt.Sprintf("server: %+v", s.Stats()))
		if each != nil {
			each(id)
		}
	}
}

// answerReader reads the answers to sendQueries' queries from c, each once
// and with the fake IP of its name, within 10 s.
type answerReader struct {
	t    *testing.T
	c    net.PacketConn
	name func(int) string
	seen []bool
	got  int
	buf  []byte
}

func readAnswers(t *testing.T, c net.PacketConn, n int, name func(int) string) *answerReader {
	t.Helper()
	if err := c.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	return &answerReader{t: t, c: c, name: name, seen: make([]bool, n), buf: make([]byte, 512)}
}

// next reads one answer and returns its id; a failure says what is going on
// (context).
func (a *answerReader) next(context string) int {
	a.t.Helper()
	k, _, err := a.c.ReadFrom(a.buf)
	if err != nil {
		a.t.Fatalf("after %d of %d answers: %v (%s)", a.got, len(a.seen), err, context)
	}
	r := new(D.Msg)
	if err := r.Unpack(a.buf[:k]); err != nil {
		a.t.Fatal(err)
	}
	if int(r.Id) >= len(a.seen) || a.seen[r.Id] {
		a.t.Fatalf("unexpected or repeated answer id %d", r.Id)
	}
	a.seen[r.Id] = true
	a.got++
	wantA(a.t, r, a.name(int(r.Id)))
	return int(r.Id)
}

// A burst of queries that arrives while the reader is busy (here: before it
// starts) waits in the listening socket, whose buffer is raised past the
// default's ~270 small datagrams; none is dropped, each gets its answer.
func TestQueryBurstNotDropped(t *testing.T) {
	const n = 2000
	name := func(i int) string { return fmt.Sprintf("burst%d.test", i) }
	s, c := queuedBurst(t, fakeEngine{}, n, name)
	wantAnswers(t, c, s, n, name)
}

// queuedBurst sends n queries, for name(i), from a client that keeps every
// reply to a server for eng, which starts serving once they wait in its
// socket.
func queuedBurst(t *testing.T, eng Engine, n int, name func(int) string) (*Server, net.PacketConn) {
	t.Helper()
	testenv.RequireRoot(t) // SO_RCVBUFFORCE, past net.core.rmem_max
	s, err := Listen(netip.MustParseAddrPort("127.0.0.1:0"), eng, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	lc := net.ListenConfig{Control: tsock.Control(tsock.RaiseRcvBuf)} // the client keeps every reply
	c, err := lc.ListenPacket(context.Background(), "udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	sendQueries(t, c, s.Addr(), n, name)
	serveUntilCleanup(t, s)
	return s, c
}

// instantEngine is fakeEngine as an InstantEngine: names under now.test are
// answered at once, and need settling unless they start with "known".
// settle waits for hold to close when it is set, and marks what serve
// answered as settled; ServeDNS counts its queries.
type instantEngine struct {
	fakeEngine
	hold     chan struct{}
	serveDNS atomic.Int64

	mu      sync.Mutex
	served  []string        // names serve answered, in order
	settled map[string]bool // of those, the ones settle saw
	settles int
}

func (e *instantEngine) ServeDNS(ctx context.Context, q *D.Msg) (*D.Msg, error) {
	e.serveDNS.Add(1)
	return e.fakeEngine.ServeDNS(ctx, q)
}

func (e *instantEngine) NewInstant() (func(*D.Msg) (*D.Msg, bool, bool), func()) {
	var unsettled []string
	serve := func(q *D.Msg) (*D.Msg, bool, bool) {
		name := q.Question[0].Name
		if !strings.HasSuffix(name, ".now.test.") {
			return nil, false, false
		}
		r, err := e.fakeEngine.ServeDNS(context.Background(), q)
		if err != nil {
			return nil, false, false
		}
		known := strings.HasPrefix(name, "known")
		e.mu.Lock()
		if !known {
			unsettled = append(unsettled, name)
		}
		e.served = append(e.served, name)
		e.mu.Unlock()
		return r, true, !known
	}
	settle := func() {
		e.mu.Lock()
		these := unsettled
		unsettled = nil
		e.mu.Unlock()
		if e.hold != nil {
			<-e.hold
		}
		e.mu.Lock()
		for _, n := range these {
			e.settled[n] = true
		}
		e.settles++
		e.mu.Unlock()
	}
	return serve, settle
}

func (e *instantEngine) isSettled(name string) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.settled[D.Fqdn(name)]
}

// heldServer serves an instantEngine whose settle waits until unhold is
// called (at the latest as the test ends, before the server closes).
func heldServer(t *testing.T) (*instantEngine, *Server, func()) {
	t.Helper()
	eng := &instantEngine{hold: make(chan struct{}), settled: map[string]bool{}}
	s, err := Listen(netip.MustParseAddrPort("127.0.0.1:0"), eng, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	serveUntilCleanup(t, s)
	var release sync.Once
	unhold := func() { release.Do(func() { close(eng.hold) }) }
	t.Cleanup(unhold) // runs before the server's Close
	return eng, s, unhold
}

// TestInstantAnswers: queries an InstantEngine answers at once are answered
// by the reader, with no worker; none leaves before the engine has settled
// it, and the answers that wait meanwhile settle together. The reader goes
// on meanwhile: a query the cache can answer is answered while a settle
// waits. Other queries go to a worker; a repeated one comes from the reply
// cache, and garbage is dropped in the reader.
func TestInstantAnswers(t *testing.T) {
	eng, s, unhold := heldServer(t)
	c, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	const n = 40
	name := func(i int) string { return fmt.Sprintf("q%d.now.test", i) }
	sendQueries(t, c, s.Addr(), n, name)

	// The reader answers them all while the settler waits in settle.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
		eng.mu.Lock()
		served := len(eng.served)
		eng.mu.Unlock()
		if served == n {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the reader answered %d of %d at once in 5 s", served, n)
		}
	}
	if err := c.SetReadDeadline(time.Now().Add(100 * time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	if k, _, err := c.ReadFrom(make([]byte, 512)); err == nil {
		t.Fatalf("an answer (%d bytes) left before the engine settled it", k)
	}
	// Meanwhile other queries are answered: one that needs no settling by
	// the reader at once, another by a worker, then from the reply cache.
	wantA(t, exchange(t, "udp", s.Addr(), query("known.now.test", D.TypeA)), "known.now.test")
	wantA(t, exchange(t, "udp", s.Addr(), query("meanwhile.test", D.TypeA)), "meanwhile.test")
	wantA(t, exchange(t, "udp", s.Addr(), query("meanwhile.test", D.TypeA)), "meanwhile.test")
	if w, e := s.workers.Load(), eng.serveDNS.Load(); w != 1 || e != 1 {
		t.Errorf("while a settle waited: %d workers started, %d queries to ServeDNS; want 1 and 1 (the second from the cache)", w, e)
	}
	unhold()

	// Every answer, each settled when it arrives.
	wantAnswersEach(t, c, s, n, name, func(id int) {
		if !eng.isSettled(name(id)) {
			t.Errorf("the answer for %s arrived before settle", name(id))
		}
	})
	eng.mu.Lock()
	settles, served := eng.settles, len(eng.served)
	eng.mu.Unlock()
	// The first burst, then the rest that waited meanwhile, udpBatch at
	// a time.
	if served != n+1 || settles > 1+(n+udpBatch-1)/udpBatch {
		t.Errorf("%d queries answered at once in %d settles, want %d in at most %d", served, settles, n+1, 1+(n+udpBatch-1)/udpBatch)
	}
	if w, e := s.workers.Load(), eng.serveDNS.Load(); w != 1 || e != 1 {
		t.Errorf("%d workers started, %d queries to ServeDNS; want only meanwhile.test's", w, e)
	}

	// Asked again: the reply cache, not the engine.
	wantA(t, exchange(t, "udp", s.Addr(), query(name(0), D.TypeA)), name(0))
	// Not answered at once: a worker, through ServeDNS.
	wantA(t, exchange(t, "udp", s.Addr(), query("later.test", D.TypeA)), "later.test")
	eng.mu.Lock()
	served = len(eng.served)
	eng.mu.Unlock()
	// (later.test's worker may be meanwhile.test's, waiting for more.)
	if served != n+1 || eng.serveDNS.Load() != 2 {
		t.Errorf("after a repeated query and another name: %d served at once (want %d), %d to ServeDNS (want 2)", served, n+1, eng.serveDNS.Load())
	}
	workers := s.workers.Load()
	// Garbage: dropped by the reader.
	malformed := s.Stats().Malformed
	if _, err := c.WriteTo([]byte("not a dns message"), net.UDPAddrFromAddrPort(s.Addr())); err != nil {
		t.Fatal(err)
	}
	waitAccounted(t, s, n+5+1)
	if got := s.Stats().Malformed; got != malformed+1 || s.workers.Load() != workers || eng.serveDNS.Load() != 2 {
		t.Errorf("garbage: %d malformed (want %d), %d workers started (want %d), %d to ServeDNS (want 2)", got, malformed+1, s.workers.Load(), workers, eng.serveDNS.Load())
	}
}

// TestInstantBurst: a burst of instant answers far larger than a read
// (waiting in the socket before the server starts) goes through the reader
// and the settler a batch at a time; each query gets its own answer, once.
func TestInstantBurst(t *testing.T) {
	const n = maxSettling - udpBatch // all for the settler (TestSettlerBounded has more)
	eng := &instantEngine{settled: map[string]bool{}}
	name := func(i int) string { return fmt.Sprintf("burst%d.now.test", i) }
	s, c := queuedBurst(t, eng, n, name)
	wantAnswersEach(t, c, s, n, name, func(id int) {
		if !eng.isSettled(name(id)) {
			t.Errorf("the answer for %s arrived before settle", name(id))
		}
	})
	if w := s.workers.Load(); w != 0 {
		t.Errorf("%d workers started, want none", w)
	}
}

// TestSettlerBounded: while a settle waits (a slow disk), at most
// maxSettling answers wait for it; the queries after them go to the workers
// and are answered meanwhile, and every query gets its answer once the
// settle returns.
func TestSettlerBounded(t *testing.T) {
	testenv.RequireRoot(t) // SO_RCVBUFFORCE, past net.core.rmem_max
	// The round the settler holds may be up to maxSettling already (the
	// reader may read that much before the settler takes its first round).
	const n = 2*maxSettling + 2*udpBatch + 200
	eng, s, unhold := heldServer(t)
	lc := net.ListenConfig{Control: tsock.Control(tsock.RaiseRcvBuf)}
	c, err := lc.ListenPacket(context.Background(), "udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	name := func(i int) string { return fmt.Sprintf("slow%d.now.test", i) }
	sendQueries(t, c, s.Addr(), n, name)
	// The workers answer the queries past the bound while the settle
	// waits.
	a := readAnswers(t, c, n, name)
	for a.got < 100 {
		a.next(fmt.Sprintf("while the settle waited; ServeDNS had %d", eng.serveDNS.Load()))
	}
	if eng.serveDNS.Load() < 100 {
		t.Errorf("%d queries to ServeDNS while the settle waited, want the ones past the bound", eng.serveDNS.Load())
	}
	// Answered at once while the settle waits: the round the settler
	// holds, then at most maxSettling and the rest of a burst. (Once the
	// settle returns, queries still in the socket are answered at once
	// again, so this is counted before.)
	eng.mu.Lock()
	served := len(eng.served)
	eng.mu.Unlock()
	if served > 2*(maxSettling+udpBatch) {
		t.Errorf("%d answers waited for the settler, want at most %d", served, 2*(maxSettling+udpBatch))
	}
	unhold()
	for a.got < n {
		a.next("after the settle")
	}
}
