package engine

import (
	"fmt"
	"log/slog"
	"net/netip"
	"reflect"
	"sync"
	"time"
	"unsafe"

	"github.com/metacubex/bbolt"
	"github.com/metacubex/mihomo/component/fakeip"
	"github.com/metacubex/mihomo/component/profile/cachefile"
	"github.com/metacubex/mihomo/config"
)

// A fake IP must keep meaning the name it was handed out for while clients
// may still hold it, across crashes and reloads too.
//
// A mihomo fake-ip pool hands out the addresses of its range in order, and a
// pool built later starts where its store says. A persisted pool
// (store-fake-ip, on by default in tpgw) writes every mapping to cache.db at
// once but its position only when it stops cleanly (executor.Shutdown);
// after a crash the position restored is stale, and with no clean stop ever
// there is none and the whole table is emptied. A pool kept in memory
// (store-fake-ip: false, the OpenWrt package's default) starts each reload at
// the beginning of its range, although mihomo copies the mappings over. Either
// way the next new names got addresses handed out before, deleting those
// names' mappings, so a client that cached one reached another site.
//
// tpgw therefore hands the running pool's position to the new one on every
// reload (handOver). For a persisted pool it also saves the position whenever
// it moved, every positionSaveEvery, and marks cache.db while it runs; a
// start that finds the mark (the last run did not stop cleanly) moves the
// position past every address handed out since the last save.

// positionSaveEvery bounds how far the saved position can lag behind.
const positionSaveEvery = 200 * time.Millisecond

// crashSkip is how far a cycled pool's position moves after a crash: more
// new names than tpgw hands out in positionSaveEvery (mihomo's pool
// allocates about 15k a second on a 2-core x86 machine: each is a cache.db
// write), at most a quarter of the range. Addresses skipped keep their
// mappings until the pool comes round again.
const crashSkip = 4096

var (
	tpgwBucket = []byte("tpgw")
	runningKey = []byte("running")
)

// poolLayout locates the unexported fields of mihomo's fakeip.Pool that the
// position lives in (mihomo is pinned in go.mod; TestPoolLayout checks
// them). ok is false when a field is missing or has another type; tpgw
// then leaves the pool as mihomo keeps it.
var poolLayout = func() (l struct {
	mux, offset, cycle, first, last uintptr
	ok                              bool
}) {
	t := reflect.TypeFor[fakeip.Pool]()
	field := func(name string, typ reflect.Type) uintptr {
		f, found := t.FieldByName(name)
		if !found || f.Type != typ {
			l.ok = false
		}
		return f.Offset
	}
	addr := reflect.TypeFor[netip.Addr]()
	l.ok = true
	l.mux = field("mux", reflect.TypeFor[sync.Mutex]())
	l.offset = field("offset", addr)
	l.cycle = field("cycle", reflect.TypeFor[bool]())
	l.first = field("first", addr)
	l.last = field("last", addr)
	return l
}()

// position is where a pool stands: the last address handed out, and whether
// it has come round its range at least once.
type position struct {
	offset netip.Addr
	cycle  bool
}

// lockedPool gives access to a pool's position under the pool's own lock.
type lockedPool struct{ p *fakeip.Pool }

func (lp lockedPool) field(off uintptr) unsafe.Pointer { return unsafe.Add(unsafe.Pointer(lp.p), off) }
func (lp lockedPool) mux() *sync.Mutex                 { return (*sync.Mutex)(lp.field(poolLayout.mux)) }

// with runs fn with the pool locked; fn may change the position.
func (lp lockedPool) with(fn func(pos *position, first, last netip.Addr)) {
	mu := lp.mux()
	mu.Lock()
	defer mu.Unlock()
	off := (*netip.Addr)(lp.field(poolLayout.offset))
	cyc := (*bool)(lp.field(poolLayout.cycle))
	pos := position{*off, *cyc}
	fn(&pos, *(*netip.Addr)(lp.field(poolLayout.first)), *(*netip.Addr)(lp.field(poolLayout.last)))
	*off, *cyc = pos.offset, pos.cycle
}

func (lp lockedPool) position() (pos position) {
	lp.with(func(p *position, _, _ netip.Addr) { pos = *p })
	return pos
}

// save writes the position to cache.db with mihomo's own StoreState, under
// the pool's lock so that it reads a settled position.
func (lp lockedPool) save() position {
	var pos position
	lp.with(func(p *position, _, _ netip.Addr) {
		pos = *p
		lp.p.StoreState()
	})
	return pos
}

// fakeIPPools returns the fake-ip pools of cfg (nil when tpgw cannot reach
// their positions).
func fakeIPPools(cfg *config.Config) []*fakeip.Pool {
	if cfg == nil || cfg.DNS == nil || !poolLayout.ok {
		return nil
	}
	var pools []*fakeip.Pool
	for _, p := range []*fakeip.Pool{cfg.DNS.FakeIPPool, cfg.DNS.FakeIPPool6} {
		if p != nil {
			pools = append(pools, p)
		}
	}
	return pools
}

// persistedPools returns the fake-ip pools of cfg that persist to cache.db.
func persistedPools(cfg *config.Config) []*fakeip.Pool {
	if cfg == nil || !cfg.Profile.StoreFakeIP {
		return nil
	}
	return fakeIPPools(cfg)
}

// positions returns where each pool stands.
func positions(pools []*fakeip.Pool) map[*fakeip.Pool]position {
	m := make(map[*fakeip.Pool]position, len(pools))
	for _, p := range pools {
		m[p] = lockedPool{p}.position()
	}
	return m
}

// handOver moves each pool of a reloaded config that covers the range of a
// pool of the running one to where the running one stands. A pool mihomo
// builds starts where its store says: the position saved in cache.db
// (persisted; beforeReload saved it), or the start of the range (in memory,
// although mihomo copies the mappings over). built holds the new pools'
// positions from before the switch; DNS is answered throughout, so the old
// pool may have handed out more since.
func handOver(old []*fakeip.Pool, built map[*fakeip.Pool]position) {
	for np, start := range built {
		for _, op := range old {
			if op == np || op.IPNet() != np.IPNet() {
				continue
			}
			oldPos := lockedPool{op}.position()
			lockedPool{np}.with(func(pos *position, _, _ netip.Addr) {
				// Unless the new pool handed out addresses in the moment
				// since the switch too, it takes the old one's position.
				if pos.offset == start.offset || pos.offset.Less(oldPos.offset) {
					pos.offset = oldPos.offset
				}
				pos.cycle = pos.cycle || oldPos.cycle
			})
		}
	}
}

// fakeIPKeeper keeps the positions of the running config's persisted pools
// saved while tpgw runs.
type fakeIPKeeper struct {
	db    *bbolt.DB
	mu    sync.Mutex // pools, saved
	pools []*fakeip.Pool
	saved map[*fakeip.Pool]position
	stop  chan struct{}
	done  chan struct{}
}

// startFakeIPKeeper takes over the pools of cfg, which mihomo built but
// nothing uses yet. If the last run did not stop cleanly it moves each
// position past the addresses handed out since its last save. It saves every
// position and marks cache.db as in use before it returns. It returns nil
// when no pool persists.
func startFakeIPKeeper(cfg *config.Config, log *slog.Logger) (*fakeIPKeeper, error) {
	pools := persistedPools(cfg)
	cf := cachefile.Cache()
	if len(pools) == 0 || cf == nil || cf.DB == nil {
		if cfg != nil && cfg.Profile.StoreFakeIP && !poolLayout.ok {
			log.Warn("fake-ip pool position is saved only at a clean stop: this mihomo's fakeip.Pool is not the one tpgw knows")
		}
		return nil, nil
	}
	k := &fakeIPKeeper{db: cf.DB, saved: map[*fakeip.Pool]position{},
		stop: make(chan struct{}), done: make(chan struct{})}
	unclean, err := k.marked()
	if err != nil {
		return nil, err
	}
	for _, p := range pools {
		if unclean {
			store := storeOf(cf, p)
			mapped := func(ip netip.Addr) bool { _, ok := store.GetByIP(ip); return ok }
			before, after := recoverPosition(lockedPool{p}, mapped)
			log.Info("fake-ip pool position recovered after an unclean stop",
				"range", p.IPNet(), "saved", before.offset, "now", after.offset, "cycle", after.cycle)
		}
		k.saved[p] = lockedPool{p}.save()
	}
	k.pools = pools
	if err := k.mark(true); err != nil {
		return nil, err
	}
	go k.loop()
	return k, nil
}

func storeOf(cf *cachefile.CacheFile, p *fakeip.Pool) *cachefile.FakeIpStore {
	if p.IPNet().Addr().Is6() {
		return cf.FakeIpStore6()
	}
	return cf.FakeIpStore()
}

// recoverPosition moves a pool's position past every address handed out
// since its last save. Until a pool comes round its range, it hands out
// addresses in order, so those are the mapped addresses that follow the
// saved position. Once it has come round every address is mapped, and the
// position moves crashSkip addresses on.
func recoverPosition(lp lockedPool, mapped func(netip.Addr) bool) (before, after position) {
	lp.with(func(pos *position, first, last netip.Addr) {
		before = *pos
		if !pos.cycle {
			next := pos.offset.Next()
			for next.Less(last) {
				if !mapped(next) {
					break
				}
				pos.offset, next = next, next.Next()
			}
			if next.Less(last) {
				after = *pos
				return
			}
			// Mapped to the end: the pool may have come round since the save.
			pos.cycle = true
		}
		skip := min(crashSkip, rangeSize(first, last, 4*crashSkip)/4)
		for range skip {
			if pos.offset = pos.offset.Next(); !pos.offset.Less(last) {
				pos.offset = first
			}
		}
		after = *pos
	})
	return before, after
}

// rangeSize is the number of addresses from first up to last, or limit if
// there are more.
func rangeSize(first, last netip.Addr, limit int) int {
	n := 0
	for a := first; a.Less(last) && n < limit; a = a.Next() {
		n++
	}
	return n
}

func (k *fakeIPKeeper) loop() {
	defer close(k.done)
	t := time.NewTicker(positionSaveEvery)
	defer t.Stop()
	for {
		select {
		case <-k.stop:
			return
		case <-t.C:
			k.saveMoved()
		}
	}
}

// saveMoved saves the position of each pool that moved since its last save.
func (k *fakeIPKeeper) saveMoved() {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, p := range k.pools {
		lp := lockedPool{p}
		if lp.position() != k.saved[p] {
			k.saved[p] = lp.save()
		}
	}
}

// beforeReload saves the positions, so that the persisted pools mihomo
// builds for the new config start from them.
func (k *fakeIPKeeper) beforeReload() {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, p := range k.pools {
		k.saved[p] = lockedPool{p}.save()
	}
}

// afterReload takes over the persisted pools of the applied config (after
// handOver) and saves their positions.
func (k *fakeIPKeeper) afterReload(cfg *config.Config) {
	pools := persistedPools(cfg)
	saved := map[*fakeip.Pool]position{}
	for _, p := range pools {
		saved[p] = lockedPool{p}.save()
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	k.pools, k.saved = pools, saved
}

// close stops the saving. The caller stops mihomo next (its Shutdown saves
// the positions one last time) and then calls unmark.
func (k *fakeIPKeeper) close() {
	close(k.stop)
	<-k.done
	k.saveMoved()
}

// unmark records a clean stop.
func (k *fakeIPKeeper) unmark() error { return k.mark(false) }

func (k *fakeIPKeeper) mark(running bool) error {
	err := k.db.Update(func(tx *bbolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(tpgwBucket)
		if err != nil {
			return err
		}
		if running {
			return b.Put(runningKey, []byte(time.Now().UTC().Format(time.RFC3339)))
		}
		return b.Delete(runningKey)
	})
	if err != nil {
		return fmt.Errorf("cache.db %s: %w", k.db.Path(), err)
	}
	return nil
}

// marked reports whether the last run left its mark: it did not stop cleanly.
func (k *fakeIPKeeper) marked() (bool, error) {
	var found bool
	err := k.db.View(func(tx *bbolt.Tx) error {
		if b := tx.Bucket(tpgwBucket); b != nil {
			found = b.Get(runningKey) != nil
		}
		return nil
	})
	if err != nil {
		return false, fmt.Errorf("cache.db %s: %w", k.db.Path(), err)
	}
	return found, nil
}
