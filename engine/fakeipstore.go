package engine

import (
	"bytes"
	"fmt"
	"maps"
	"math/bits"
	"net/netip"
	"reflect"
	"slices"
	"sync/atomic"
	"unsafe"

	"github.com/metacubex/bbolt"
	"github.com/metacubex/mihomo/component/fakeip"
	D "github.com/miekg/dns"
)

// A persisted fake-ip pool (store-fake-ip) in mihomo reads and writes
// cache.db for every name: the pool looks a name up in cache.db, and a new
// name costs two bbolt write transactions, all under the pool's lock, so
// new names are answered one at a time at the pace of the disk writes
// (about 95 µs each on a 2-core x86 machine, against 3 µs for a pool kept in
// memory).
//
// tpgw keeps a persisted pool's mappings in memory instead (mihomo's own
// memory store, sized to the pool's range and loaded from cache.db when the
// pool is built), and writes new mappings itself, outside the pool's lock:
// the DNS answer that carries a new fake IP leaves only once its mapping is
// written, as before, but the answers of all the names that came in
// meanwhile share one write, to a journal that is folded into cache.db
// every few thousand names (fakeipjournal.go). What a crash or a restart
// keeps is unchanged: every fake IP a client got is in cache.db, in mihomo's
// own format (mihomo reads it back the same way), or in the journal, which
// the next start folds into cache.db before it builds the pools.
//
// The cost: the mappings of a persisted pool are in memory as well as in
// cache.db, about 300 bytes per name of 30 characters (measured with
// runtime.MemStats over 50,000 names), and the writer's index of what is
// written about 50 more (mappingWriter.storedLocked): 23 MB once every
// address of a /16 range is in use. The OpenWrt package keeps
// store-fake-ip off.

// storeLayout locates fakeip.Pool's store field (an unexported interface).
var storeLayout = func() (l struct {
	off uintptr
	typ reflect.Type
	ok  bool
}) {
	f, found := reflect.TypeFor[fakeip.Pool]().FieldByName("store")
	if !found || f.Type.Kind() != reflect.Interface {
		return l
	}
	l.off, l.typ, l.ok = f.Offset, f.Type, true
	return l
}()

// storeOps are the methods of mihomo's fake-ip stores tpgw calls.
type storeOps interface {
	GetByIP(ip netip.Addr) (string, bool)
	PutByIP(ip netip.Addr, host string)
	PutByHost(host string, ip netip.Addr)
}

// poolStore is p's store field, settable.
func poolStore(p *fakeip.Pool) reflect.Value {
	return reflect.NewAt(storeLayout.typ, unsafe.Add(unsafe.Pointer(p), storeLayout.off)).Elem()
}

// persistedStore reports whether p keeps its mappings in cache.db
// (mihomo's cachefile store).
func persistedStore(p *fakeip.Pool) bool {
	if !storeLayout.ok || !poolLayout.ok {
		return false
	}
	s := poolStore(p)
	return !s.IsNil() && s.Elem().Type().String() == "*fakeip.cachefileStore"
}

// mihomo's cache.db buckets for the mappings of IPv4 and IPv6 pools.
var fakeIPBuckets = [2][]byte{[]byte("fakeip"), []byte("fakeip6")}

// bucketFor is the cache.db bucket mihomo keeps the mappings of addresses
// of a's family in.
func bucketFor(a netip.Addr) []byte {
	if a.Is6() {
		return fakeIPBuckets[1]
	}
	return fakeIPBuckets[0]
}

// mihomo's keys for a persisted pool's position (fakeip.Pool.StoreState).
var (
	offsetKey = []byte("key-offset-fake-ip")
	cycleKey  = []byte("key-cycle-fake-ip")
)

// maxMemoryStore bounds the memory store of a pool with a huge range (a /8
// has 16M addresses); mihomo's memory store forgets the least recently used
// names beyond it.
const maxMemoryStore = 1 << 20

// memoryStoreSize is the number of addresses in prefix, at most
// maxMemoryStore.
func memoryStoreSize(prefix netip.Prefix) int {
	if hostBits := prefix.Addr().BitLen() - prefix.Bits(); hostBits < bits.Len(maxMemoryStore) {
		return 1 << hostBits
	}
	return maxMemoryStore
}

// keepInMemory gives each persisted pool of pools a memory store holding
// the mappings cache.db has for its range, and says whether it did; w
// notes them as stored (mappingWriter.storedLocked). The pools must not be
// in use yet (mihomo just built them).
func keepInMemory(db *bbolt.DB, pools []*fakeip.Pool, w *mappingWriter) (bool, error) {
	swapped := false
	for _, p := range pools {
		if !persistedStore(p) {
			continue
		}
		mem, err := fakeip.New(fakeip.Options{IPNet: p.IPNet(), Size: memoryStoreSize(p.IPNet())})
		if err != nil {
			return swapped, err
		}
		store, ok := poolStore(mem).Interface().(storeOps)
		if !ok {
			// Not the mihomo tpgw knows (TestPersistedPoolKeptInMemory):
			// the pool stays as mihomo made it.
			continue
		}
		loaded, err := loadMappings(db, p, store)
		if err != nil {
			return swapped, err
		}
		w.noteStored(loaded)
		lp := lockedPool{p}
		lp.mux().Lock()
		poolStore(p).Set(poolStore(mem))
		lp.mux().Unlock()
		swapped = true
	}
	return swapped, nil
}

// loadMappings puts the mappings cache.db holds for p's range into store,
// and returns them: those whose address and name point at each other (a
// name that got another address since leaves a stale entry behind).
func loadMappings(db *bbolt.DB, p *fakeip.Pool, store storeOps) ([]mapping, error) {
	var loaded []mapping
	err := db.View(func(tx *bbolt.Tx) error {
		bk := tx.Bucket(bucketFor(p.IPNet().Addr()))
		if bk == nil {
			return nil
		}
		return bk.ForEach(func(k, v []byte) error {
			ip, ok := netip.AddrFromSlice(k)
			if !ok || (len(k) != 4 && len(k) != 16) || !p.IPNet().Contains(ip) {
				return nil
			}
			if back := bk.Get(v); back == nil || !bytes.Equal(back, k) {
				return nil
			}
			host := string(v)
			store.PutByIP(ip, host)
			store.PutByHost(host, ip)
			loaded = append(loaded, mapping{host, ip})
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("cache.db %s: reading the fake-ip mappings: %w", db.Path(), err)
	}
	return loaded, nil
}

// savePositions writes the positions of pools to cache.db where mihomo's
// StoreState does, in one transaction, and returns them.
func savePositions(db *bbolt.DB, pools []*fakeip.Pool) (map[*fakeip.Pool]position, error) {
	saved := make(map[*fakeip.Pool]position, len(pools))
	for _, p := range pools {
		saved[p] = lockedPool{p}.position()
	}
	err := db.Update(func(tx *bbolt.Tx) error {
		for p, pos := range saved {
			bk, err := tx.CreateBucketIfNotExists(bucketFor(p.IPNet().Addr()))
			if err != nil {
				return err
			}
			if err := bk.Put(offsetKey, pos.offset.AsSlice()); err != nil {
				return err
			}
			if pos.cycle {
				if err := bk.Put(cycleKey, pos.offset.AsSlice()); err != nil {
					return err
				}
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("cache.db %s: %w", db.Path(), err)
	}
	return saved, nil
}

// liveMappings writes the new mappings of the running config's persisted
// pools while they keep them in memory (keepInMemory); nil otherwise.
// mihomo's state is process-wide, and so is this.
var liveMappings atomic.Pointer[mappingWriter]

// putMapping records m as mihomo's cachefile store does (address → name and
// name → address), dropping the name the address had before.
func putMapping(tx *bbolt.Tx, m mapping) error {
	bk, err := tx.CreateBucketIfNotExists(bucketFor(m.ip))
	if err != nil {
		return err
	}
	key := m.ip.AsSlice()
	if old := bk.Get(key); old != nil && string(old) != m.host {
		if back := bk.Get(old); back != nil && bytes.Equal(back, key) {
			if err := bk.Delete(bytes.Clone(old)); err != nil {
				return err
			}
		}
	}
	if err := bk.Put(key, []byte(m.host)); err != nil {
		return err
	}
	return bk.Put([]byte(m.host), key)
}

// putMappings records recs, in order, as putMapping one after another
// would, but writes each key once and in key order. bbolt keeps a leaf's
// keys in a sorted slice: names and addresses put in the random order they
// came in shift that slice on every insert, which made a fold of tens of
// thousands of names into a young bucket quadratic (268 µs a name at
// 32768, against 4.5 µs in key order). So the records are first applied to
// an overlay of the buckets (reads fall through to cache.db), and the
// overlay is then written out sorted.
func putMappings(tx *bbolt.Tx, recs []mapping) error {
	overlays := map[string]*bucketOverlay{} // by bucket name
	for _, m := range recs {
		name := bucketFor(m.ip)
		o := overlays[string(name)]
		if o == nil {
			bk, err := tx.CreateBucketIfNotExists(name)
			if err != nil {
				return err
			}
			o = &bucketOverlay{bk: bk, changes: map[string][]byte{}}
			overlays[string(name)] = o
		}
		key := m.ip.AsSlice()
		if old := o.get(key); old != nil && string(old) != m.host {
			if back := o.get(old); back != nil && bytes.Equal(back, key) {
				o.changes[string(old)] = nil
			}
		}
		o.changes[string(key)] = []byte(m.host)
		o.changes[m.host] = key
	}
	for _, o := range overlays {
		keys := slices.Sorted(maps.Keys(o.changes))
		for _, k := range keys {
			var err error
			if v := o.changes[k]; v == nil {
				err = o.bk.Delete([]byte(k))
			} else {
				err = o.bk.Put([]byte(k), v)
			}
			if err != nil {
				return err
			}
		}
	}
	return nil
}

// bucketOverlay is a bucket's changes that putMappings has not written yet.
type bucketOverlay struct {
	bk      *bbolt.Bucket
	changes map[string][]byte // key → value; nil: delete the key
}

// get is k's value with the changes applied.
func (o *bucketOverlay) get(k []byte) []byte {
	if v, ok := o.changes[string(k)]; ok {
		return v
	}
	return o.bk.Get(k)
}

// persistAnswer writes the fake IPs of r, mihomo's answer to q, to cache.db's
// journal when the pools keep their mappings in memory (keepInMemory); it
// returns once they are written.
func (e *Engine) persistAnswer(q, r *D.Msg) error {
	w := liveMappings.Load()
	if w == nil || r == nil || len(q.Question) != 1 {
		return nil
	}
	var buf [2]mapping
	ms := e.appendMappings(buf[:0], q, r)
	if err := w.writeAll(ms); err != nil {
		return fmt.Errorf("fake-ip mappings of %s not written: %w", q.Question[0].Name, err)
	}
	return nil
}

// appendMappings appends the fake-ip mappings r, mihomo's answer to q (one
// question), carries to ms.
func (e *Engine) appendMappings(ms []mapping, q, r *D.Msg) []mapping {
	if r == nil || len(q.Question) != 1 || len(r.Answer) == 0 {
		return ms
	}
	for _, rr := range r.Answer {
		var ip netip.Addr
		switch a := rr.(type) {
		case *D.A:
			ip, _ = netip.AddrFromSlice(a.A.To4())
		case *D.AAAA:
			ip, _ = netip.AddrFromSlice(a.AAAA)
		default:
			continue
		}
		// An address the pool maps, to the name it maps it to: that may be
		// another than the question's (a hosts entry that aliases the name
		// to another domain answers with the fake IP of that one).
		if mapped, ok := e.LookupFakeIP(ip); ok {
			ms = append(ms, mapping{host: mapped, ip: ip})
		}
	}
	return ms
}
