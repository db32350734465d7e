package engine

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/metacubex/bbolt"
	"github.com/metacubex/mihomo/component/fakeip"
	D "github.com/miekg/dns"
)

// stored reports whether the journal file of w or cache.db maps host to ip
// (what a crash right now would keep).
func stored(w *mappingWriter, host string, ip netip.Addr) bool {
	data, err := os.ReadFile(journalPath(w.db))
	if err == nil {
		recs, _ := parseJournal(data)
		for _, m := range recs {
			if m.host == host && m.ip == ip {
				return true
			}
		}
	}
	found := false
	_ = w.db.View(func(tx *bbolt.Tx) error {
		if bk := tx.Bucket(bucketFor(ip)); bk != nil {
			found = string(bk.Get(ip.AsSlice())) == host && bytes.Equal(bk.Get([]byte(host)), ip.AsSlice())
		}
		return nil
	})
	return found
}

// journalRecords are the records of w's journal file.
func journalRecords(t *testing.T, w *mappingWriter) []mapping {
	t.Helper()
	data, err := os.ReadFile(journalPath(w.db))
	if err != nil {
		t.Fatal(err)
	}
	recs, rest := parseJournal(data)
	if rest != 0 {
		t.Errorf("the journal ends with %d bytes that are no record", rest)
	}
	return recs
}

// dbMapping is what db maps host to, and that address back to.
func dbMapping(t *testing.T, db *bbolt.DB, host string) (ip netip.Addr, back string) {
	t.Helper()
	err := db.View(func(tx *bbolt.Tx) error {
		for _, name := range fakeIPBuckets {
			bk := tx.Bucket(name)
			if bk == nil {
				continue
			}
			if v := bk.Get([]byte(host)); v != nil {
				ip, _ = netip.AddrFromSlice(v)
				back = string(bk.Get(v))
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return ip, back
}

// write journals m alone (writeAll).
func (w *mappingWriter) write(m mapping) error { return w.writeAll([]mapping{m}) }

func newMapping(host, addr string) mapping {
	ip := netip.MustParseAddr(addr)
	return mapping{host: host, ip: ip}
}

func TestJournalRecords(t *testing.T) {
	long := string(bytes.Repeat([]byte("a"), 300))
	in := []mapping{newMapping("a.example", "198.18.0.5"), newMapping("v6.example", "fd00::1:2"), newMapping(long, "198.18.255.254")}
	var b []byte
	for _, m := range in {
		b = appendRecord(b, m)
	}
	recs, rest := parseJournal(b)
	if rest != 0 || len(recs) != len(in) {
		t.Fatalf("parsed %d records and %d bytes left, want %d and 0", len(recs), rest, len(in))
	}
	for i := range in {
		if recs[i] != in[i] {
			t.Errorf("record %d = %+v, want %+v", i, recs[i], in[i])
		}
	}
	// A torn last record, or a damaged one, ends the journal there.
	two := len(appendRecord(appendRecord(nil, in[0]), in[1]))
	for name, c := range map[string]struct {
		data []byte
		recs int
	}{
		"torn":    {b[:len(b)-3], 2},
		"flipped": {append(append([]byte{}, b[:len(b)-1]...), b[len(b)-1]^1), 2},
		"garbage": {append(append([]byte{}, b...), 0xde, 0xad, 0xbe, 0xef, 4, 0, 0, 0, 0, 0, 0), 3},
	} {
		recs, rest := parseJournal(c.data)
		want := len(c.data) - two
		if c.recs == 3 {
			want = len(c.data) - len(b)
		}
		if len(recs) != c.recs || rest != want {
			t.Errorf("%s: %d records and %d bytes left of %d, want %d and %d", name, len(recs), rest, len(c.data), c.recs, want)
		}
	}
}

// TestJournalSurvivesCrash: mappings journaled by a writer that never
// closed (tpgw killed) are in cache.db once the next writer opens, in
// order (an address handed to a second name maps to that one), and the
// journal is empty; a torn record at the end is dropped with a warning.
func TestJournalSurvivesCrash(t *testing.T) {
	db := tempDB(t)
	w, err := openMappingWriter(db, slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range []mapping{newMapping("first.example", "198.18.0.1"), newMapping("second.example", "198.18.0.2"), newMapping("reused.example", "198.18.0.1"), newMapping("six.example", "fd00::6")} {
		if err := w.write(m); err != nil {
			t.Fatal(err)
		}
	}
	if ip, _ := dbMapping(t, db, "second.example"); ip.IsValid() {
		t.Fatalf("second.example already in cache.db (%v) before any fold", ip)
	}
	// The crash: the file is left as it is, with half a record at its end.
	w.journal.Close()
	tail := appendRecord(nil, newMapping("torn.example", "198.18.0.3"))
	f, err := os.OpenFile(journalPath(db), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(tail[:len(tail)-4]); err != nil {
		t.Fatal(err)
	}
	f.Close()

	var logs bytes.Buffer
	w2, err := openMappingWriter(db, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer w2.close()
	for host, want := range map[string]string{"second.example": "198.18.0.2", "reused.example": "198.18.0.1", "six.example": "fd00::6"} {
		if ip, back := dbMapping(t, db, host); ip != netip.MustParseAddr(want) || back != host {
			t.Errorf("cache.db maps %s to %v (and that to %q), want %s", host, ip, back, want)
		}
	}
	if ip, _ := dbMapping(t, db, "first.example"); ip.IsValid() {
		t.Errorf("cache.db maps first.example to %v; its address went to reused.example", ip)
	}
	if ip, _ := dbMapping(t, db, "torn.example"); ip.IsValid() {
		t.Errorf("cache.db maps torn.example to %v from a torn record", ip)
	}
	if recs := journalRecords(t, w2); len(recs) != 0 {
		t.Errorf("journal after the replay: %v", recs)
	}
	if !bytes.Contains(logs.Bytes(), []byte("damaged record")) || !bytes.Contains(logs.Bytes(), []byte("mappings=4")) {
		t.Errorf("the replay's log says nothing of the torn record or of the mappings folded:\n%s", logs.String())
	}
	// The new writer appends after the empty journal as usual.
	if err := w2.write(newMapping("after.example", "198.18.0.9")); err != nil {
		t.Fatal(err)
	}
	if recs := journalRecords(t, w2); len(recs) != 1 || recs[0].host != "after.example" {
		t.Errorf("journal after one more write: %v", recs)
	}
}

// TestJournalFolds: the journal is folded into cache.db once it holds
// foldEvery mappings, and on close; writers that wait meanwhile get theirs
// written. A mapping already in cache.db or the journal is not written
// again.
func TestJournalFolds(t *testing.T) {
	db := tempDB(t)
	w, err := openMappingWriter(db, slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	w.foldEvery, w.foldAt, w.foldQuiet = 64, 64, 0 // fold at once
	var wg sync.WaitGroup
	errs := make(chan error, 200)
	for i := range 200 {
		wg.Go(func() {
			errs <- w.write(newMapping(fmt.Sprintf("n%d.example", i), fmt.Sprintf("198.18.1.%d", i)))
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	// The writer answers the waiters before it folds, and folds in the
	// background: let both finish.
	w.mu.Lock()
	for w.running {
		w.idle.Wait()
	}
	w.mu.Unlock()
	w.lockIdle()
	w.io.Unlock()
	folds := w.folds.Load()
	if folds < 1 || folds > 200/64 {
		t.Errorf("%d folds of 200 mappings at 64 a fold", folds)
	}
	inJournal := len(journalRecords(t, w))
	if inJournal >= 64 {
		t.Errorf("the journal holds %d mappings, more than a fold's worth", inJournal)
	}
	for i := range 200 {
		host := fmt.Sprintf("n%d.example", i)
		if !stored(w, host, netip.MustParseAddr(fmt.Sprintf("198.18.1.%d", i))) {
			t.Errorf("%s neither in cache.db nor in the journal", host)
		}
	}
	commits := w.commits.Load()
	for _, i := range []int{0, 199} {
		if err := w.write(newMapping(fmt.Sprintf("n%d.example", i), fmt.Sprintf("198.18.1.%d", i))); err != nil {
			t.Fatal(err)
		}
	}
	if c := w.commits.Load() - commits; c != 0 {
		t.Errorf("mappings written already took %d more journal writes", c)
	}
	if err := w.close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(journalPath(db)); !os.IsNotExist(err) {
		t.Errorf("journal after close: %v; want it removed", err)
	}
	for _, i := range []int{0, 199} {
		host := fmt.Sprintf("n%d.example", i)
		if ip, back := dbMapping(t, db, host); ip != netip.MustParseAddr(fmt.Sprintf("198.18.1.%d", i)) || back != host {
			t.Errorf("cache.db after close maps %s to %v (%q)", host, ip, back)
		}
	}
	if err := w.write(newMapping("late.example", "198.18.2.1")); err != errWriterClosed {
		t.Errorf("a write after close: %v, want %v", err, errWriterClosed)
	}
}

// TestFoldWaitsForPause: a journal with foldEvery names is folded only
// once new names have paused for foldQuiet (a name that comes meanwhile
// puts the fold off again), and at once when it reaches foldMax however
// fast names come. A fold seen earlier than foldQuiet after the last write
// fails; a slow machine only makes the fold later.
func TestFoldWaitsForPause(t *testing.T) {
	const quiet = 400 * time.Millisecond
	w, err := openMappingWriter(tempDB(t), slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	defer w.close()
	w.foldEvery, w.foldAt, w.foldMax, w.foldQuiet = 8, 8, 32, quiet
	n := 0
	// write journals one more name; it returns the time just before, which
	// is no later than the writer's own note of it.
	write := func() time.Time {
		t.Helper()
		n++
		before := time.Now()
		if err := w.write(newMapping(fmt.Sprintf("p%d.example", n), fmt.Sprintf("198.18.4.%d", n))); err != nil {
			t.Fatal(err)
		}
		return before
	}
	// waitFold polls until the folds reach want, failing on one seen
	// before quiet has passed since last.
	waitFold := func(want int64, last time.Time, early bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for w.folds.Load() < want {
			if time.Now().After(deadline) {
				t.Fatalf("%d folds 10s after the last write, want %d", w.folds.Load(), want)
			}
			time.Sleep(5 * time.Millisecond)
		}
		if since := time.Since(last); !early && since < quiet {
			t.Errorf("fold %d came %v after the last write, before the pause of %v", want, since, quiet)
		}
	}
	for range 8 {
		write()
	}
	time.Sleep(quiet / 2)
	last := write() // puts the fold off
	waitFold(1, last, false)
	w.lockIdle()
	w.io.Unlock()
	if recs := journalRecords(t, w); len(recs) != 0 {
		t.Errorf("journal after the fold: %d records, want none", len(recs))
	}
	// Names faster than the pause: foldMax of them are folded at once.
	w.foldQuiet = time.Hour
	for range 32 {
		last = write()
	}
	waitFold(2, last, true)
	w.lockIdle()
	w.io.Unlock()
	for i := 1; i <= n; i++ {
		host := fmt.Sprintf("p%d.example", i)
		if ip, _ := dbMapping(t, w.db, host); ip != netip.MustParseAddr(fmt.Sprintf("198.18.4.%d", i)) {
			t.Errorf("cache.db maps %s to %v after the folds", host, ip)
		}
	}
}

// TestFoldInBackground: a fold waits for cache.db (another writer holds
// bbolt's write lock here), while new mappings are journaled and their
// writers answered meanwhile; once it is done, the journal holds only the
// mappings that came after its records, cache.db the rest.
func TestFoldInBackground(t *testing.T) {
	db := tempDB(t)
	w, err := openMappingWriter(db, slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	defer w.close()
	w.foldEvery, w.foldAt, w.foldQuiet = 8, 8, 0 // fold at once
	hold, held := make(chan struct{}), make(chan struct{})
	go db.Update(func(*bbolt.Tx) error { close(held); <-hold; return nil })
	<-held
	for i := range 8 {
		if err := w.write(newMapping(fmt.Sprintf("first%d.example", i), fmt.Sprintf("198.18.3.%d", i))); err != nil {
			t.Fatal(err)
		}
	}
	// The eighth started a fold, which waits for cache.db.
	done := make(chan error, 1)
	go func() { done <- w.write(newMapping("during.example", "198.18.3.100")) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		close(hold)
		t.Fatal("a new mapping waited for the fold")
	}
	w.io.Lock()
	running := w.foldRunning
	w.io.Unlock()
	if !running {
		t.Error("no fold running while cache.db is held")
	}
	if recs := journalRecords(t, w); len(recs) != 9 {
		t.Errorf("journal during the fold: %d records, want 9", len(recs))
	}
	close(hold)
	w.lockIdle()
	w.io.Unlock()
	recs := journalRecords(t, w)
	if len(recs) != 1 || recs[0].host != "during.example" {
		t.Errorf("journal after the fold: %v, want during.example alone", recs)
	}
	for i := range 8 {
		host := fmt.Sprintf("first%d.example", i)
		if ip, back := dbMapping(t, db, host); ip != netip.MustParseAddr(fmt.Sprintf("198.18.3.%d", i)) || back != host {
			t.Errorf("cache.db maps %s to %v (%q) after the fold", host, ip, back)
		}
	}
	if !stored(w, "during.example", netip.MustParseAddr("198.18.3.100")) {
		t.Error("during.example is neither in the journal nor in cache.db")
	}
	// Appends go on in the new journal file.
	if err := w.write(newMapping("after.example", "198.18.3.101")); err != nil {
		t.Fatal(err)
	}
	if recs := journalRecords(t, w); len(recs) != 2 {
		t.Errorf("journal after one more: %v", recs)
	}
	// A replacement a crash left half made is dropped at the next start.
	if err := os.WriteFile(journalPath(db)+journalNewSuffix, []byte("partial"), 0o600); err != nil {
		t.Fatal(err)
	}
	w.journal.Close()
	w2, err := openMappingWriter(db, slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	defer w2.close()
	if _, err := os.Stat(journalPath(db) + journalNewSuffix); !os.IsNotExist(err) {
		t.Errorf("the half-made replacement is still there: %v", err)
	}
	for _, host := range []string{"during.example", "after.example"} {
		if ip, _ := dbMapping(t, db, host); !ip.IsValid() {
			t.Errorf("%s not in cache.db after the restart", host)
		}
	}
}

// BenchmarkNewNames: the engine's answers to names never asked before, with
// store-fake-ip on (each answer waits for its mapping's journal write).
func BenchmarkNewNames(b *testing.B) {
	b.SetParallelism(64)
	b.RunParallel(func(pb *testing.PB) {
		q := new(D.Msg)
		for pb.Next() {
			q.SetQuestion(fmt.Sprintf("bench%d.new.example.", benchNames.Add(1)), D.TypeA)
			if _, err := testEngine.ServeDNS(context.Background(), q); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// benchNames numbers the names BenchmarkNewNames asks, across its runs.
var benchNames atomic.Int64

// TestStoredMappingsNotRewritten: a mapping cache.db had when the pools were
// built, or one journaled or folded since, is not written again; a name
// that takes over an address is; after a flush, or with the pools built
// anew on a reload, the writer knows only what cache.db then holds.
func TestStoredMappingsNotRewritten(t *testing.T) {
	db := tempDB(t)
	for _, m := range []mapping{newMapping("a.example", "198.18.0.4"), newMapping("old.example", "198.18.0.9")} {
		if err := db.Update(func(tx *bbolt.Tx) error { return putMapping(tx, m) }); err != nil {
			t.Fatal(err)
		}
	}
	w, err := openMappingWriter(db, slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	defer w.close()
	build := func() {
		t.Helper()
		p, err := fakeip.New(fakeip.Options{IPNet: netip.MustParsePrefix("198.18.0.0/24"), Persistence: true})
		if err != nil {
			t.Fatal(err)
		}
		if swapped, err := keepInMemory(db, []*fakeip.Pool{p}, w); err != nil || !swapped {
			t.Fatalf("keepInMemory: %v, %v", swapped, err)
		}
	}
	write := func(m mapping, wantCommits int64) {
		t.Helper()
		before := w.commits.Load()
		if err := w.write(m); err != nil {
			t.Fatal(err)
		}
		if c := w.commits.Load() - before; c != wantCommits {
			t.Errorf("writing %s → %v took %d journal writes, want %d", m.host, m.ip, c, wantCommits)
		}
		if !stored(w, m.host, m.ip) {
			t.Errorf("%s → %v neither in cache.db nor in the journal", m.host, m.ip)
		}
	}
	build()
	write(newMapping("a.example", "198.18.0.4"), 0) // in cache.db
	write(newMapping("b.example", "198.18.0.4"), 1) // takes a.example's address
	write(newMapping("b.example", "198.18.0.4"), 0) // journaled
	write(newMapping("a.example", "198.18.0.5"), 1)
	write(newMapping("six.example", "fdfe::4"), 1)
	write(newMapping("six.example", "fdfe::4"), 0)
	write(newMapping("b.example", "::ffff:198.18.0.4"), 1) // not the IPv4 address's
	if err := w.fold(); err != nil {
		t.Fatal(err)
	}
	write(newMapping("a.example", "198.18.0.5"), 0) // folded
	// A reload: the journal is folded, the writer forgets, the new pools
	// read cache.db (keepMappingsInMemory).
	if err := w.fold(); err != nil {
		t.Fatal(err)
	}
	w.forgetStored()
	build()
	write(newMapping("b.example", "198.18.0.4"), 0)
	write(newMapping("old.example", "198.18.0.9"), 0)
	if err := w.flush(); err != nil {
		t.Fatal(err)
	}
	write(newMapping("b.example", "198.18.0.4"), 1) // cache.db was emptied
}

// TestPutMappingsAsInOrder: putMappings (a fold: each key written once, in
// key order) leaves cache.db's fake-ip buckets exactly as putMapping record
// after record does, for batches full of the cases that depend on order:
// addresses taken over by other names, names that move to another address
// and back, IPv4 and IPv6 records, over buckets that already hold mappings.
func TestPutMappingsAsInOrder(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 9))
	randomMapping := func() mapping {
		host := fmt.Sprintf("h%d.example", rng.IntN(40))
		if rng.IntN(4) == 0 {
			return newMapping(host, fmt.Sprintf("fdfe::%x", rng.IntN(24)))
		}
		return newMapping(host, fmt.Sprintf("198.18.0.%d", rng.IntN(24)))
	}
	dump := func(db *bbolt.DB) string {
		var b strings.Builder
		db.View(func(tx *bbolt.Tx) error {
			return tx.ForEach(func(name []byte, bk *bbolt.Bucket) error {
				return bk.ForEach(func(k, v []byte) error {
					fmt.Fprintf(&b, "%s %x=%x\n", name, k, v)
					return nil
				})
			})
		})
		return b.String()
	}
	for round := range 200 {
		inOrder, folded := tempDB(t), tempDB(t)
		var before, batch []mapping
		for range rng.IntN(30) {
			before = append(before, randomMapping())
		}
		for range 1 + rng.IntN(60) {
			batch = append(batch, randomMapping())
		}
		// putOneByOne puts ms into db with putMapping, record after record.
		putOneByOne := func(db *bbolt.DB, ms []mapping) {
			t.Helper()
			if err := db.Update(func(tx *bbolt.Tx) error {
				for _, m := range ms {
					if err := putMapping(tx, m); err != nil {
						return err
					}
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
		}
		putOneByOne(inOrder, before)
		putOneByOne(folded, before)
		putOneByOne(inOrder, batch)
		if err := folded.Update(func(tx *bbolt.Tx) error { return putMappings(tx, batch) }); err != nil {
			t.Fatal(err)
		}
		if want, got := dump(inOrder), dump(folded); got != want {
			t.Fatalf("round %d: cache.db after putMappings:\n%s\nrecord after record:\n%s\nbefore: %v\nbatch: %v", round, got, want, before, batch)
		}
	}
}

// BenchmarkFold: folding journaled names into a young cache.db, as a burst
// of new names leaves them (random names, consecutive addresses), in
// transactions of foldEvery (foldMappings).
func BenchmarkFold(b *testing.B) {
	for _, n := range []int{8192, 65536} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			recs := make([]mapping, n)
			for i := range recs {
				a := netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)})
				recs[i] = mapping{host: fmt.Sprintf("n%x.bench.example", rand.Uint64()), ip: a}
			}
			for b.Loop() {
				b.StopTimer()
				db, err := bbolt.Open(filepath.Join(b.TempDir(), "cache.db"), 0o600, &bbolt.Options{NoSync: true})
				if err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				if err := foldMappings(db, recs); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				db.Close()
				b.StartTimer()
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n)/1e3, "µs/name")
		})
	}
}
