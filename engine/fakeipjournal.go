package engine

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"hash/maphash"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/metacubex/bbolt"
)

// New fake-ip mappings reach cache.db through a journal.
//
// Putting a new name into cache.db costs a bbolt write transaction that
// rewrites a leaf page of the name → address index for every name (names
// are random keys), even when the names that came in together share one
// transaction: over a pass of new names these transactions took more than a
// quarter of the process's CPU, and their garbage a good part of the
// collector's. A journal record costs an append.
//
// So the answer that carries a new fake IP leaves once its mapping is
// appended to the journal beside cache.db (cache.db.tpgw-journal), one
// write(2) for all the names that came in meanwhile (group commit), and the
// journal is folded into cache.db, in transactions of foldEvery names
// (foldMappings), once it holds foldEvery names and new names have paused
// for foldQuiet, or at once at foldMax (in the background: new names go on
// being journaled and answered while the fold waits for cache.db, and its
// records then leave the journal by a rename of a file holding the rest),
// on a reload, and on a clean stop, which removes the journal. After a crash the next start folds what
// the journal holds before the pools are built. Neither file is fsynced
// (cache.db is opened NoSync, see Start): what is written survives a crash
// of tpgw, not a power cut, as before. Until a fold, cache.db lags behind
// by fewer than foldEvery names once new names pause, and by at most
// foldMax during a long burst; only a program that reads cache.db while
// tpgw runs, or plain mihomo started after tpgw crashed, would miss them.
//
// A record is crc32 (4 bytes, of the rest), the address's length (1 byte, 4
// or 16), the name's length (2 bytes), the address, the name; integers
// little-endian. A torn or damaged record ends the replay (the records
// after it cannot be told apart from garbage).

// foldEvery is how many journaled mappings wait for a fold into cache.db
// at least; the fold then waits for a pause of foldQuiet in the new names,
// up to foldMax of them. A fold costs the process CPU (about 3 to 4.5 µs a
// name, in key order: putMappings) that a burst of new names would
// otherwise share with its answers: over a pass of 50000 new names in the
// bench, folds every 8192 names took 0.15 of the gateway's 0.69 CPU
// seconds. foldMax bounds the journal and the memory of its index (about
// 80 bytes a name): it is the size of mihomo's default fake-ip range (a
// /16), and a journal that holds a pool's worth of names is folded in about
// a quarter of a second (BenchmarkFold).
const (
	foldEvery = 8192
	foldQuiet = 100 * time.Millisecond
	foldMax   = 65536
)

// journalSuffix names the journal after cache.db; journalNewSuffix the
// file that replaces it once its first records are folded.
const (
	journalSuffix    = ".tpgw-journal"
	journalNewSuffix = ".new"
)

// journalRecordHeader is the fixed part of a record.
const journalRecordHeader = 4 + 1 + 2

var errWriterClosed = errors.New("the fake-ip mapping writer is closed")

// mappingWriter writes the new mappings of pools kept in memory to
// cache.db's journal. Callers wait until theirs is written; the mappings
// that come in while a write runs go together into the next.
type mappingWriter struct {
	db  *bbolt.DB
	log *slog.Logger

	mu      sync.Mutex // the fields down to stored
	idle    sync.Cond  // on mu: running became false
	next    *commit    // the mappings waiting for the next write
	running bool       // a goroutine is writing
	closed  bool
	stored  map[[16]byte]uint64 // see storedLocked
	seed    maphash.Seed

	io          sync.Mutex // the journal file and the fields down to foldAt
	journal     *os.File
	path        string    // the journal's (journal.Name() may be the file it replaced)
	size        int64     // the journal's length
	unfolded    []mapping // the journal's records, in order
	buf         []byte
	foldEvery   int           // foldEvery, but for tests
	foldMax     int           // foldMax, but for tests
	foldQuiet   time.Duration // foldQuiet, but for tests
	foldAt      int           // fold once unfolded has this many and new names pause
	foldRunning bool          // a fold runs in the background (backgroundFold)
	foldDone    chan struct{} // closed when it ends
	lastAppend  time.Time     // when the journal last grew
	foldTimer   *time.Timer   // runs quietFold; made when first needed
	foldArmed   bool          // foldTimer is set

	commits atomic.Int64 // journal writes
	folds   atomic.Int64
}

type mapping struct {
	host string
	ip   netip.Addr
}

type commit struct {
	mappings []mapping
	done     chan struct{}
	err      error
}

// journalPath is where the journal of db lives.
func journalPath(db *bbolt.DB) string { return db.Path() + journalSuffix }

// openMappingWriter opens db's journal, folds what it holds into db (a
// crash left it there) and empties it.
func openMappingWriter(db *bbolt.DB, log *slog.Logger) (*mappingWriter, error) {
	path := journalPath(db)
	// A replacement a crash left unfinished: the journal still has all its
	// records.
	if err := os.Remove(path + journalNewSuffix); err != nil && !os.IsNotExist(err) {
		return nil, fmt.Errorf("fake-ip journal: %w", err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("fake-ip journal: %w", err)
	}
	w := &mappingWriter{db: db, log: log, journal: f, path: path, stored: map[[16]byte]uint64{}, seed: maphash.MakeSeed(), foldEvery: foldEvery, foldMax: foldMax, foldQuiet: foldQuiet, foldAt: foldEvery}
	w.idle.L = &w.mu
	data, err := io.ReadAll(f)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("fake-ip journal %s: %w", path, err)
	}
	recs, rest := parseJournal(data)
	if rest > 0 {
		log.Warn("fake-ip journal: a damaged record ends it; the mappings after it are lost", "path", path, "bytes_dropped", rest, "records_kept", len(recs))
	}
	w.unfolded = recs
	w.size = int64(len(data))
	w.io.Lock()
	err = w.foldLocked()
	if err == nil && w.size > 0 {
		// Nothing to fold, only damage: drop it.
		err = w.truncateLocked()
	}
	w.io.Unlock()
	if err != nil {
		f.Close()
		return nil, err
	}
	if len(recs) > 0 {
		log.Info("fake-ip journal folded into cache.db", "mappings", len(recs))
	}
	return w, nil
}

// appendRecord encodes m as a journal record onto b.
func appendRecord(b []byte, m mapping) []byte {
	start := len(b)
	ip := m.ip.AsSlice()
	b = append(b, 0, 0, 0, 0, byte(len(ip)))
	b = binary.LittleEndian.AppendUint16(b, uint16(len(m.host)))
	b = append(b, ip...)
	b = append(b, m.host...)
	binary.LittleEndian.PutUint32(b[start:], crc32.ChecksumIEEE(b[start+4:]))
	return b
}

// parseJournal decodes the records of data up to the first damaged one,
// and says how many bytes from there on it could not read.
func parseJournal(data []byte) (recs []mapping, rest int) {
	for len(data) > 0 {
		if len(data) < journalRecordHeader {
			break
		}
		ipLen := int(data[4])
		hostLen := int(binary.LittleEndian.Uint16(data[5:]))
		n := journalRecordHeader + ipLen + hostLen
		if (ipLen != 4 && ipLen != 16) || len(data) < n ||
			crc32.ChecksumIEEE(data[4:n]) != binary.LittleEndian.Uint32(data) {
			break
		}
		ip, _ := netip.AddrFromSlice(data[journalRecordHeader : journalRecordHeader+ipLen])
		recs = append(recs, mapping{host: string(data[journalRecordHeader+ipLen : n]), ip: ip})
		data = data[n:]
	}
	return recs, len(data)
}

// storedLocked reports whether cache.db or the journal maps m's address to
// its name, as far as this writer knows: stored holds, for each address, a
// 64-bit hash of the name of the last mapping the writer journaled for it
// or found in cache.db when its pools were built (noteStored), which are
// all the fake-ip mappings cache.db and the journal get while the pools
// keep theirs in memory. A name asked again (answered from the pool's
// memory) is not written again, and a new one is written without a look
// into cache.db, which cost 6% of the process's CPU while new names came
// in. Keys are 16-byte addresses (IPv4 ones IPv4-mapped) and values
// hashes, so that the collector has no pointers to follow: about 50 bytes
// per address in use.
func (w *mappingWriter) storedLocked(m mapping) bool {
	k, h := w.storedEntry(m)
	v, ok := w.stored[k]
	return ok && v == h
}

// has reports whether cache.db or the journal has m (storedLocked).
func (w *mappingWriter) has(m mapping) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.storedLocked(m)
}

// storedEntry is m's key and value in stored. The hash of an IPv6
// mapping's name is inverted: an IPv6 address that is an IPv4 address in
// its mapped form (a pool would have to be made so) never counts as
// written for the IPv4 one.
func (w *mappingWriter) storedEntry(m mapping) ([16]byte, uint64) {
	h := maphash.String(w.seed, m.host)
	if m.ip.Is6() {
		h = ^h
	}
	return m.ip.As16(), h
}

// noteStored records ms, now in the journal or cache.db, for write's check.
func (w *mappingWriter) noteStored(ms []mapping) {
	w.mu.Lock()
	for _, m := range ms {
		k, h := w.storedEntry(m)
		w.stored[k] = h
	}
	w.mu.Unlock()
}

// forgetStored empties stored: cache.db's fake-ip buckets are gone (flush),
// or are about to be read anew (keepMappingsInMemory).
func (w *mappingWriter) forgetStored() {
	w.mu.Lock()
	clear(w.stored)
	w.mu.Unlock()
}

// writeAll journals ms (those cache.db and the journal do not have yet) in
// one write, shared with the mappings other callers write meanwhile, and
// returns once they are written.
func (w *mappingWriter) writeAll(ms []mapping) error {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return errWriterClosed
	}
	var c *commit
	for _, m := range ms {
		if w.storedLocked(m) {
			continue
		}
		if w.next == nil {
			w.next = &commit{done: make(chan struct{})}
		}
		c = w.next
		c.mappings = append(c.mappings, m)
	}
	if c == nil {
		w.mu.Unlock()
		return nil
	}
	if w.running {
		w.mu.Unlock()
		<-c.done
		return c.err
	}
	// No write runs: this caller writes c itself rather than wake a
	// goroutine to and wait for it (the DNS server's reader settles a burst
	// here), and leaves what others queue meanwhile to commitLoop.
	w.running = true
	w.next = nil
	w.mu.Unlock()
	w.commit(c)
	w.mu.Lock()
	w.continueLocked()
	w.mu.Unlock()
	return c.err
}

// continueLocked, once a write is done, starts commitLoop for the
// mappings queued meanwhile, or marks the writer idle.
func (w *mappingWriter) continueLocked() {
	if w.next != nil {
		go w.commitLoop()
		return
	}
	w.running = false
	w.idle.Broadcast()
}

// commitLoop journals the waiting mappings, a write at a time, until none
// are left, and folds the journal when it has foldEvery records.
func (w *mappingWriter) commitLoop() {
	for {
		w.mu.Lock()
		c := w.next
		w.next = nil
		if c == nil {
			w.running = false
			w.idle.Broadcast()
			w.mu.Unlock()
			return
		}
		w.mu.Unlock()
		w.commit(c)
	}
}

// commit journals c's mappings in one write, and starts a fold when the
// journal has foldEvery records.
func (w *mappingWriter) commit(c *commit) {
	w.io.Lock()
	c.err = w.appendLocked(c.mappings)
	close(c.done)
	w.lastAppend = time.Now()
	w.maybeFoldLocked()
	w.io.Unlock()
}

// maybeFoldLocked starts a fold once the journal has foldAt records and
// new names have paused for foldQuiet (quietFold), or at once when it has
// foldMax more than a fold needs.
func (w *mappingWriter) maybeFoldLocked() {
	if w.foldRunning || w.journal == nil || len(w.unfolded) < w.foldAt {
		return
	}
	if w.foldQuiet <= 0 || len(w.unfolded) >= w.foldAt-w.foldEvery+w.foldMax {
		w.startFoldLocked()
		return
	}
	if w.foldArmed {
		return // quietFold looks at lastAppend when it runs
	}
	w.foldArmed = true
	if w.foldTimer == nil {
		w.foldTimer = time.AfterFunc(w.foldQuiet, w.quietFold)
	} else {
		w.foldTimer.Reset(w.foldQuiet)
	}
}

// quietFold starts the fold maybeFoldLocked put off once no name has been
// journaled for foldQuiet; until then it waits on.
func (w *mappingWriter) quietFold() {
	w.io.Lock()
	defer w.io.Unlock()
	w.foldArmed = false
	if w.foldRunning || w.journal == nil || len(w.unfolded) < w.foldAt {
		return
	}
	if wait := w.foldQuiet - time.Since(w.lastAppend); wait > 0 {
		w.foldArmed = true
		w.foldTimer.Reset(wait)
		return
	}
	w.startFoldLocked()
}

// backgroundFold puts recs, the journal's first records, into cache.db while
// new ones are still appended after them (a fold of 8192 names takes tens of
// milliseconds, which the answers of new names would otherwise wait for),
// and then drops them from the journal.
func (w *mappingWriter) backgroundFold(recs []mapping, done chan struct{}) {
	start := time.Now()
	err := w.update(recs)
	w.io.Lock()
	defer w.io.Unlock()
	w.foldRunning = false
	close(done)
	if err != nil {
		// Try again once as many more came in, not after every write.
		w.foldAt = len(w.unfolded) + w.foldEvery
		w.log.Warn("fake-ip journal not folded into cache.db; it keeps the mappings", "mappings", len(w.unfolded), "err", err)
		return
	}
	w.folds.Add(1)
	w.foldAt = w.foldEvery
	if err := w.dropFoldedLocked(len(recs)); err != nil {
		// As above: they go with the next fold, not after every write.
		w.foldAt = len(w.unfolded) + w.foldEvery
		w.log.Warn("fake-ip journal: folded records kept; they are folded again later", "err", err)
		return
	}
	w.log.Debug("fake-ip journal folded into cache.db", "mappings", len(recs), "took", time.Since(start), "left", len(w.unfolded))
	w.maybeFoldLocked() // as many came in during this fold
}

// startFoldLocked starts a fold of the journal's records so far in the
// background.
func (w *mappingWriter) startFoldLocked() {
	w.foldRunning = true
	w.foldDone = make(chan struct{})
	go w.backgroundFold(slices.Clone(w.unfolded), w.foldDone)
}

// dropFoldedLocked drops the first n records (folded) from the journal: the
// records after them go to a new file, which then replaces the journal. A
// crash before that finds all of them in the old one, and folds the first
// n again, which changes nothing.
func (w *mappingWriter) dropFoldedLocked(n int) error {
	if w.journal == nil {
		return errWriterClosed
	}
	rest := w.unfolded[n:]
	if len(rest) == 0 {
		return w.truncateLocked()
	}
	f, err := os.OpenFile(w.path+journalNewSuffix, os.O_RDWR|os.O_CREATE|os.O_TRUNC|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("fake-ip journal: %w", err)
	}
	if _, err = f.Write(w.encodeLocked(rest)); err == nil {
		err = os.Rename(f.Name(), w.path)
	}
	if err != nil {
		f.Close()
		os.Remove(f.Name())
		return fmt.Errorf("fake-ip journal: %w", err)
	}
	w.journal.Close()
	w.journal, w.size = f, int64(len(w.buf))
	w.unfolded = slices.Clone(rest)
	return nil
}

// encodeLocked encodes ms as journal records into w.buf.
func (w *mappingWriter) encodeLocked(ms []mapping) []byte {
	w.buf = w.buf[:0]
	for _, m := range ms {
		w.buf = appendRecord(w.buf, m)
	}
	return w.buf
}

// lockIdle takes io once no fold runs in the background.
func (w *mappingWriter) lockIdle() {
	for {
		w.io.Lock()
		if !w.foldRunning {
			return
		}
		done := w.foldDone
		w.io.Unlock()
		<-done
	}
}

// appendLocked writes ms to the journal in one write.
func (w *mappingWriter) appendLocked(ms []mapping) error {
	if w.journal == nil {
		return errWriterClosed
	}
	if len(ms) == 0 {
		return nil
	}
	n, err := w.journal.Write(w.encodeLocked(ms))
	if err != nil {
		// A torn record would end the replay: cut it off.
		if n > 0 {
			err = errors.Join(err, w.journal.Truncate(w.size))
		}
		return fmt.Errorf("fake-ip journal: %w", err)
	}
	w.size += int64(n)
	w.commits.Add(1)
	w.unfolded = append(w.unfolded, ms...)
	w.noteStored(ms)
	return nil
}

// foldLocked puts the journal's mappings into cache.db in one transaction
// and empties the journal. If the transaction fails the journal keeps
// them; a later fold or the next start puts them in cache.db.
func (w *mappingWriter) foldLocked() error {
	if len(w.unfolded) == 0 {
		return nil
	}
	start := time.Now()
	if err := w.update(w.unfolded); err != nil {
		return err
	}
	w.folds.Add(1)
	w.foldAt = w.foldEvery
	w.log.Debug("fake-ip journal folded into cache.db", "mappings", len(w.unfolded), "took", time.Since(start))
	return w.truncateLocked()
}

// update puts recs into cache.db, in order.
func (w *mappingWriter) update(recs []mapping) error {
	if err := foldMappings(w.db, recs); err != nil {
		return fmt.Errorf("cache.db %s: folding the fake-ip journal: %w", w.db.Path(), err)
	}
	return nil
}

// foldMappings puts recs into db, in order, in transactions of at most
// foldEvery of them: bbolt copies every page a transaction touches and
// every key and value on them when it commits, and a transaction of 65536
// new names allocated 190 MB (BenchmarkFold), 20 MB in those of 8192. A
// crash between two of them leaves the journal whole, and folding its
// first records again changes nothing.
func foldMappings(db *bbolt.DB, recs []mapping) error {
	for len(recs) > 0 {
		n := min(len(recs), foldEvery)
		if err := db.Update(func(tx *bbolt.Tx) error { return putMappings(tx, recs[:n]) }); err != nil {
			return err
		}
		recs = recs[n:]
	}
	return nil
}

// truncateLocked empties the journal (its mappings are in cache.db, or
// are being flushed).
func (w *mappingWriter) truncateLocked() error {
	clear(w.unfolded)
	w.unfolded = w.unfolded[:0]
	if err := w.journal.Truncate(0); err != nil {
		// The records stay and are folded again later, which changes
		// nothing: folding a mapping twice is folding it once.
		return fmt.Errorf("fake-ip journal: %w", err)
	}
	w.size = 0
	return nil
}

// fold folds the journal into cache.db now.
func (w *mappingWriter) fold() error {
	w.lockIdle()
	defer w.io.Unlock()
	if w.journal == nil {
		return errWriterClosed
	}
	return w.foldLocked()
}

// flush forgets the journal's mappings and empties cache.db's fake-ip
// buckets (POST /cache/fakeip/flush, before the pools are emptied).
func (w *mappingWriter) flush() error {
	w.lockIdle()
	defer w.io.Unlock()
	if w.journal != nil {
		if err := w.truncateLocked(); err != nil {
			return err
		}
	}
	err := w.db.Update(func(tx *bbolt.Tx) error {
		for _, name := range fakeIPBuckets {
			if tx.Bucket(name) == nil {
				continue
			}
			if err := tx.DeleteBucket(name); err != nil {
				return err
			}
		}
		return nil
	})
	w.forgetStored()
	if err != nil {
		return fmt.Errorf("cache.db %s: %w", w.db.Path(), err)
	}
	return nil
}

// close lets the writes queued so far finish, folds the journal into
// cache.db and removes it (a clean stop leaves cache.db alone, as mihomo
// does); later writes fail.
func (w *mappingWriter) close() error {
	w.mu.Lock()
	w.closed = true
	for w.running {
		w.idle.Wait()
	}
	w.mu.Unlock()
	w.lockIdle()
	defer w.io.Unlock()
	if w.journal == nil {
		return nil
	}
	err := w.foldLocked()
	if err == nil && w.size == 0 {
		err = os.Remove(w.path)
	}
	err = errors.Join(err, w.journal.Close())
	w.journal = nil
	if w.foldTimer != nil {
		w.foldTimer.Stop()
	}
	return err
}

// flushStoredMappings empties cache.db's fake-ip buckets and the journal
// (POST /cache/fakeip/flush, before flushPools empties the pools): mihomo's
// own flush reaches only the memory stores tpgw gave its persisted pools.
func flushStoredMappings() error {
	if w := liveMappings.Load(); w != nil {
		return w.flush()
	}
	return nil
}
