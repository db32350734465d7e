package dns

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	D "github.com/miekg/dns"
	"golang.org/x/sys/unix"

	"github.com/tpgw/tpgw/internal/tsock"
)

// serveUDP reads queries until the socket is closed. One goroutine reads,
// a burst at a time (recvmmsg): repeated queries are answered from the
// reply cache right there, and so are those the engine answers at once
// (InstantEngine), the answers of one burst sent together (sendmmsg); the
// others are answered each on a worker goroutine, at most maxInFlight at
// once.
func (s *Server) serveUDP() error {
	br, err := tsock.NewBatchReader(s.udp, udpBatch, maxUDPQuery, 128)
	if err == nil {
		rd := &udpReader{}
		if rd.rb, err = s.newReplyBatch(); err == nil {
			if s.workerReplies.rb, err = s.newReplyBatch(); err == nil {
				rd.rb.bufs = new([udpBatch][maxCachedReply]byte)
				if ie, ok := s.eng.(InstantEngine); ok {
					if err = s.startSettler(rd, ie); err != nil {
						return fmt.Errorf("dns: udp: %w", err)
					}
				}
				return s.readUDP(br, rd)
			}
		}
	}
	// A Close before the reader was made (it reaches the socket) is no error.
	if s.isClosed() || errors.Is(err, net.ErrClosed) {
		return nil
	}
	return fmt.Errorf("dns: udp: %w", err)
}

// udpReader is the reading goroutine's state.
type udpReader struct {
	rb *replyBatch // the burst's answers from the cache
	// The engine's instant answers (InstantEngine), nil without: fresh
	// holds this burst's, for the settler.
	serveNow func(*D.Msg) (*D.Msg, bool, bool)
	settler  *udpSettler
	fresh    []freshReply
}

// freshReply is an instant answer and its entry for the reply cache.
type freshReply struct {
	p    pendingReply
	item cacheItem
}

// udpSettler sends the reader's instant answers that need settling once
// the engine has settled them (written their new fake-ip mappings), on a
// goroutine of its own: the reader goes on reading, and answering from the
// cache and the names the engine knows, while a write waits for the disk.
// The answers that come in while it settles go together in the next round,
// one settle and one sendmmsg per udpBatch. At most maxSettling wait: past
// that, the reader hands queries to the workers (bounded by maxInFlight)
// until the settler catches up.
type udpSettler struct {
	settle  func()
	rb      *replyBatch   // the settler's own
	kick    chan struct{} // 1-buffered: queue is not empty
	waiting atomic.Int64  // len(queue)
	mu      sync.Mutex
	queue   []freshReply // answers waiting, in order
	spare   []freshReply // the settler's last round, emptied, for reuse
}

// maxSettling bounds the answers waiting for the settler.
const maxSettling = 1024

// full reports whether the settler has maxSettling answers waiting.
func (st *udpSettler) full() bool { return st.waiting.Load() >= maxSettling }

// startSettler sets rd up for ie's instant answers and starts their settler.
func (s *Server) startSettler(rd *udpReader, ie InstantEngine) error {
	rb, err := s.newReplyBatch()
	if err != nil {
		return err
	}
	st := &udpSettler{rb: rb, kick: make(chan struct{}, 1)}
	rd.serveNow, st.settle = ie.NewInstant()
	rd.settler = st
	s.wg.Add(1)
	go s.settleLoop(st)
	return nil
}

// push hands a burst's instant answers to the settler.
func (st *udpSettler) push(fresh []freshReply) {
	st.mu.Lock()
	st.queue = append(st.queue, fresh...)
	st.waiting.Store(int64(len(st.queue)))
	st.mu.Unlock()
	select {
	case st.kick <- struct{}{}:
	default: // kicked already
	}
}

// settleLoop settles and sends what the reader pushes until the server
// closes. An answer enters the reply cache only once settled, so that no
// worker reuses it before.
func (s *Server) settleLoop(st *udpSettler) {
	defer s.wg.Done()
	for {
		select {
		case <-st.kick:
		case <-s.ctx.Done():
			return
		}
		for {
			st.mu.Lock()
			batch := st.queue
			if len(batch) == 0 {
				st.mu.Unlock()
				break
			}
			// The reader appends to the array of the settler's last
			// round now (done with), and this round's goes to spare once
			// sent. (Swapping for an empty queue would leave spare and
			// queue on one array, which the next round would send while
			// the reader appends to it.)
			st.queue = st.spare[:0]
			st.waiting.Store(0)
			st.mu.Unlock()
			st.settle()
			for _, f := range batch {
				s.cache.store(f.item)
			}
			for rest := batch; len(rest) > 0; {
				n := min(len(rest), udpBatch)
				for _, f := range rest[:n] {
					st.rb.pending = append(st.rb.pending, f.p)
				}
				s.flushReplies(st.rb) // empties st.rb.pending
				rest = rest[n:]
			}
			clear(batch) // drop the replies
			st.spare = batch[:0]
		}
	}
}

// readUDP is serveUDP's loop.
func (s *Server) readUDP(br *tsock.BatchReader, rd *udpReader) error {
	for {
		msgs, err := br.Read()
		if err != nil {
			if s.isClosed() || errors.Is(err, net.ErrClosed) {
				return nil
			}
			// Transient (e.g. ENOBUFS, ENOMEM): do not spin on it.
			s.log.Debug("udp read", "err", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		for _, m := range msgs {
			if !s.serveDatagram(m.Data, m.OOB, m.Src, rd) {
				return nil
			}
		}
		s.flushReplies(rd.rb)
		if len(rd.fresh) > 0 {
			rd.settler.push(rd.fresh)
			clear(rd.fresh)
			rd.fresh = rd.fresh[:0]
		}
	}
}

// udpBatch is how many datagrams one read takes at most.
const udpBatch = 32

// maxUDPQuery is the read buffer per datagram: a query (one question,
// perhaps EDNS0 options) is far smaller; a longer datagram is cut, fails to
// unpack and is dropped as garbage.
const maxUDPQuery = 4096

// serveDatagram answers one query datagram (from the cache, queued in
// rd.rb and sent with the rest of the burst; at once, for the settler; or by
// a worker); false once the server is closing.
func (s *Server) serveDatagram(data, oob []byte, client netip.AddrPort, rd *udpReader) bool {
	origDst, _ := tsock.ParseOrigDst(oob) // invalid when none
	rb := rd.rb
	if reply := s.cache.appendReply(rb.slot(), data, true); reply != nil {
		s.queries.Add(1)
		rb.add(reply, client, origDst)
		return true
	}
	if reply, item, fresh, done := s.answerNow(data, rd); done {
		switch {
		case reply == nil: // dropped
		case fresh:
			rd.fresh = append(rd.fresh, freshReply{pendingReply{reply, client, origDst}, item})
		default:
			rb.add(reply, client, origDst)
		}
		return true
	}
	if !s.acquire() {
		return false
	}
	q := udpQuery{req: make([]byte, len(data)), client: client, origDst: origDst}
	copy(q.req, data)
	select {
	case s.idle <- q: // a worker waiting for one takes it
	default:
		s.workers.Add(1)
		s.wg.Add(1)
		go s.udpWorker(q)
	}
	return true
}

// answerNow answers req in the reader when the engine can at once (fresh:
// it needs settling, and leaves, and item goes into the reply cache, once
// settled; otherwise it is cached and leaves with the burst), or drops it
// (or refuses it) as malformed; done false leaves it to a worker. Local names
// (ForwardLocalNames) go to a worker: they are forwarded.
func (s *Server) answerNow(req []byte, rd *udpReader) (reply []byte, item cacheItem, fresh, done bool) {
	if rd.serveNow == nil {
		return nil, item, false, false
	}
	q, reply, v := parseQuery(req, true)
	if q == nil {
		s.count(v)
		return reply, item, false, true
	}
	if s.local != nil && isLocalName(q.Question[0].Name) || rd.settler.full() {
		return nil, item, false, false
	}
	gen := s.cache.generation()
	r, ok, unsettled := rd.serveNow(q)
	if !ok {
		return nil, item, false, false
	}
	reply, v, ttl := finish(q, r, nil, true)
	s.count(v)
	if !unsettled {
		if v == answered {
			s.cache.put(req, reply, true, ttl, gen)
		}
		return reply, item, false, true
	}
	if v == answered {
		item = s.cache.prepare(req, reply, true, ttl, gen)
	}
	return reply, item, true, true
}

// udpQuery is a query the reply cache could not answer.
type udpQuery struct {
	req             []byte
	client, origDst netip.AddrPort
}

// workerIdle is how long a worker waits for another query before it ends.
const workerIdle = time.Second

// udpWorker answers q and then the queries handed to it while it waits, up
// to workerIdle each time. Each query in flight holds a slot (acquire), so
// there are never more workers busy than maxInFlight. Reusing them keeps
// their grown stacks: mihomo's resolver needs more than a new goroutine's
// stack, and growing (copying) it took 7% of the process's CPU while new
// names came in.
//
// A worker sends its answers together with those other workers finish
// meanwhile (sendReply).
func (s *Server) udpWorker(q udpQuery) {
	defer s.wg.Done()
	wait := time.NewTimer(workerIdle)
	defer wait.Stop()
	for {
		if reply := s.answer(q.req, true, q.origDst); reply != nil {
			s.sendReply(pendingReply{reply, q.client, q.origDst}) // releases
		} else {
			s.release()
		}
		wait.Reset(workerIdle)
		select {
		case q = <-s.idle:
		case <-wait.C:
			return
		case <-s.ctx.Done():
			return
		}
	}
}

// replyBatch holds the cached answers of one burst of queries until they
// are sent together.
type replyBatch struct {
	bufs    *[udpBatch][maxCachedReply]byte // the reader's: for slot
	pending []pendingReply
	w       *tsock.BatchWriter
	rc      syscall.RawConn // the listening socket's
	v6      bool            // the listening socket is AF_INET6 (dual-stack)
	groups  []netip.AddrPort
}

type pendingReply struct {
	reply           []byte
	client, origDst netip.AddrPort
}

func (s *Server) newReplyBatch() (*replyBatch, error) {
	rc, err := s.udp.SyscallConn()
	if err != nil {
		return nil, err
	}
	rb := &replyBatch{w: tsock.NewBatchWriter(udpBatch, 64), rc: rc}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		var sa unix.Sockaddr
		if sa, serr = unix.Getsockname(int(fd)); serr == nil {
			_, rb.v6 = sa.(*unix.SockaddrInet6)
		}
	}); err != nil {
		return nil, err
	}
	return rb, serr
}

// slot is an empty buffer for the next cached answer.
func (rb *replyBatch) slot() []byte { return rb.bufs[len(rb.pending)][:0] }

func (rb *replyBatch) add(reply []byte, client, origDst netip.AddrPort) {
	rb.pending = append(rb.pending, pendingReply{reply, client, origDst})
}

// flushReplies sends the queued answers: those that leave from the
// listening socket in one sendmmsg, and those that leave from a reply
// socket (TPROXYed queries) in one per socket. Each answer leaves from the
// address its client sent the query to (origDst), as a client drops a
// reply from any other address or port: a TPROXYed query (say to
// 203.0.113.2:53) arrived on our port with its destination unchanged, and
// its answer leaves from a transparent socket bound to that address; one
// sent to this server's port is answered from the listening socket, with
// origDst as source address (sourceCmsg).
func (s *Server) flushReplies(rb *replyBatch) {
	if len(rb.pending) == 0 {
		return
	}
	rb.groups = rb.groups[:0]
	for _, p := range rb.pending {
		switch {
		case !p.origDst.IsValid():
			rb.w.Add(p.reply, p.client, nil, rb.v6)
		case p.origDst.Port() == s.addr.Port():
			rb.w.Add(p.reply, p.client, sourceCmsg(p.origDst.Addr()), rb.v6)
		case !slices.Contains(rb.groups, p.origDst):
			rb.groups = append(rb.groups, p.origDst)
		}
	}
	if err := rb.w.Flush(rb.rc); err != nil {
		s.log.Debug("udp replies", "err", err)
	}
	for _, from := range rb.groups {
		if !s.transparent {
			s.log.Debug("udp reply", "from", from, "err", "query to a foreign address on a non-transparent socket")
			continue
		}
		if err := s.replies.sendBatch(rb.w, from, rb.pending); err != nil {
			s.log.Debug("udp replies", "from", from, "err", err)
		}
	}
	clear(rb.pending) // drop the references to the slots
	rb.pending = rb.pending[:0]
}

// replyCombiner gathers the answers of UDP workers. The first worker with
// an answer sends it, and then every answer other workers finish while it
// sends, a batch at a time, until none is left; those workers do not wait.
// New names often finish together: their answers wait for one journal
// write (the engine's persisted fake-ip pool), and are then sent in a few
// sendmmsg calls instead of one each. A worker that finds nothing else
// sends its answer at once, as alone.
type replyCombiner struct {
	mu      sync.Mutex
	pending []pendingReply // answers to send
	spare   []pendingReply // the last batch sent, emptied, for reuse
	sending bool           // a worker is sending
	rb      *replyBatch    // the sender's (the listening socket's, its own writer)
}

// sendReply sends p, an answer a worker finished (p.reply is its own), or
// leaves it to the worker sending now. Its query's slot (acquire) is
// released once it is sent, so that answers waiting here count against
// maxInFlight.
func (s *Server) sendReply(p pendingReply) {
	c := &s.workerReplies
	c.mu.Lock()
	c.pending = append(c.pending, p)
	if c.sending {
		c.mu.Unlock()
		return
	}
	c.sending = true
	for len(c.pending) > 0 {
		batch := c.pending
		c.pending = c.spare
		c.mu.Unlock()
		for rest := batch; len(rest) > 0; {
			n := min(len(rest), udpBatch)
			c.rb.pending = rest[:n]
			s.flushReplies(c.rb) // clears them
			for range n {
				s.release()
			}
			rest = rest[n:]
		}
		c.rb.pending = nil
		c.mu.Lock()
		c.spare = batch[:0]
	}
	c.sending = false
	c.mu.Unlock()
}

// sourceCmsg is the control message that makes a reply sent on the listening
// socket leave from src (IP_PKTINFO / IPV6_PKTINFO). On a transparent socket
// src need not be local.
func sourceCmsg(src netip.Addr) []byte {
	if src.Is4() {
		return unix.PktInfo4(&unix.Inet4Pktinfo{Spec_dst: src.As4()})
	}
	return unix.PktInfo6(&unix.Inet6Pktinfo{Addr: src.As16()})
}
