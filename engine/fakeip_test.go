package engine

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/metacubex/mihomo/component/fakeip"
	"github.com/metacubex/mihomo/component/profile/cachefile"
	D "github.com/miekg/dns"
)

func memoryPool(t *testing.T, prefix string) *fakeip.Pool {
	t.Helper()
	p, err := fakeip.New(fakeip.Options{IPNet: netip.MustParsePrefix(prefix), Size: 1000})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

var ip = netip.MustParseAddr

// TestPoolLayout: tpgw reads and moves mihomo's pool position where mihomo
// keeps it (go.mod pins mihomo; an upgrade that moves it fails here).
func TestPoolLayout(t *testing.T) {
	if !poolLayout.ok {
		t.Fatal("fakeip.Pool has no mux, offset, cycle, first and last of the expected types")
	}
	p := memoryPool(t, "10.99.0.0/24")
	p.Lookup("a.example")
	b := p.Lookup("b.example")
	lp := lockedPool{p}
	if pos := lp.position(); pos != (position{b, false}) {
		t.Fatalf("position after two names: %+v, want %v and no cycle", pos, b)
	}
	lp.with(func(pos *position, first, last netip.Addr) {
		if first != ip("10.99.0.4") || last != ip("10.99.0.255") {
			t.Errorf("range %v-%v, want 10.99.0.4-10.99.0.255", first, last)
		}
		pos.offset = ip("10.99.0.100")
	})
	if c := p.Lookup("c.example"); c != ip("10.99.0.101") {
		t.Errorf("after moving the position to .100 the next name got %v", c)
	}
	lp.with(func(pos *position, _, last netip.Addr) { pos.offset = last.Prev() })
	if d := p.Lookup("d.example"); d != ip("10.99.0.4") || !lp.position().cycle {
		t.Errorf("at the end of the range the next name got %v (cycle %v), want the first address and cycle", d, lp.position().cycle)
	}
}

func TestRecoverPosition(t *testing.T) {
	mappedRange := func(from, to string) map[netip.Addr]bool {
		m := map[netip.Addr]bool{}
		for a := ip(from); !ip(to).Less(a); a = a.Next() {
			m[a] = true
		}
		return m
	}
	for _, c := range []struct {
		name   string
		prefix string
		saved  position
		mapped map[netip.Addr]bool
		want   position
	}{
		{"handed out since the save", "10.99.0.0/24", position{ip("10.99.0.10"), false},
			mappedRange("10.99.0.4", "10.99.0.20"), position{ip("10.99.0.20"), false}},
		{"nothing since the save", "10.99.0.0/24", position{ip("10.99.0.10"), false},
			mappedRange("10.99.0.4", "10.99.0.10"), position{ip("10.99.0.10"), false}},
		{"never saved past the start", "10.99.0.0/24", position{ip("10.99.0.3"), false},
			mappedRange("10.99.0.4", "10.99.0.7"), position{ip("10.99.0.7"), false}},
		// Mapped to the end: it may have come round; a quarter of 251 on.
		{"mapped to the end", "10.99.0.0/24", position{ip("10.99.0.10"), false},
			mappedRange("10.99.0.4", "10.99.0.254"), position{ip("10.99.0.65"), true}},
		{"come round, small range", "10.99.0.0/24", position{ip("10.99.0.100"), true},
			mappedRange("10.99.0.4", "10.99.0.254"), position{ip("10.99.0.162"), true}},
		{"come round, large range", "198.18.0.0/16", position{ip("198.18.0.100"), true},
			nil, position{ip("198.18.16.100"), true}},
	} {
		t.Run(c.name, func(t *testing.T) {
			lp := lockedPool{memoryPool(t, c.prefix)}
			lp.with(func(pos *position, _, _ netip.Addr) { *pos = c.saved })
			before, after := recoverPosition(lp, func(a netip.Addr) bool { return c.mapped[a] || c.mapped == nil })
			if before != c.saved || after != c.want || lp.position() != c.want {
				t.Errorf("recovered %+v -> %+v (pool at %+v), want %+v", before, after, lp.position(), c.want)
			}
		})
	}
}

// TestFakeIPPositionSavedWhileRunning: a new name moves the position saved
// in cache.db within positionSaveEvery, and cache.db carries the mark of a
// running tpgw (a start that finds it recovers the position).
func TestFakeIPPositionSavedWhileRunning(t *testing.T) {
	if testEngine.fakeIPs == nil {
		t.Fatal("no fake-ip keeper: store-fake-ip is on by default")
	}
	q := new(D.Msg)
	q.SetQuestion("position.example.", D.TypeA)
	r, err := testEngine.ServeDNS(context.Background(), q)
	if err != nil || len(r.Answer) != 1 {
		t.Fatalf("fake-ip answer: %v, %v", r, err)
	}
	fake, _ := netip.AddrFromSlice(r.Answer[0].(*D.A).A)
	store := cachefile.Cache().FakeIpStore()
	deadline := time.Now().Add(10 * positionSaveEvery)
	for {
		// mihomo's own key for the position (fakeip.Pool.StoreState).
		saved, ok := store.GetByHost("key-offset-fake-ip")
		if ok && saved == fake.Unmap() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("saved position %v (%v) %v after handing out %v", saved, ok, 10*positionSaveEvery, fake)
		}
		time.Sleep(positionSaveEvery / 4)
	}
	running, err := testEngine.fakeIPs.marked()
	if err != nil || !running {
		t.Errorf("cache.db running mark: %v, %v", running, err)
	}
}

// TestHandOver: a reloaded config's pool goes on from the running pool of
// the same range; one over another range keeps its own position.
func TestHandOver(t *testing.T) {
	old := memoryPool(t, "10.99.0.0/24")
	for _, n := range []string{"a", "b", "c"} {
		old.Lookup(n + ".example")
	}
	fresh, moved, other := memoryPool(t, "10.99.0.0/24"), memoryPool(t, "10.99.0.0/24"), memoryPool(t, "10.98.0.0/24")
	built := positions([]*fakeip.Pool{fresh, moved, other})
	// moved handed out addresses itself after the switch, past the old pool's.
	for _, n := range []string{"d", "e", "f", "g"} {
		moved.Lookup(n + ".example")
	}
	handOver([]*fakeip.Pool{old}, built)
	cases := []struct {
		name string
		p    *fakeip.Pool
		want string
	}{{"fresh", fresh, "10.99.0.6"}, {"moved", moved, "10.99.0.7"}, {"other range", other, "10.98.0.3"}}
	for _, c := range cases {
		if got := (lockedPool{c.p}).position().offset; got != ip(c.want) {
			t.Errorf("%s pool at %v after the hand-over, want %s", c.name, got, c.want)
		}
	}
	if next := fresh.Lookup("h.example"); next != ip("10.99.0.7") {
		t.Errorf("the next new name in the fresh pool got %v, want 10.99.0.7", next)
	}
}
