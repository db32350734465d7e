package engine

import (
	"net"
	"sync"
	"sync/atomic"
	"time"

	N "github.com/metacubex/mihomo/common/net"
	SN "github.com/metacubex/sing/common/network"
	"golang.org/x/sys/unix"

	"github.com/tpgw/tpgw/internal/tsock"
)

// The sockets of a flow tpgw relays are armed to reset (SO_LINGER 0) while
// the flow runs. tpgw disarms them before it closes a flow that ended (EOF
// both ways), closes an aborted one armed at once (AbortFlows, the relay
// listener's Abort) and a cut one armed after its queued bytes (below).
//
// The kernel closes the sockets of a process that dies as the process would
// have: unarmed, a crashed or killed gateway ended each flow with a FIN, so
// a download or upload cut short looked complete to the client (and for
// DIRECT to the server), and, once on-failure's watchdog had removed the
// rules, the client's answers to that FIN were routed past the orphaned
// socket and dropped (as after a stop that closed too late: the listener's
// Abort), so both ends lingered and the client's port stayed taken. Armed,
// each end gets a reset at once.
//
// A flow tpgw relays itself (park.go) that is cut at one end (a reset, a
// failed read or write) ends with a reset at the other too, as through a
// router, but only once the bytes queued in tpgw's socket for that end have
// been delivered (drainSends): a reset at once would discard them, a FIN
// would make the cut stream look complete. For a flow mihomo's relay copies
// (other outbounds, the sniffer) the same holds at the client's side: its
// Close tells a cut from an end by the socket's state (finished).

// armReset makes closing c, by the kernel when tpgw dies included, send a
// reset.
func armReset(c *net.TCPConn) { _ = c.SetLinger(0) }

// disarm makes closing c graceful again: queued bytes and a FIN go out.
func disarm(c *net.TCPConn) { _ = c.SetLinger(-1) }

// A cut flow's sockets close once their send queues are empty, or when a
// queue has not shrunk for drainStall (a peer that stopped reading), and
// after drainMax at most.
const (
	drainStall = time.Second
	drainMax   = 5 * time.Second
)

// drainSends waits, bounded, until the peers of the armed sockets cs have
// acknowledged every byte queued in them (a reset socket holds none).
func drainSends(cs ...*net.TCPConn) {
	start := time.Now()
	last, lastMoved := -1, start
	// The checks back off from 1 ms to 50 ms: many flows cut at once (an
	// uplink that failed) toward clients that do not read would otherwise
	// poll thousands of times a second each.
	wait := time.Millisecond
	for {
		queued := 0
		for _, c := range cs {
			queued += sendQueued(c)
		}
		now := time.Now()
		if queued == 0 || now.Sub(start) >= drainMax {
			return
		}
		if last < 0 || queued < last {
			last, lastMoved = queued, now
		} else if now.Sub(lastMoved) >= drainStall {
			return
		}
		time.Sleep(wait)
		wait = min(2*wait, 50*time.Millisecond)
	}
}

// sendQueued is the number of bytes in c's send queue not yet acknowledged
// by its peer; 0 when it cannot be read.
func sendQueued(c *net.TCPConn) int {
	n, _ := tsock.SendQueued(c)
	return n
}

// bulkChunk is the size of one chunk from the remote end that marks a flow as
// bulk: a read that returns this much means data is queued faster than it
// is sent on, and splicing it pays off.
const bulkChunk = 16 << 10

// bulkBytes is the amount relayed towards the client after which a flow
// splices even when its chunks are small (a long stream at a modest rate).
const bulkBytes = 1 << 20

// lazySpliceConn is the client side of a TPROXYed flow as mihomo's relay
// sees it. mihomo copies with sing's bufio.Copy, which splices between two
// raw sockets from the first byte: each direction gets a pipe resized to
// 1 MiB, held for the life of the flow (2 descriptors and ~10 KiB of kernel
// memory per pipe, also when the flow is idle). This wrapper keeps the raw
// socket reachable (syscall.Conn, CloseWrite), so splicing still happens,
// but tells sing's copy loop that the copy may be replaced ("possibly
// replaceable"), which makes it copy chunk by chunk, holding no buffer while
// it waits for data (sing's read waiter allocates only once the socket is
// readable), until the flow turns out to be bulk:
//   - client → remote: sing re-asks after each chunk and splices after at
//     most 10 chunks (its own limit); a flow that never sends holds no pipe.
//   - remote → client: chunk by chunk until one chunk reaches bulkChunk or
//     bulkBytes have been relayed, then spliced.
//
// Byte counting for mihomo's connection statistics is unchanged: sing calls
// the tracker's counters on both paths.
type lazySpliceConn struct {
	*net.TCPConn
	raw      *rawTCPConn // raw reads and writes of the chunked copy (rawsock.go)
	bulkDown atomic.Bool
	down     atomic.Int64
	// buffered is the BufferedConn mihomo reads this connection through
	// (sniffing, the first-byte peek), until the relay starts.
	buffered *N.BufferedConn
	mu       sync.Mutex  // guards setting armed and closed
	armed    atomic.Bool // armReset (Close disarms or drains); read without mu by arm's fast path
	closed   bool
}

// lazySplice wraps c and returns the mihomo BufferedConn around the wrapper,
// to hand to mihomo's tunnel (which would otherwise make one itself).
func lazySplice(c *net.TCPConn) *N.BufferedConn { return newLazySplice(c).buffered }

func newLazySplice(c *net.TCPConn) *lazySpliceConn {
	lc := &lazySpliceConn{TCPConn: c}
	lc.raw = newRawTCPConn(c)
	lc.buffered = N.NewBufferedConn(lc)
	return lc
}

// arm arms the socket to reset if the process dies (armReset) for the
// relay that starts: tpgw's relay arms it before mihomo's relay starts,
// mihomo's tunnel (the sniffer is on) when its relay's copy in either
// direction first asks the connection (ReaderPossiblyReplaceable,
// WriterPossiblyReplaceable), before that copy moves a byte of its own. The
// client → remote copy writes the sniffer's peeked bytes before it asks, so
// the other copy's ask is what arms a flow whose answer reaches the client
// first (seen on a loaded host: a process killed right after the answer
// ended the flow with a FIN).
func (c *lazySpliceConn) arm() {
	if c.armed.Load() {
		return // the copies ask before every chunk
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.closed && !c.armed.Load() {
		armReset(c.TCPConn)
		c.armed.Store(true)
	}
}

// Close ends the connection: gracefully once both of its FINs have passed
// (the relay ended with EOF both ways); otherwise the flow was cut (an error
// at the other end, the dashboard) and the client gets a reset, once the
// bytes queued for it are delivered (drainSends).
func (c *lazySpliceConn) Close() error {
	c.mu.Lock()
	c.closed = true
	armed := c.armed.Load()
	c.mu.Unlock()
	if armed {
		if finished(c.TCPConn) {
			disarm(c.TCPConn)
		} else {
			drainSends(c.TCPConn)
		}
	}
	return c.TCPConn.Close()
}

// The TCP states in which both FINs have passed (include/net/tcp_states.h).
const (
	tcpTimeWait = 6
	tcpClose    = 7
	tcpLastAck  = 9
	tcpClosing  = 11
)

// finished reports whether both FINs have passed on c: one came in and one
// went out (or the connection is gone).
func finished(c *net.TCPConn) bool {
	rc, err := c.SyscallConn()
	if err != nil {
		return false
	}
	var state uint8
	if rc.Control(func(fd uintptr) {
		if info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
			state = info.State
		}
	}) != nil {
		return false
	}
	switch state {
	case tcpTimeWait, tcpClose, tcpLastAck, tcpClosing:
		return true
	}
	return false
}

// dropPeekBuffer lets the 4 KiB bufio.Reader of mihomo's BufferedConn go
// once the relay has started with nothing in it. mihomo drops it itself when
// the relay starts with peeked bytes left (BufferedConn.ReadCached), but
// not when it is empty: sing's copy then unwraps the BufferedConn without
// asking, and the buffer stayed for the life of the connection, a fifth of
// an idle connection's memory. Called from the client → remote copy, the
// only reader then; mihomo's peek has finished before its relay starts.
func (c *lazySpliceConn) dropPeekBuffer() {
	b := c.buffered
	if b == nil {
		return
	}
	c.buffered = nil
	// ReaderReplaceable: no reader any more, or an empty one. (With bytes
	// left, sing reads them through ReadCached, which drops the reader.)
	if b.ReaderReplaceable() {
		b.ReadCached() // nothing cached: returns nil and drops the reader
	}
}

// ReaderReplaceable and WriterReplaceable are part of sing's "possibly
// replaceable" interfaces; false: there is no wrapped reader or writer for
// sing to unwrap to (the socket itself is reached through syscall.Conn).
func (c *lazySpliceConn) ReaderReplaceable() bool { return false }
func (c *lazySpliceConn) WriterReplaceable() bool { return false }

// ReaderPossiblyReplaceable is asked by sing's copy loop (client → remote)
// before each chunk; it stops asking after 10 chunks and splices. The first
// call means the relay has started.
func (c *lazySpliceConn) ReaderPossiblyReplaceable() bool {
	c.dropPeekBuffer()
	c.arm() // a flow mihomo's tunnel handles (the sniffer is on)
	return true
}

// WriterPossiblyReplaceable is asked by sing's copy loop (remote → client)
// before each chunk: true until the flow is bulk. The first call means the
// relay has started.
func (c *lazySpliceConn) WriterPossiblyReplaceable() bool {
	c.arm()
	return !c.bulkDown.Load()
}

// Write counts what the chunked copy sends towards the client, written with
// raw calls.
func (c *lazySpliceConn) Write(b []byte) (int, error) {
	n, err := c.raw.Write(b)
	if !c.bulkDown.Load() && (len(b) >= bulkChunk || c.down.Add(int64(n)) >= bulkBytes) {
		c.bulkDown.Store(true)
	}
	return n, err
}

// CreateReadWaiter gives sing's chunked copy raw reads (rawsock.go).
func (c *lazySpliceConn) CreateReadWaiter() (SN.ReadWaiter, bool) {
	return c.raw.CreateReadWaiter()
}
