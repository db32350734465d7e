package dns

import (
	"context"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	D "github.com/miekg/dns"
)

// countingEngine is fakeEngine counting the queries that reach it.
type countingEngine struct {
	fakeEngine
	calls atomic.Int64
}

func (e *countingEngine) ServeDNS(ctx context.Context, q *D.Msg) (*D.Msg, error) {
	e.calls.Add(1)
	return e.fakeEngine.ServeDNS(ctx, q)
}

func packQuery(t *testing.T, q *D.Msg) []byte {
	t.Helper()
	b, err := q.Pack()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestReplyCache(t *testing.T) {
	now := time.Unix(1000, 0)
	c := newReplyCache()
	c.now = func() time.Time { return now }

	q := query("foo.test", D.TypeA)
	q.Id = 1
	req := packQuery(t, q)
	r := new(D.Msg)
	r.SetReply(q)
	reply := packQuery(t, r)

	if c.get(req, true) != nil {
		t.Fatal("hit in an empty cache")
	}
	c.put(req, reply, true, 10*time.Second, c.generation()) // capped at maxCacheAge
	q.Id = 0xbeef
	req2 := packQuery(t, q)
	got := c.get(req2, true)
	if got == nil {
		t.Fatal("no hit for the same query with another ID")
	}
	var m D.Msg
	if err := m.Unpack(got); err != nil || m.Id != 0xbeef || !m.Response || m.Question[0].Name != "foo.test." {
		t.Fatalf("cached reply %v (%v), want the reply with ID 0xbeef", &m, err)
	}
	buf := make([]byte, 0, maxCachedReply)
	if allocs := testing.AllocsPerRun(100, func() { c.appendReply(buf, req2, true) }); allocs != 0 {
		t.Errorf("a hit into a reused buffer allocates %v times", allocs)
	}
	if c.get(req2, false) != nil {
		t.Error("a UDP reply was served over TCP")
	}
	upper := query("FOO.test", D.TypeA)
	if c.get(packQuery(t, upper), true) != nil {
		t.Error("a query with other letter case (DNS 0x20) got a reply echoing another case")
	}
	edns := query("foo.test", D.TypeA)
	edns.SetEdns0(4096, false)
	if c.get(packQuery(t, edns), true) != nil {
		t.Error("a query with EDNS0 got the reply to one without")
	}

	c.flush()
	if c.get(req2, true) != nil {
		t.Error("hit after flush")
	}
	c.put(req, reply, true, time.Second, c.generation())
	now = now.Add(maxCacheAge)
	if c.get(req2, true) != nil {
		t.Error("hit after maxCacheAge")
	}
	c.put(req, reply, true, 0, c.generation())
	if c.get(req, true) != nil {
		t.Error("a reply with TTL 0 was cached")
	}

	// A reply made before a flush (under the rules the flush was for) is
	// not stored after it.
	gen := c.generation()
	c.flush()
	c.put(req, reply, true, time.Second, gen)
	if c.get(req, true) != nil {
		t.Error("a reply made before a flush was stored after it")
	}
	// A query too large to be a key (64 KiB of padding over TCP) is not
	// cached, however small its answer.
	padded := query("foo.test", D.TypeA)
	padded.SetEdns0(1232, false)
	padded.IsEdns0().Option = append(padded.IsEdns0().Option, &D.EDNS0_PADDING{Padding: make([]byte, 60000)})
	big := packQuery(t, padded)
	c.put(big, reply, false, time.Second, c.generation())
	if c.get(big, false) != nil {
		t.Errorf("a %d-byte query was cached", len(big))
	}

	for i := range maxCacheEntries + 10 {
		q := query("n"+string(rune('a'+i%26))+time.Duration(i).String()+".test", D.TypeA)
		c.put(packQuery(t, q), reply, true, time.Second, c.generation())
	}
	if n := len(c.entries); n > maxCacheEntries {
		t.Errorf("%d entries, bound %d", n, maxCacheEntries)
	}
}

func TestCacheTTL(t *testing.T) {
	q := query("foo.test", D.TypeA)
	r, _ := fakeEngine{}.ServeDNS(context.Background(), q)
	if got := cacheTTL(r); got != time.Second {
		t.Errorf("fake-ip answer: %v, want 1s", got)
	}
	r.Answer[0].Header().Ttl = 0
	if got := cacheTTL(r); got != 0 {
		t.Errorf("TTL 0 answer: %v, want 0", got)
	}
	nx, _ := fakeEngine{}.ServeDNS(context.Background(), query("x.test", D.TypeMX))
	if got := cacheTTL(nx); got != 0 {
		t.Errorf("NXDOMAIN: %v, want 0 (not cached)", got)
	}
}

// TestServerCachesRepeatedQueries: a repeated query is answered without the
// engine within maxCacheAge, with the asker's ID, over UDP and TCP; after
// that the engine is asked again.
func TestServerCachesRepeatedQueries(t *testing.T) {
	eng := &countingEngine{}
	s, err := Listen(netip.MustParseAddrPort("127.0.0.1:0"), eng, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	var clock atomic.Pointer[time.Time]
	clock.Store(&now)
	s.cache.now = func() time.Time { return *clock.Load() }
	serveUntilCleanup(t, s)

	for _, network := range []string{"udp", "tcp"} {
		before := eng.calls.Load()
		for range 5 {
			wantA(t, exchange(t, network, s.Addr(), query("cached.test", D.TypeA)), "cached.test")
		}
		if n := eng.calls.Load() - before; n != 1 {
			t.Errorf("%s: 5 identical queries reached the engine %d times, want 1", network, n)
		}
	}
	later := now.Add(2 * maxCacheAge)
	clock.Store(&later)
	before := eng.calls.Load()
	wantA(t, exchange(t, "udp", s.Addr(), query("cached.test", D.TypeA)), "cached.test")
	if n := eng.calls.Load() - before; n != 1 {
		t.Errorf("after the cache age the engine was asked %d times, want 1", n)
	}
	// Failures are not cached.
	for range 2 {
		exchange(t, "udp", s.Addr(), query("fail.test", D.TypeA))
	}
	if st := s.Stats(); st.Queries != 13 || st.Errors != 2 {
		t.Errorf("Stats %+v, want 13 queries, 2 errors", st)
	}
}

// TestBurstOfCachedQueries: 64 queries for a cached name, written before
// any answer is read, so that the server reads them in bursts and sends the
// answers of a burst together (sendmmsg); every one comes back once, with
// its own ID.
func TestBurstOfCachedQueries(t *testing.T) {
	eng := &countingEngine{}
	s, err := Listen(netip.MustParseAddrPort("127.0.0.1:0"), eng, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	serveUntilCleanup(t, s)
	wantA(t, exchange(t, "udp", s.Addr(), query("burst.test", D.TypeA)), "burst.test") // cache it

	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadBuffer(1 << 20)
	name := func(int) string { return "burst.test" }
	sendQueries(t, c, s.Addr(), 64, name)
	wantAnswers(t, c, s, 64, name)
	if calls := eng.calls.Load(); calls != 1 {
		t.Errorf("the engine was asked %d times, want 1 (the rest from the cache)", calls)
	}
}

// blockingEngine answers as fakeEngine once release is closed, after saying
// so on entered.
type blockingEngine struct{ entered, release chan struct{} }

func (e blockingEngine) ServeDNS(ctx context.Context, q *D.Msg) (*D.Msg, error) {
	e.entered <- struct{}{}
	select {
	case <-e.release:
	case <-time.After(5 * time.Second):
	}
	return fakeEngine{}.ServeDNS(ctx, q)
}

// TestCacheFlushDuringQuery: FlushCache while the engine is answering (the
// rules changed) keeps that answer out of the cache; without a flush it is
// cached.
func TestCacheFlushDuringQuery(t *testing.T) {
	eng := blockingEngine{entered: make(chan struct{}, 1), release: make(chan struct{})}
	s, err := Listen(netip.MustParseAddrPort("127.0.0.1:0"), eng, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	req := packQuery(t, query("flushed.test", D.TypeA))
	done := make(chan []byte, 1)
	go func() { done <- s.answer(req, true, netip.AddrPort{}) }()
	select {
	case <-eng.entered:
	case <-time.After(5 * time.Second):
		t.Fatal("the engine was never asked")
	}
	s.FlushCache()
	close(eng.release)
	if b := <-done; b == nil {
		t.Fatal("no answer")
	}
	if s.cache.get(req, true) != nil {
		t.Error("an answer made before FlushCache was cached after it")
	}
	go func() { done <- s.answer(req, true, netip.AddrPort{}) }()
	select {
	case <-done: // from the cache: the answer made before the flush was kept
		t.Fatal("answered from the cache after FlushCache")
	case <-eng.entered:
	case <-time.After(5 * time.Second):
		t.Fatal("no answer")
	}
	<-done // the engine answers at once now: release is closed
	if s.cache.get(req, true) == nil {
		t.Error("an answer with no flush meanwhile was not cached")
	}
}
