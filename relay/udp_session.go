package relay

import (
	"net"
	"net/netip"
	"sync"
	"time"
)

// replySocket is what a session needs from its socket: *tsock.ReplySocket
// (a fake in tests).
type replySocket interface {
	WriteToUDPAddrPort(b []byte, addr netip.AddrPort) (int, error)
	Close() error
}

// sessionKey names one reply path: replies to client that must appear to
// come from from.
type sessionKey struct {
	client, from netip.AddrPort
}

// session is one reply socket, on the table's LRU list.
type session struct {
	key        sessionKey
	sock       replySocket
	lastUsed   time.Time
	prev, next *session
}

// sessionTable keeps reply sockets by (client, from), so that a flow's
// replies reuse one socket. It is bounded: when full, a new session evicts
// the least recently used one. Sessions idle for longer than idle are closed
// by expire, which the listener's janitor calls on a ticker.
//
// All list and map work happens under mu; socket syscalls (open, close) never
// do, so a slow open does not stall other flows' replies.
type sessionTable struct {
	open func(from netip.AddrPort) (replySocket, error)
	now  func() time.Time
	max  int
	idle time.Duration

	mu     sync.Mutex
	byKey  map[sessionKey]*session
	lru    session // sentinel: lru.next is the most, lru.prev the least recently used
	closed bool

	opened, evicted, expired uint64 // under mu
}

func newSessionTable(max int, idle time.Duration, open func(netip.AddrPort) (replySocket, error), now func() time.Time) *sessionTable {
	t := &sessionTable{open: open, now: now, max: max, idle: idle, byKey: make(map[sessionKey]*session)}
	t.lru.next, t.lru.prev = &t.lru, &t.lru
	return t
}

func (t *sessionTable) unlink(s *session) {
	s.prev.next, s.next.prev = s.next, s.prev
	s.prev, s.next = nil, nil
}

func (t *sessionTable) pushFront(s *session) {
	s.prev, s.next = &t.lru, t.lru.next
	t.lru.next.prev = s
	t.lru.next = s
}

// touch marks s used now; mu held.
func (t *sessionTable) touch(s *session, now time.Time) {
	s.lastUsed = now
	if t.lru.next != s {
		t.unlink(s)
		t.pushFront(s)
	}
}

// get returns the reply socket for k, opening one (and evicting the least
// recently used session if the table is full) when there is none.
func (t *sessionTable) get(k sessionKey) (replySocket, error) {
	now := t.now()
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return nil, net.ErrClosed
	}
	if s := t.byKey[k]; s != nil {
		t.touch(s, now)
		sock := s.sock
		t.mu.Unlock()
		return sock, nil
	}
	t.mu.Unlock()

	sock, err := t.open(k.from)
	if err != nil {
		return nil, err
	}

	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		sock.Close()
		return nil, net.ErrClosed
	}
	if s := t.byKey[k]; s != nil {
		// Another reply of the same flow opened one meanwhile: use it.
		t.touch(s, now)
		existing := s.sock
		t.mu.Unlock()
		sock.Close()
		return existing, nil
	}
	var victim replySocket
	if len(t.byKey) >= t.max {
		oldest := t.lru.prev
		t.unlink(oldest)
		delete(t.byKey, oldest.key)
		victim = oldest.sock
		t.evicted++
	}
	s := &session{key: k, sock: sock, lastUsed: now}
	t.byKey[k] = s
	t.pushFront(s)
	t.opened++
	t.mu.Unlock()
	if victim != nil {
		victim.Close()
	}
	return sock, nil
}

// expire closes every session idle for idle or longer and returns how many.
// The LRU list is in last-use order, so the idle ones are all at its tail.
func (t *sessionTable) expire() int {
	now := t.now()
	var idle []replySocket
	t.mu.Lock()
	for s := t.lru.prev; s != &t.lru && now.Sub(s.lastUsed) >= t.idle; s = t.lru.prev {
		t.unlink(s)
		delete(t.byKey, s.key)
		idle = append(idle, s.sock)
	}
	t.expired += uint64(len(idle))
	t.mu.Unlock()
	for _, sock := range idle {
		sock.Close()
	}
	return len(idle)
}

// len is the number of open sessions.
func (t *sessionTable) len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.byKey)
}

type sessionCounts struct {
	open                     int
	opened, evicted, expired uint64
}

func (t *sessionTable) counts() sessionCounts {
	t.mu.Lock()
	defer t.mu.Unlock()
	return sessionCounts{open: len(t.byKey), opened: t.opened, evicted: t.evicted, expired: t.expired}
}

// close closes every session; later gets fail with net.ErrClosed.
func (t *sessionTable) close() {
	t.mu.Lock()
	t.closed = true
	socks := make([]replySocket, 0, len(t.byKey))
	for s := t.lru.next; s != &t.lru; s = s.next {
		socks = append(socks, s.sock)
	}
	clear(t.byKey)
	t.lru.next, t.lru.prev = &t.lru, &t.lru
	t.mu.Unlock()
	for _, sock := range socks {
		sock.Close()
	}
}
