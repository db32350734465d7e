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
	mappedRange := func(from, to string) func(netip.Addr) bool {
		return func(a netip.Addr) bool { return !a.Less(ip(from)) && !ip(to).Less(a) }
	}
	allMapped := func(netip.Addr) bool { return true }
	either := func(a, b func(netip.Addr) bool) func(netip.Addr) bool {
		return func(x netip.Addr) bool { return a(x) || b(x) }
	}
	for _, c := range []struct {
		name   string
		prefix string
		saved  position
		mapped func(netip.Addr) bool // nil: the mappings died with the process
		want   position
	}{
		{"handed out since the save", "10.99.0.0/24", position{ip("10.99.0.10"), false},
			mappedRange("10.99.0.4", "10.99.0.20"), position{ip("10.99.0.20"), false}},
		// The addresses handed out last were not all written before the
		// crash (a burst waiting for the settler, a TCP answer written at
		// once): the position goes past the gap to the last written.
		{"a gap the crash left", "10.99.0.0/24", position{ip("10.99.0.10"), false},
			either(mappedRange("10.99.0.4", "10.99.0.10"), mappedRange("10.99.0.12", "10.99.0.20")), position{ip("10.99.0.20"), false}},
		{"a gap longer than any crash leaves", "198.18.0.0/16", position{ip("198.18.0.10"), false},
			either(mappedRange("198.18.0.4", "198.18.0.10"), mappedRange("198.18.9.0", "198.18.9.9")), position{ip("198.18.0.10"), false}},
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
			allMapped, position{ip("198.18.16.100"), true}},
		// Kept in memory: whatever was handed out since the save is unknown.
		{"mappings died with the process", "10.99.0.0/24", position{ip("10.99.0.10"), false},
			nil, position{ip("10.99.0.72"), false}},
	} {
		t.Run(c.name, func(t *testing.T) {
			lp := lockedPool{memoryPool(t, c.prefix)}
			lp.with(func(pos *position, _, _ netip.Addr) { *pos = c.saved })
			before, after := recoverPosition(lp, c.mapped)
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
	running, err := testEngine.fakeIPs.back.marked()
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

// TestPlaceAhead: between mihomo's switch to a reloaded config's pool and
// handOver, new names get addresses no name of the running pool holds, and
// after the hand-over the pool goes on from the running one's position or
// from its own, whichever is further.
func TestPlaceAhead(t *testing.T) {
	running := memoryPool(t, "10.99.0.0/24")
	held := map[netip.Addr]bool{}
	for _, n := range []string{"a", "b", "c"} {
		held[running.Lookup(n+".example")] = true
	}
	quiet, busy := memoryPool(t, "10.99.0.0/24"), memoryPool(t, "10.99.0.0/24")
	for _, p := range []*fakeip.Pool{quiet, busy} {
		p.CloneFrom(running) // what mihomo's switch copies: the mappings, not the position
	}
	placeAhead([]*fakeip.Pool{running}, []*fakeip.Pool{quiet, busy})
	built := positions([]*fakeip.Pool{quiet, busy})
	// The running pool answers until the switch, the new one after it.
	held[running.Lookup("x.example")] = true
	got := busy.Lookup("d.example")
	if held[got] {
		t.Fatalf("a new name got %v in the moment after the switch, an address of the running pool's names", got)
	}
	if name, ok := busy.LookBack(ip("10.99.0.4")); !ok || name != "a.example" {
		t.Errorf("the first name's address maps to %q, %v; want a.example", name, ok)
	}
	handOver([]*fakeip.Pool{running}, built)
	if next := quiet.Lookup("e.example"); next != ip("10.99.0.8") {
		t.Errorf("a pool that handed out nothing goes on at %v, want 10.99.0.8, right after the running one", next)
	}
	if next := busy.Lookup("f.example"); next != got.Next() {
		t.Errorf("a pool that handed out addresses goes on at %v, want %v, after its own", next, got.Next())
	}
	// Past the end of its range (.4 to .6 in a /29) the margin wraps round
	// to the first address and marks the pool as cycled, as mihomo's does.
	small := memoryPool(t, "10.97.0.0/29")
	for _, n := range []string{"a", "b", "c"} {
		small.Lookup(n + ".example")
	}
	fresh := memoryPool(t, "10.97.0.0/29")
	placeAhead([]*fakeip.Pool{small}, []*fakeip.Pool{fresh})
	if pos := (lockedPool{fresh}).position(); pos != (position{ip("10.97.0.4"), true}) {
		t.Errorf("a /29 pool at .6 placed at %+v, want 10.97.0.4 cycled (a margin of 1)", pos)
	}
	for _, c := range []struct {
		r    string
		want int
	}{{"198.18.0.1/16", 4096}, {"10.0.0.0/8", 4096}, {"10.99.0.0/24", 16}, {"10.97.0.0/29", 1}, {"fdfe:dcba:9876::1/64", 4096}} {
		if got := aheadMargin(netip.MustParsePrefix(c.r)); got != c.want {
			t.Errorf("aheadMargin(%s) = %d, want %d", c.r, got, c.want)
		}
	}
}

// TestFileBacking: the positions of pools kept in memory survive in the
// state directory; lines that do not fit a pool are ignored.
func TestFileBacking(t *testing.T) {
	b := fileBacking{dir: t.TempDir() + "/state"}
	if running, err := b.marked(); running || err != nil {
		t.Fatalf("marked before any run: %v, %v", running, err)
	}
	p4, p6 := memoryPool(t, "10.99.0.0/24"), memoryPool(t, "fd00:99::/120")
	p4.Lookup("a.example")
	p4.Lookup("b.example")
	lockedPool{p6}.with(func(pos *position, _, _ netip.Addr) { *pos = position{ip("fd00:99::80"), true} })
	saved, err := b.save([]*fakeip.Pool{p4, p6})
	if err != nil || saved[p4] != (position{ip("10.99.0.5"), false}) || saved[p6] != (position{ip("fd00:99::80"), true}) {
		t.Fatalf("save: %v, %v", saved, err)
	}
	q4, q6, other := memoryPool(t, "10.99.0.0/24"), memoryPool(t, "fd00:99::/120"), memoryPool(t, "10.98.0.0/24")
	if err := b.restore([]*fakeip.Pool{q4, q6, other}); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		p    *fakeip.Pool
		want position
	}{{q4, saved[p4]}, {q6, saved[p6]}, {other, position{ip("10.98.0.3"), false}}} {
		if got := (lockedPool{c.p}).position(); got != c.want {
			t.Errorf("%v restored to %+v, want %+v", c.p.IPNet(), got, c.want)
		}
	}
	if next := q4.Lookup("c.example"); next != ip("10.99.0.6") {
		t.Errorf("next new name after the restore got %v, want 10.99.0.6", next)
	}

	if err := b.write(positionFile, "garbage\n10.99.0.0/24 10.98.0.9 -\n10.99.0.0/24 not-an-ip -\n"); err != nil {
		t.Fatal(err)
	}
	r4 := memoryPool(t, "10.99.0.0/24")
	if err := b.restore([]*fakeip.Pool{r4}); err != nil || (lockedPool{r4}).position().offset != ip("10.99.0.3") {
		t.Errorf("a position outside the range moved the pool to %v (%v)", (lockedPool{r4}).position(), err)
	}

	for _, running := range []bool{true, false, false} {
		if err := b.mark(running); err != nil {
			t.Fatal(err)
		}
		if got, err := b.marked(); got != running || err != nil {
			t.Errorf("mark(%v), then marked: %v, %v", running, got, err)
		}
	}
}
