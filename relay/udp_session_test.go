package relay

import (
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fakeSocket records whether it was closed.
type fakeSocket struct {
	from   netip.AddrPort
	closed atomic.Bool
}

func (s *fakeSocket) WriteToUDPAddrPort(b []byte, _ netip.AddrPort) (int, error) {
	if s.closed.Load() {
		return 0, net.ErrClosed
	}
	return len(b), nil
}

func (s *fakeSocket) Close() error { s.closed.Store(true); return nil }

// fakeClock is a settable clock for the table.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

type tableFixture struct {
	*sessionTable
	clock  *fakeClock
	mu     sync.Mutex
	opened []*fakeSocket
}

func newTableFixture(max int, idle time.Duration) *tableFixture {
	f := &tableFixture{clock: &fakeClock{now: time.Unix(1000, 0)}}
	f.sessionTable = newSessionTable(max, idle, func(from netip.AddrPort) (replySocket, error) {
		s := &fakeSocket{from: from}
		f.mu.Lock()
		f.opened = append(f.opened, s)
		f.mu.Unlock()
		return s, nil
	}, f.clock.Now)
	return f
}

func (f *tableFixture) openSockets() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, s := range f.opened {
		if !s.closed.Load() {
			n++
		}
	}
	return n
}

func key(clientPort uint16, from string) sessionKey {
	return sessionKey{
		client: netip.AddrPortFrom(netip.MustParseAddr("192.168.77.2"), clientPort),
		from:   netip.MustParseAddrPort(from),
	}
}

func mustGet(t *testing.T, f *tableFixture, k sessionKey) replySocket {
	t.Helper()
	s, err := f.get(k)
	if err != nil {
		t.Fatalf("get %v: %v", k, err)
	}
	return s
}

func TestSessionTableReusesSocket(t *testing.T) {
	f := newTableFixture(10, time.Minute)
	a := mustGet(t, f, key(1000, "203.0.113.2:7000"))
	if b := mustGet(t, f, key(1000, "203.0.113.2:7000")); b != a {
		t.Fatal("second get of the same session opened another socket")
	}
	// Same from, other client; same client, other from: separate sessions.
	if mustGet(t, f, key(1001, "203.0.113.2:7000")) == a || mustGet(t, f, key(1000, "203.0.113.2:7001")) == a {
		t.Fatal("different keys share a socket")
	}
	if got := f.len(); got != 3 {
		t.Fatalf("len = %d, want 3", got)
	}
}

func TestSessionTableBoundEvictsLeastRecentlyUsed(t *testing.T) {
	f := newTableFixture(3, time.Minute)
	s1 := mustGet(t, f, key(1, "1.1.1.1:53"))
	s2 := mustGet(t, f, key(2, "1.1.1.1:53"))
	s3 := mustGet(t, f, key(3, "1.1.1.1:53"))
	mustGet(t, f, key(1, "1.1.1.1:53")) // 1 is now the most recent; 2 the least
	s4 := mustGet(t, f, key(4, "1.1.1.1:53"))
	if !s2.(*fakeSocket).closed.Load() {
		t.Fatal("least recently used session (2) was not evicted")
	}
	for i, s := range []replySocket{s1, s3, s4} {
		if s.(*fakeSocket).closed.Load() {
			t.Fatalf("session %d closed, want open", i)
		}
	}
	c := f.counts()
	if c.open != 3 || c.evicted != 1 || c.opened != 4 {
		t.Fatalf("counts = %+v, want 3 open, 4 opened, 1 evicted", c)
	}
	// 2 comes back as a new session, evicting 3 (now the least recent).
	if mustGet(t, f, key(2, "1.1.1.1:53")) == s2 {
		t.Fatal("evicted session's socket reused")
	}
	if !s3.(*fakeSocket).closed.Load() {
		t.Fatal("session 3 not evicted")
	}
}

func TestSessionTableFloodStaysBounded(t *testing.T) {
	const max = 100
	f := newTableFixture(max, time.Minute)
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 2000 {
				mustGet(t, f, key(uint16(w*2000+i+1), "9.9.9.9:53"))
				if n := f.len(); n > max {
					t.Errorf("len = %d, over the bound %d", n, max)
					return
				}
			}
		}()
	}
	wg.Wait()
	c := f.counts()
	if c.open != max || c.opened != 16000 || c.evicted != 16000-max {
		t.Fatalf("counts = %+v, want %d open, 16000 opened, %d evicted", c, max, 16000-max)
	}
	if n := f.openSockets(); n != max {
		t.Fatalf("%d sockets still open, want %d (evicted ones closed)", n, max)
	}
}

func TestSessionTableExpiresIdle(t *testing.T) {
	f := newTableFixture(10, 10*time.Second)
	old := mustGet(t, f, key(1, "1.1.1.1:53"))
	f.clock.Advance(6 * time.Second)
	busy := mustGet(t, f, key(2, "1.1.1.1:53"))
	f.clock.Advance(4 * time.Second) // 1 idle for 10s, 2 for 4s
	if n := f.expire(); n != 1 {
		t.Fatalf("expire closed %d, want 1", n)
	}
	if !old.(*fakeSocket).closed.Load() || busy.(*fakeSocket).closed.Load() {
		t.Fatal("wrong session expired")
	}
	f.clock.Advance(5 * time.Second)
	mustGet(t, f, key(2, "1.1.1.1:53")) // use keeps it alive
	f.clock.Advance(9 * time.Second)
	if n := f.expire(); n != 0 {
		t.Fatalf("expire closed %d sessions in use, want 0", n)
	}
	f.clock.Advance(time.Second)
	if n := f.expire(); n != 1 || f.len() != 0 {
		t.Fatalf("expire closed %d, len %d; want 1, 0", n, f.len())
	}
	if c := f.counts(); c.expired != 2 {
		t.Fatalf("expired = %d, want 2", c.expired)
	}
}

func TestSessionTableClose(t *testing.T) {
	f := newTableFixture(10, time.Minute)
	for i := range 5 {
		mustGet(t, f, key(uint16(i+1), "1.1.1.1:53"))
	}
	f.close()
	if n := f.openSockets(); n != 0 {
		t.Fatalf("%d sockets open after close", n)
	}
	if _, err := f.get(key(1, "1.1.1.1:53")); err != net.ErrClosed {
		t.Fatalf("get after close: %v, want net.ErrClosed", err)
	}
	if n := f.openSockets(); n != 0 {
		t.Fatal("get after close opened a socket")
	}
}

func TestSessionTableOpenError(t *testing.T) {
	tbl := newSessionTable(10, time.Minute, func(from netip.AddrPort) (replySocket, error) {
		return nil, fmt.Errorf("bind %s: boom", from)
	}, time.Now)
	if _, err := tbl.get(key(1, "1.1.1.1:53")); err == nil {
		t.Fatal("get: no error")
	}
	if tbl.len() != 0 {
		t.Fatal("failed open left a session")
	}
}

func TestJanitorInterval(t *testing.T) {
	for _, tt := range []struct{ idle, want time.Duration }{
		{60 * time.Second, 5 * time.Second},
		{2 * time.Second, 500 * time.Millisecond},
		{time.Millisecond, 10 * time.Millisecond},
	} {
		if got := janitorInterval(tt.idle); got != tt.want {
			t.Errorf("janitorInterval(%v) = %v, want %v", tt.idle, got, tt.want)
		}
	}
}
