package engine

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/metacubex/bbolt"
	"github.com/metacubex/http"
	"github.com/metacubex/http/httptest"
	"github.com/metacubex/mihomo/component/fakeip"
	"github.com/metacubex/mihomo/component/profile/cachefile"
	"github.com/metacubex/mihomo/component/resolver"
	C "github.com/metacubex/mihomo/constant"
	mdns "github.com/metacubex/mihomo/dns"
	D "github.com/miekg/dns"
)

// TestPersistedPoolKeptInMemory: the running engine's persisted pool
// (store-fake-ip is on by default) answers from a memory store, and
// ServeDNS writes its new mappings to cache.db.
func TestPersistedPoolKeptInMemory(t *testing.T) {
	if !storeLayout.ok {
		t.Fatal("fakeip.Pool has no store field of interface type")
	}
	if len(testEngine.pools) != 1 {
		t.Fatalf("%d fake-ip pools, want 1", len(testEngine.pools))
	}
	p := testEngine.pools[0]
	if typ := poolStore(p).Elem().Type().String(); typ != "*fakeip.memoryStore" {
		t.Errorf("the persisted pool's store is %s, want mihomo's memory store", typ)
	}
	if liveMappings.Load() == nil {
		t.Error("no mapping writer for the persisted pool")
	}
	// A pool mihomo builds with store-fake-ip is the kind tpgw swaps.
	built, err := fakeip.New(fakeip.Options{IPNet: netip.MustParsePrefix("fd00:99::/120"), Persistence: true})
	if err != nil {
		t.Fatal(err)
	}
	if !persistedStore(built) {
		t.Errorf("a pool built with Persistence has store %s, not recognised as mihomo's cachefile store", poolStore(built).Elem().Type())
	}
}

// togetherRuns numbers the runs of TestNewNamesWrittenTogether.
var togetherRuns atomic.Int64

// TestNewNamesWrittenTogether: names asked at once each have their mapping
// in cache.db or its journal when their answer is out, and the names that
// come in while a journal write runs share the next; folded, the mappings
// are in cache.db in mihomo's format.
func TestNewNamesWrittenTogether(t *testing.T) {
	w := liveMappings.Load()
	if w == nil {
		t.Fatal("no mapping writer")
	}
	const n = 200
	// Names no earlier run in this process asked (go test -count=N), so
	// that each is new to the pool.
	prefix := fmt.Sprintf("together%d-", togetherRuns.Add(1))
	commitsBefore := w.commits.Load()
	start := make(chan struct{})
	errs := make(chan error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			<-start
			name := fmt.Sprintf("%s%d.example", prefix, i)
			q := new(D.Msg)
			q.SetQuestion(name+".", D.TypeA)
			r, err := testEngine.ServeDNS(context.Background(), q)
			if err != nil || len(r.Answer) != 1 {
				errs <- fmt.Errorf("%s: %v, %v", name, r, err)
				return
			}
			fake, _ := netip.AddrFromSlice(r.Answer[0].(*D.A).A)
			fake = fake.Unmap()
			if !stored(w, name, fake) {
				errs <- fmt.Errorf("neither cache.db nor its journal maps %s to %v right after its answer", name, fake)
			}
		})
	}
	// A slow disk: the journal's first write waits while the others
	// come in.
	w.io.Lock()
	close(start)
	queued := 0
	for deadline := time.Now().Add(10 * time.Second); queued < n/2 && time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		w.mu.Lock()
		if w.next != nil {
			queued = len(w.next.mappings)
		}
		w.mu.Unlock()
	}
	time.Sleep(20 * time.Millisecond)
	w.io.Unlock()
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	commits := w.commits.Load() - commitsBefore
	t.Logf("%d new names in %d journal writes (%d queued behind the first)", n, commits, queued)
	if commits < 1 || commits > n/10 {
		t.Errorf("%d new names took %d journal writes, want at most %d", n, commits, n/10)
	}
	// Folded, they are in cache.db in mihomo's format.
	if err := w.fold(); err != nil {
		t.Fatal(err)
	}
	store := cachefile.Cache().FakeIpStore()
	for i := range n {
		name := fmt.Sprintf("%s%d.example", prefix, i)
		fake, ok := store.GetByHost(name)
		if !ok {
			t.Errorf("cache.db has no %s after a fold", name)
			continue
		}
		if back, ok := store.GetByIP(fake); !ok || back != name {
			t.Errorf("cache.db maps %s to %v, and that back to %q (%v)", name, fake, back, ok)
		}
	}
	if fi, err := os.Stat(journalPath(w.db)); err != nil || fi.Size() != 0 {
		t.Errorf("journal after a fold: %v, %v; want empty", fi, err)
	}
	// Asked again, a name is answered from memory and not written again.
	q := new(D.Msg)
	q.SetQuestion(prefix+"0.example.", D.TypeA)
	before := w.commits.Load()
	if _, err := testEngine.ServeDNS(context.Background(), q); err != nil {
		t.Fatal(err)
	}
	if c := w.commits.Load() - before; c != 0 {
		t.Errorf("a known name took %d journal writes", c)
	}
}

func tempDB(t *testing.T) *bbolt.DB {
	t.Helper()
	db, err := bbolt.Open(filepath.Join(t.TempDir(), "cache.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// TestMappingsReusedAddress: an address handed to a second name (a pool
// that came round its range) stops mapping the first one in cache.db, and
// a pool built from cache.db gets only the mappings whose address and name
// agree, within its range.
func TestMappingsReusedAddress(t *testing.T) {
	db := tempDB(t)
	put := func(host, addr string) {
		t.Helper()
		m := mapping{host: host, ip: ip(addr)}
		if err := db.Update(func(tx *bbolt.Tx) error { return putMapping(tx, m) }); err != nil {
			t.Fatal(err)
		}
	}
	put("a.example", "10.99.0.4")
	put("b.example", "10.99.0.5")
	put("c.example", "10.99.0.4") // .4 reused: a.example loses it
	put("outside.example", "10.98.0.9")
	// A stale pair: d.example's own key points elsewhere.
	put("d.example", "10.99.0.6")
	put("d.example", "10.99.0.7")

	err := db.View(func(tx *bbolt.Tx) error {
		bk := tx.Bucket([]byte("fakeip"))
		if v := bk.Get([]byte("a.example")); v != nil {
			t.Errorf("a.example still maps to %v after its address went to c.example", v)
		}
		if v := bk.Get(ip("10.99.0.4").AsSlice()); string(v) != "c.example" {
			t.Errorf("10.99.0.4 maps to %q, want c.example", v)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	p := memoryPool(t, "10.99.0.0/24")
	store, ok := poolStore(p).Interface().(storeOps)
	if !ok {
		t.Fatal("the memory store lacks the methods tpgw calls")
	}
	loaded, err := loadMappings(db, p, store)
	if err != nil {
		t.Fatal(err)
	}
	returned := map[string]string{}
	for _, m := range loaded {
		returned[m.ip.String()] = m.host
	}
	for addr, want := range map[string]string{"10.99.0.4": "c.example", "10.99.0.5": "b.example", "10.99.0.7": "d.example", "10.99.0.6": ""} {
		host, _ := p.LookBack(ip(addr))
		if host != want {
			t.Errorf("loaded pool: %s → %q, want %q", addr, host, want)
		}
		if returned[addr] != want {
			t.Errorf("loadMappings returned %s → %q, want %q", addr, returned[addr], want)
		}
	}
	if len(returned) != 3 {
		t.Errorf("loadMappings returned %v, want the 3 loaded", loaded)
	}
	if p.Exist(ip("10.98.0.9")) {
		t.Error("a mapping outside the pool's range was loaded")
	}
	if got := p.Lookup("b.example"); got != ip("10.99.0.5") {
		t.Errorf("loaded pool: b.example → %v, want its stored 10.99.0.5", got)
	}
}

// TestSavedPositionReadByMihomo: the position tpgw saves is the one a pool
// mihomo builds from cache.db starts at (mihomo's keys and format).
func TestSavedPositionReadByMihomo(t *testing.T) {
	db := cachefile.Cache().DB
	// The test engine has no IPv6 pool: its bucket is free to use.
	prefix := netip.MustParsePrefix("fd00:98::/120")
	t.Cleanup(func() {
		_ = db.Update(func(tx *bbolt.Tx) error { return tx.DeleteBucket([]byte("fakeip6")) })
	})
	p, err := fakeip.New(fakeip.Options{IPNet: prefix, Size: 1000})
	if err != nil {
		t.Fatal(err)
	}
	want := position{ip("fd00:98::42"), true}
	lockedPool{p}.with(func(pos *position, _, _ netip.Addr) { *pos = want })
	saved, err := savePositions(db, []*fakeip.Pool{p})
	if err != nil || saved[p] != want {
		t.Fatalf("savePositions: %v, %v", saved, err)
	}
	built, err := fakeip.New(fakeip.Options{IPNet: prefix, Persistence: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := (lockedPool{built}).position(); got != want {
		t.Errorf("mihomo's pool built from cache.db starts at %+v, want %+v", got, want)
	}
}

// TestFlushFakeIP: a dashboard's "flush fake-ip" empties the pool and the
// mappings cache.db keeps for it.
func TestFlushFakeIP(t *testing.T) {
	q := new(D.Msg)
	q.SetQuestion("flushed.example.", D.TypeA)
	r, err := testEngine.ServeDNS(context.Background(), q)
	if err != nil || len(r.Answer) != 1 {
		t.Fatalf("fake-ip answer: %v, %v", r, err)
	}
	fake, _ := netip.AddrFromSlice(r.Answer[0].(*D.A).A)
	w := liveMappings.Load()
	if !stored(w, "flushed.example", fake.Unmap()) {
		t.Fatal("flushed.example not in cache.db or its journal after its answer")
	}
	q.SetQuestion("folded.example.", D.TypeA)
	if _, err := testEngine.ServeDNS(context.Background(), q); err != nil {
		t.Fatal(err)
	}
	if err := w.fold(); err != nil {
		t.Fatal(err)
	}
	// One mapping in the journal, one in cache.db.
	q.SetQuestion("journaled.example.", D.TypeA)
	if _, err := testEngine.ServeDNS(context.Background(), q); err != nil {
		t.Fatal(err)
	}
	store := cachefile.Cache().FakeIpStore()
	if _, ok := store.GetByHost("folded.example"); !ok {
		t.Fatal("folded.example not in cache.db after a fold")
	}
	rec := httptest.NewRecorder()
	flushFakeIP(rec, httptest.NewRequest(http.MethodPost, "/cache/fakeip/flush", nil))
	if rec.Code != http.StatusNoContent {
		t.Fatalf("flush: %d %s", rec.Code, rec.Body)
	}
	for _, name := range []string{"flushed.example", "folded.example"} {
		if got, ok := store.GetByHost(name); ok {
			t.Errorf("cache.db still maps %s to %v after the flush", name, got)
		}
	}
	if recs := journalRecords(t, w); len(recs) != 0 {
		t.Errorf("the journal still has %v after the flush", recs)
	}
	// Nor does a fold bring anything back.
	if err := w.fold(); err != nil {
		t.Fatal(err)
	}
	if got, ok := store.GetByHost("journaled.example"); ok {
		t.Errorf("cache.db maps journaled.example to %v after the flush and a fold", got)
	}
	if testEngine.pools[0].Exist(netip.MustParseAddr("198.18.0.4")) {
		t.Error("the pool still maps its first address after the flush")
	}
}

// TestFlushWhileAnswering: a flush while new names are answered leaves every
// answer in the pool's range and the pool usable. mihomo's Pool.FlushFakeIP
// moves the position without the pool's lock; tpgw's flush takes it (the
// data race shows under go test -race, which make test runs on this package).
func TestFlushWhileAnswering(t *testing.T) {
	prefix := testEngine.pools[0].IPNet()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			q := new(D.Msg)
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				q.SetQuestion(fmt.Sprintf("during-flush-%d-%d.example.", g, i), D.TypeA)
				r, err := testEngine.ServeDNS(context.Background(), q)
				if err == nil && len(r.Answer) != 1 {
					err = fmt.Errorf("answer %v", r)
				}
				if err == nil {
					if ip, _ := netip.AddrFromSlice(r.Answer[0].(*D.A).A.To4()); !prefix.Contains(ip) {
						err = fmt.Errorf("%s answered %v, outside %v", q.Question[0].Name, ip, prefix)
					}
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	for range 20 {
		rec := httptest.NewRecorder()
		flushFakeIP(rec, httptest.NewRequest(http.MethodPost, "/cache/fakeip/flush", nil))
		if rec.Code != http.StatusNoContent {
			t.Errorf("flush: %d %s", rec.Code, rec.Body)
		}
		time.Sleep(2 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	// The pool goes on: a name asked after the flushes maps both ways.
	q := new(D.Msg)
	q.SetQuestion("after-flushes.example.", D.TypeA)
	r, err := testEngine.ServeDNS(context.Background(), q)
	if err != nil || len(r.Answer) != 1 {
		t.Fatalf("answer after the flushes: %v, %v", r, err)
	}
	ip, _ := netip.AddrFromSlice(r.Answer[0].(*D.A).A.To4())
	if host, ok := testEngine.LookupFakeIP(ip); !ok || host != "after-flushes.example" {
		t.Errorf("%v maps back to %q (%v), want after-flushes.example", ip, host, ok)
	}
}

func TestMemoryStoreSize(t *testing.T) {
	for prefix, want := range map[string]int{
		"198.18.0.0/16": 1 << 16, "10.99.0.0/24": 256, "10.0.0.0/8": maxMemoryStore, "fd00::/64": maxMemoryStore, "fd00::/108": 1 << 20, "fd00::/120": 256,
	} {
		if got := memoryStoreSize(netip.MustParsePrefix(prefix)); got != want {
			t.Errorf("memoryStoreSize(%s) = %d, want %d", prefix, got, want)
		}
	}
}

// TestInstantAnswers: NewInstant's serve answers fake-ip queries as
// ServeDNS does, holding their new mappings until settle, which writes
// them all in one journal write; a name known already is not written
// again, and what is not a fake-ip query is left to ServeDNS.
func TestInstantAnswers(t *testing.T) {
	w := liveMappings.Load()
	if w == nil {
		t.Fatal("no mapping writer")
	}
	serve, settle := testEngine.NewInstant()
	const n = 20
	run := instantRuns.Add(1) // names of its own under -count
	fakes := make([]netip.Addr, n)
	commitsBefore := w.commits.Load()
	for i := range n {
		name := fmt.Sprintf("instant%d-%d.example", run, i)
		q := new(D.Msg)
		q.SetQuestion(name+".", D.TypeA)
		r, ok, unsettled := serve(q)
		if !ok || r == nil || len(r.Answer) != 1 || !unsettled {
			t.Fatalf("%s: serve gave %v, %v, unsettled %v; want a new fake IP", name, r, ok, unsettled)
		}
		a, isA := r.Answer[0].(*D.A)
		if !isA {
			t.Fatalf("%s: answer %v", name, r.Answer[0])
		}
		fakes[i], _ = netip.AddrFromSlice(a.A.To4())
		if !fakes[i].IsValid() || !netip.MustParsePrefix("198.18.0.0/16").Contains(fakes[i]) {
			t.Fatalf("%s: %v is not in the fake-ip range", name, fakes[i])
		}
		if stored(w, name, fakes[i]) {
			t.Fatalf("%s: written before settle", name)
		}
		if ip, ok := testEngine.LookupFakeIP(fakes[i]); !ok || ip != name {
			t.Fatalf("%s: the pool maps %v to %q (%v)", name, fakes[i], ip, ok)
		}
	}
	settle()
	for i := range n {
		if name := fmt.Sprintf("instant%d-%d.example", run, i); !stored(w, name, fakes[i]) {
			t.Errorf("%s → %v: not written after settle", name, fakes[i])
		}
	}
	if c := w.commits.Load() - commitsBefore; c != 1 {
		t.Errorf("%d new names took %d journal writes, want 1", n, c)
	}

	// Asked again: the same address, nothing written.
	before := w.commits.Load()
	q := new(D.Msg)
	q.SetQuestion(fmt.Sprintf("instant%d-0.example.", run), D.TypeA)
	r, ok, unsettled := serve(q)
	if !ok || len(r.Answer) != 1 || !bytesEqualIP(r.Answer[0], fakes[0]) || unsettled {
		t.Errorf("instant%d-0.example asked again: %v, %v, unsettled %v; want %v, settled", run, r, ok, unsettled, fakes[0])
	}
	settle()
	if c := w.commits.Load() - before; c != 0 {
		t.Errorf("a known name took %d journal writes", c)
	}

	// Not fake-ip queries: left to ServeDNS.
	for _, qt := range []uint16{D.TypeTXT, D.TypeMX, D.TypePTR} {
		q := new(D.Msg)
		q.SetQuestion(fmt.Sprintf("instant%d-0.example.", run), qt)
		if r, ok, _ := serve(q); ok {
			t.Errorf("%s query served at once: %v", D.TypeToString[qt], r)
		}
	}
}

// instantRuns numbers the runs of the instant tests, whose names must be
// new each time.
var instantRuns atomic.Int64

func bytesEqualIP(rr D.RR, ip netip.Addr) bool {
	a, ok := rr.(*D.A)
	if !ok {
		return false
	}
	got, _ := netip.AddrFromSlice(a.A.To4())
	return got == ip
}

// TestInstantNeverWaitsUpstream: should mihomo's DNS handler ask a
// nameserver for a query serve let through (here a handler without fake-ip,
// as a reload could swap in between serve's check and its call), serve gives
// up at once and leaves the query to ServeDNS: the DNS server's reader never
// waits for the network. The nameserver never answers.
func TestInstantNeverWaitsUpstream(t *testing.T) {
	silent, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	ns := []mdns.NameServer{{Net: "udp", Addr: silent.LocalAddr().String()}}
	rs := mdns.NewResolver(mdns.Config{Main: ns, Default: ns})
	saved := resolver.DefaultService
	resolver.DefaultService = mdns.NewService(rs.Resolver, mdns.NewEnhancer(mdns.EnhancerConfig{EnhancedMode: C.DNSNormal}))
	defer func() { resolver.DefaultService = saved }()

	serve, settle := testEngine.NewInstant()
	q := new(D.Msg)
	q.SetQuestion("upstream-only.example.", D.TypeA)
	start := time.Now()
	r, ok, _ := serve(q)
	took := time.Since(start)
	settle()
	if ok {
		t.Errorf("served at once by a handler that asks upstream: %v", r)
	}
	// mihomo's own timeout for a nameserver is seconds.
	if took > time.Second {
		t.Errorf("serve took %v: it waited for the nameserver", took)
	}
}

// TestInstantServeWhileSettling: serve and settle run concurrently, as the
// DNS server's reader and settler call them; after a last settle every
// mapping served is written.
func TestInstantServeWhileSettling(t *testing.T) {
	w := liveMappings.Load()
	if w == nil {
		t.Fatal("no mapping writer")
	}
	serve, settle := testEngine.NewInstant()
	const n = 300
	run := instantRuns.Add(1)
	fakes := make([]netip.Addr, n)
	done := make(chan struct{})
	settled := make(chan struct{})
	go func() {
		defer close(settled)
		for {
			select {
			case <-done:
				return
			default:
				settle()
			}
		}
	}()
	for i := range n {
		q := new(D.Msg)
		q.SetQuestion(fmt.Sprintf("concurrent%d-%d.example.", run, i), D.TypeA)
		r, ok, _ := serve(q)
		if !ok || len(r.Answer) != 1 {
			close(done)
			t.Fatalf("concurrent%d: %v, %v", i, r, ok)
		}
		fakes[i], _ = netip.AddrFromSlice(r.Answer[0].(*D.A).A.To4())
	}
	close(done)
	<-settled
	settle()
	for i := range n {
		if name := fmt.Sprintf("concurrent%d-%d.example", run, i); !stored(w, name, fakes[i]) {
			t.Errorf("%s → %v: not written after the last settle", name, fakes[i])
		}
	}
}

// TestAppendMappingsAlias: mihomo answers a name that a hosts entry aliases
// to another domain with a CNAME and the fake IP of that domain. The mapping
// written is the pool's own, under the domain's name, not the question's:
// left out, it was lost at the next restart.
func TestAppendMappingsAlias(t *testing.T) {
	fake := testEngine.pools[0].Lookup("alias-target.example")
	q := new(D.Msg)
	q.SetQuestion("alias.example.", D.TypeA)
	r := new(D.Msg)
	r.SetReply(q)
	r.Answer = []D.RR{
		&D.CNAME{Hdr: D.RR_Header{Name: "alias.example.", Rrtype: D.TypeCNAME, Class: D.ClassINET, Ttl: 1}, Target: "alias-target.example."},
		&D.A{Hdr: D.RR_Header{Name: "alias-target.example.", Rrtype: D.TypeA, Class: D.ClassINET, Ttl: 1}, A: net.IP(fake.AsSlice())},
	}
	got := testEngine.appendMappings(nil, q, r)
	if len(got) != 1 || got[0] != (mapping{host: "alias-target.example", ip: fake}) {
		t.Errorf("mappings of the aliased answer: %+v, want alias-target.example → %v", got, fake)
	}
}
