package engine

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
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
// (store-fake-ip: false, the OpenWrt package's default) starts at the
// beginning of its range on each reload (mihomo copies the mappings over) and
// each start (with none). Either way the next new names got addresses handed
// out before, so a client that cached one for a name reached another site.
//
// tpgw therefore hands the running pool's position to the new one on every
// reload (handOver), and saves the position whenever it moved, every
// positionSaveEvery: in cache.db for a persisted pool, in a file in tpgw's
// state directory (tmpfs) for one kept in memory. It marks the place while it
// runs. A start that finds the mark (the last run did not stop cleanly)
// moves the position past every address handed out since the last save:
// those still mapped in cache.db, or crashSkip addresses when the mappings
// died with the process.

// positionSaveEvery bounds how far the saved position can lag behind.
const positionSaveEvery = 200 * time.Millisecond

// crashSkip is how far a position moves after a crash when the addresses
// handed out since the last save cannot be told (a cycled pool, or one kept
// in memory), at most a quarter of the range: far more new names than a LAN
// asks for in positionSaveEvery (a persisted pool's ceiling, about 15k a
// second on a 2-core x86 machine, is 3,000 in that time; one in memory is
// bounded by the DNS server, about 100k a second). Addresses skipped keep
// their mappings, if any, until the pool comes round.
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

// positions returns where each pool stands.
func positions(pools []*fakeip.Pool) map[*fakeip.Pool]position {
	m := make(map[*fakeip.Pool]position, len(pools))
	for _, p := range pools {
		m[p] = lockedPool{p}.position()
	}
	return m
}

// placeAhead moves each pool of a reloaded config that covers the range of
// a pool of the running one past the running one's position, before mihomo
// switches over to it. mihomo switches DNS to the new pools in the middle of
// ApplyConfig, which then goes on (listeners, provider loads over the
// network) before handOver can run; a new pool left where it was built (the
// start of its range when it is kept in memory, the position saved at
// beforeReload when persisted) would meanwhile hand the addresses of names
// the running pool answered to new names. The margin covers the new names
// the running pool still answers before the switch; handOver then puts a
// pool that handed out nothing right behind the running one.
func placeAhead(running, fresh []*fakeip.Pool) {
	for _, np := range fresh {
		for _, op := range running {
			if op == np || op.IPNet() != np.IPNet() {
				continue
			}
			from := lockedPool{op}.position()
			n := aheadMargin(np.IPNet())
			lockedPool{np}.with(func(pos *position, first, last netip.Addr) {
				*pos = from
				// As mihomo's pool steps: past the end it starts again at
				// first, recycling.
				for range n {
					pos.offset = pos.offset.Next()
					if !pos.offset.Less(last) {
						pos.cycle, pos.offset = true, first
					}
				}
			})
		}
	}
}

// aheadMargin is how many addresses placeAhead skips: 4096 in a range of
// 2^16 addresses or more (mihomo's default 198.18.0.1/16), a sixteenth of a
// smaller one.
func aheadMargin(r netip.Prefix) int {
	host := min(r.Addr().BitLen()-r.Bits(), 16)
	return 1 << max(host-4, 0)
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

// fakeIPKeeper keeps the positions of the running config's pools saved
// while tpgw runs, in cache.db for persisted pools, in a file in tpgw's
// state directory for pools kept in memory.
type fakeIPKeeper struct {
	back  positionBacking
	mu    sync.Mutex // pools, saved
	pools []*fakeip.Pool
	saved map[*fakeip.Pool]position
	stop  chan struct{}
	done  chan struct{}
}

// positionBacking is where a keeper saves positions and marks a running tpgw.
type positionBacking interface {
	// restore moves pools mihomo just built to their saved positions
	// (mihomo restores a persisted pool from cache.db itself).
	restore(pools []*fakeip.Pool) error
	// mapped reports whether an address of p's range has a saved mapping;
	// nil when mappings do not outlive the process.
	mapped(p *fakeip.Pool) func(netip.Addr) bool
	// save saves every pool's position and returns them.
	save(pools []*fakeip.Pool) (map[*fakeip.Pool]position, error)
	mark(running bool) error
	marked() (bool, error)
}

// startFakeIPKeeper takes over the pools of cfg, which mihomo built but
// nothing uses yet. It moves each to its saved position and, if the last run
// did not stop cleanly, past the addresses handed out since that save. It
// saves every position and marks the backing as in use before it returns.
// stateDir holds the file for pools kept in memory; with none, or with no
// pool, it returns nil.
func startFakeIPKeeper(cfg *config.Config, stateDir string, log *slog.Logger) (*fakeIPKeeper, error) {
	pools := fakeIPPools(cfg)
	if cfg != nil && cfg.DNS != nil && (cfg.DNS.FakeIPPool != nil || cfg.DNS.FakeIPPool6 != nil) && !poolLayout.ok {
		log.Warn("fake-ip pool position is not kept across reloads and crashes: this mihomo's fakeip.Pool is not the one tpgw knows")
	}
	var back positionBacking
	switch cf := cachefile.Cache(); {
	case len(pools) == 0:
		return nil, nil
	case cfg.Profile.StoreFakeIP:
		if cf == nil || cf.DB == nil {
			return nil, nil
		}
		back = cacheBacking{cf}
	case stateDir != "":
		back = fileBacking{dir: stateDir}
	default:
		return nil, nil
	}
	k := &fakeIPKeeper{back: back, stop: make(chan struct{}), done: make(chan struct{})}
	unclean, err := back.marked()
	if err != nil {
		return nil, err
	}
	if err := back.restore(pools); err != nil {
		return nil, err
	}
	for _, p := range pools {
		if !unclean {
			break
		}
		before, after := recoverPosition(lockedPool{p}, back.mapped(p))
		log.Info("fake-ip pool position recovered after an unclean stop",
			"range", p.IPNet(), "saved", before.offset, "now", after.offset, "cycle", after.cycle)
	}
	if k.saved, err = back.save(pools); err != nil {
		return nil, err
	}
	k.pools = pools
	if err := back.mark(true); err != nil {
		return nil, err
	}
	go k.loop()
	return k, nil
}

// recoverGap is how far past the last mapped address recoverPosition looks
// for more: the mappings of the addresses handed out last are not all written
// when the process dies, nor written in the order handed out (a burst of new
// names waits for the DNS server's settler, of at most 1024, while a name
// asked over TCP is written at once), so the written ones can have gaps.
const recoverGap = 2048

// recoverPosition moves a pool's position past every address handed out
// since its last save. Until a pool comes round its range, it hands out
// addresses in order, so those are the mapped addresses that follow the
// saved position, with gaps of at most recoverGap. Once it has come round
// every address is mapped, and the position moves crashSkip addresses on;
// so it does when mapped is nil (the mappings died with the process).
func recoverPosition(lp lockedPool, mapped func(netip.Addr) bool) (before, after position) {
	lp.with(func(pos *position, first, last netip.Addr) {
		before = *pos
		if !pos.cycle && mapped != nil {
			next, gap := pos.offset.Next(), 0
			for next.Less(last) && gap < recoverGap {
				if mapped(next) {
					pos.offset, gap = next, 0
				} else {
					gap++
				}
				next = next.Next()
			}
			// Stopped at a long gap, or at the end of the range after
			// addresses nothing mapped: the pool has not come round.
			if next.Less(last) || gap > 0 {
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

// saveMoved saves the positions if a pool moved since the last save.
func (k *fakeIPKeeper) saveMoved() {
	k.mu.Lock()
	defer k.mu.Unlock()
	moved := false
	for _, p := range k.pools {
		moved = moved || lockedPool{p}.position() != k.saved[p]
	}
	if moved {
		k.saveLocked()
	}
}

func (k *fakeIPKeeper) saveLocked() {
	saved, err := k.back.save(k.pools)
	if err == nil {
		k.saved = saved
	}
}

// beforeReload saves the positions, so that the persisted pools mihomo
// builds for the new config start from them.
func (k *fakeIPKeeper) beforeReload() {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.saveLocked()
}

// afterReload takes over the pools of the applied config (after handOver)
// and saves their positions.
func (k *fakeIPKeeper) afterReload(cfg *config.Config) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.pools = fakeIPPools(cfg)
	k.saveLocked()
}

// close stops the saving and saves the positions one last time; unmark
// follows.
func (k *fakeIPKeeper) close() {
	close(k.stop)
	<-k.done
	k.mu.Lock()
	defer k.mu.Unlock()
	k.saveLocked()
}

// unmark records a clean stop.
func (k *fakeIPKeeper) unmark() error { return k.back.mark(false) }

// cacheBacking keeps positions where mihomo does, in cache.db (mihomo's own
// keys, as its StoreState writes them: the pools keep their mappings in
// memory, and StoreState then writes nothing), and the running mark in
// tpgw's bucket.
type cacheBacking struct{ cf *cachefile.CacheFile }

func (cacheBacking) restore([]*fakeip.Pool) error { return nil }

func (b cacheBacking) mapped(p *fakeip.Pool) func(netip.Addr) bool {
	store := b.cf.FakeIpStore()
	if p.IPNet().Addr().Is6() {
		store = b.cf.FakeIpStore6()
	}
	return func(ip netip.Addr) bool { _, ok := store.GetByIP(ip); return ok }
}

func (b cacheBacking) save(pools []*fakeip.Pool) (map[*fakeip.Pool]position, error) {
	return savePositions(b.cf.DB, pools)
}

func (b cacheBacking) mark(running bool) error {
	db := b.cf.DB
	err := db.Update(func(tx *bbolt.Tx) error {
		bk, err := tx.CreateBucketIfNotExists(tpgwBucket)
		if err != nil {
			return err
		}
		if running {
			return bk.Put(runningKey, []byte(time.Now().UTC().Format(time.RFC3339)))
		}
		return bk.Delete(runningKey)
	})
	if err != nil {
		return fmt.Errorf("cache.db %s: %w", db.Path(), err)
	}
	return nil
}

func (b cacheBacking) marked() (bool, error) {
	var found bool
	err := b.cf.DB.View(func(tx *bbolt.Tx) error {
		if bk := tx.Bucket(tpgwBucket); bk != nil {
			found = bk.Get(runningKey) != nil
		}
		return nil
	})
	if err != nil {
		return false, fmt.Errorf("cache.db %s: %w", b.cf.DB.Path(), err)
	}
	return found, nil
}

// fileBacking keeps the positions of pools kept in memory in a file in
// tpgw's state directory (tmpfs: it outlives a restart of tpgw, not of the
// machine, and writing it costs no flash). The mappings die with the
// process; the position only keeps the next new names off the addresses
// clients may still hold, which then map to nothing rather than to another
// name.
type fileBacking struct{ dir string }

const (
	positionFile = "fakeip-position"
	runningFile  = "fakeip-running"
)

// restore reads lines of "range offset cycle" and moves each pool of a
// listed range to its offset.
func (b fileBacking) restore(pools []*fakeip.Pool) error {
	data, err := os.ReadFile(filepath.Join(b.dir, positionFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) != 3 {
			continue
		}
		prefix, err1 := netip.ParsePrefix(f[0])
		offset, err2 := netip.ParseAddr(f[1])
		if err1 != nil || err2 != nil {
			continue
		}
		for _, p := range pools {
			if p.IPNet() != prefix {
				continue
			}
			lockedPool{p}.with(func(pos *position, first, last netip.Addr) {
				// From before the first address (a fresh pool) up to the last.
				if !offset.Less(first.Prev()) && offset.Less(last) {
					*pos = position{offset, f[2] == "cycle"}
				}
			})
		}
	}
	return nil
}

func (fileBacking) mapped(*fakeip.Pool) func(netip.Addr) bool { return nil }

func (b fileBacking) save(pools []*fakeip.Pool) (map[*fakeip.Pool]position, error) {
	saved := make(map[*fakeip.Pool]position, len(pools))
	var sb strings.Builder
	for _, p := range pools {
		pos := lockedPool{p}.position()
		saved[p] = pos
		cycle := "-"
		if pos.cycle {
			cycle = "cycle"
		}
		fmt.Fprintf(&sb, "%s %s %s\n", p.IPNet(), pos.offset, cycle)
	}
	return saved, b.write(positionFile, sb.String())
}

// write replaces a file in the state directory in one step.
func (b fileBacking) write(name, content string) error {
	if err := os.MkdirAll(b.dir, 0o700); err != nil {
		return err
	}
	tmp := filepath.Join(b.dir, name+".tmp")
	if err := os.WriteFile(tmp, []byte(content), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(b.dir, name))
}

func (b fileBacking) mark(running bool) error {
	if running {
		return b.write(runningFile, time.Now().UTC().Format(time.RFC3339)+"\n")
	}
	err := os.Remove(filepath.Join(b.dir, runningFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}

func (b fileBacking) marked() (bool, error) {
	_, err := os.Stat(filepath.Join(b.dir, runningFile))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	return err == nil, err
}
