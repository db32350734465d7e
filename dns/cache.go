package dns

import (
	"sync"
	"sync/atomic"
	"time"

	D "github.com/miekg/dns"
)

// replyCache remembers, for at most maxCacheAge, the packed reply to a query
// message. A hit needs the same bytes after the ID (question with its exact
// letter case, flags, EDNS0 options and buffer size) over the same
// transport, so the reply is the one the engine would build again: a fake
// IP's mapping lives far longer than a second, and a real answer is at most
// maxCacheAge older than its TTL says. Cookies and other per-query options
// make every query distinct and so never hit, which is what they ask for.
// The engine still sees every new name; the cache only takes repeated
// queries (clients asking again as the 1 s TTL of a fake-ip answer runs
// out, several clients asking the same name) off the slow path.
type replyCache struct {
	mu      sync.RWMutex
	entries map[cacheKey]cacheEntry
	now     func() time.Time
	// gen counts flushes: a reply made before a flush (under the rules
	// the flush was for) is not stored after it.
	gen atomic.Uint64
}

type cacheKey struct {
	udp bool
	msg string // the query without its ID
}

type cacheEntry struct {
	reply   []byte // packed, ID zero
	expires time.Time
}

const (
	// maxCacheAge caps how long a reply is reused; it is also the TTL of
	// mihomo's fake-ip answers.
	maxCacheAge = time.Second
	// maxCacheEntries bounds the memory: 4096 replies of at most a few
	// hundred bytes each. When full, expired entries go; if none had
	// expired, everything goes.
	maxCacheEntries = 4096
	// maxCachedReply keeps unusually large replies out, and
	// maxCachedQuery unusually large queries, which are the keys: over
	// TCP a query may be 64 KiB (padding, junk additional records) and
	// still get a small cacheable answer.
	maxCachedReply = 1232
	maxCachedQuery = 512
)

func newReplyCache() *replyCache {
	return &replyCache{entries: map[cacheKey]cacheEntry{}, now: time.Now}
}

// get returns a fresh copy of the cached reply to req with req's ID, or nil.
func (c *replyCache) get(req []byte, udp bool) []byte { return c.appendReply(nil, req, udp) }

// appendReply appends the cached reply to req, with req's ID, to dst and
// returns the result, or nil on a miss. With a reused dst a hit allocates
// nothing (the map lookup converts the key without allocating).
func (c *replyCache) appendReply(dst, req []byte, udp bool) []byte {
	if len(req) < headerLen {
		return nil
	}
	c.mu.RLock()
	e, ok := c.entries[cacheKey{udp, string(req[2:])}]
	c.mu.RUnlock()
	if !ok || !c.now().Before(e.expires) {
		return nil
	}
	n := len(dst)
	dst = append(dst, e.reply...)
	dst[n], dst[n+1] = req[0], req[1]
	return dst
}

// generation is taken before a query goes to the engine, and given to put
// or prepare with its reply.
func (c *replyCache) generation() uint64 { return c.gen.Load() }

// put remembers reply (the answer to req, made at generation gen) for ttl,
// capped at maxCacheAge.
func (c *replyCache) put(req, reply []byte, udp bool, ttl time.Duration, gen uint64) {
	c.store(c.prepare(req, reply, udp, ttl, gen))
}

// cacheItem is a reply made ready for the cache (prepare), to be stored
// later (store); ok false: nothing to store.
type cacheItem struct {
	key   cacheKey
	entry cacheEntry
	gen   uint64
	ok    bool
}

// prepare copies what put stores, so that req and reply may be reused
// before the item is stored.
func (c *replyCache) prepare(req, reply []byte, udp bool, ttl time.Duration, gen uint64) cacheItem {
	ttl = min(ttl, maxCacheAge)
	if ttl <= 0 || len(req) < headerLen || len(req) > maxCachedQuery || len(reply) < headerLen || len(reply) > maxCachedReply {
		return cacheItem{}
	}
	stored := make([]byte, len(reply))
	copy(stored, reply)
	stored[0], stored[1] = 0, 0
	return cacheItem{key: cacheKey{udp, string(req[2:])}, entry: cacheEntry{reply: stored, expires: c.now().Add(ttl)}, gen: gen, ok: true}
}

// store stores an item of prepare.
func (c *replyCache) store(it cacheItem) {
	if !it.ok {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if it.gen != c.gen.Load() {
		return // made before a flush
	}
	if len(c.entries) >= maxCacheEntries {
		now := c.now() // only a full cache needs the time again
		for k, e := range c.entries {
			if !now.Before(e.expires) {
				delete(c.entries, k)
			}
		}
		if len(c.entries) >= maxCacheEntries {
			clear(c.entries)
		}
	}
	c.entries[it.key] = it.entry
}

// cacheTTL is how long reply r may be reused: the smallest TTL of its
// answer and authority records, or 0 (do not cache) for a reply without
// answers, a failure, or a truncated reply.
func cacheTTL(r *D.Msg) time.Duration {
	if r.Rcode != D.RcodeSuccess || r.Truncated || len(r.Answer) == 0 {
		return 0
	}
	ttl := uint32(1<<32 - 1)
	for _, rrs := range [][]D.RR{r.Answer, r.Ns} {
		for _, rr := range rrs {
			ttl = min(ttl, rr.Header().Ttl)
		}
	}
	return time.Duration(ttl) * time.Second
}

// flush forgets every reply.
func (c *replyCache) flush() {
	c.mu.Lock()
	clear(c.entries)
	c.gen.Add(1)
	c.mu.Unlock()
}
