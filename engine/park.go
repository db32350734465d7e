package engine

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	C "github.com/metacubex/mihomo/constant"
	N "github.com/metacubex/sing/common/network"
	"golang.org/x/sys/unix"
)

// A flow whose two ends are plain kernel sockets (DIRECT) is relayed by tpgw
// instead of mihomo's relay, which holds two goroutines per flow for its whole
// life (about 12 KiB of stacks, the largest part of an idle connection's
// memory). Here each direction is pumped by a short-lived goroutine:
//
//   - A new flow's direction with nothing to read yet is parked at once
//     (start); one with data starts a pump.
//   - It forwards what is readable in chunks, and waits up to idleAfter for
//     more. A direction that stays quiet that long is parked: its socket goes
//     into the engine's epoll set (EPOLLONESHOT), the goroutine
//     ends, and the poller starts a new one when data, a FIN or an error
//     arrives. An idle flow holds no goroutine and no buffer.
//   - A direction that turns out to be bulk (a full chunk in one read, or
//     bulkBytes in total) splices between the two sockets until the end
//     (spliceAll), as mihomo's relay would, with a pipe of its own.
//
// mihomo's connection statistics see every byte (the tracker's counters are
// called for each chunk, spliced or not, once read and before it is
// written), and a
// connection closed from the dashboard (the tracker's Close) ends the flow.
// Half-closes pass through: EOF one way shuts that way's write side, and the
// flow ends when both ways are done or either fails.

// idleAfter is how long a direction's goroutine waits for more data before
// it parks: a direction that has started talking (a request, its answer and
// the closes) usually finishes without another trip through epoll.
const idleAfter = 500 * time.Millisecond

// chunkSize is the read size of a pumping direction; a read that fills it
// marks the direction as bulk (bulkChunk in tcpconn.go).
const chunkSize = bulkChunk

var chunkPool = sync.Pool{New: func() any { b := make([]byte, chunkSize); return &b }}

const (
	dirUp   = 0 // client → remote
	dirDown = 1 // remote → client
)

// flow is one DIRECT TCP flow relayed by tpgw.
type flow struct {
	id      uint32
	p       *parker
	client  *net.TCPConn
	remote  *net.TCPConn // the outbound's kernel socket
	tracker C.Conn       // mihomo's statistics; its Close ends the flow
	dirs    [2]direction
	done    atomic.Int32 // directions finished with EOF
	closed  atomic.Bool
	aborted atomic.Bool // closeAll: shutdown resets both ends
	// setup is held while start fills in the fields above: the tracker is
	// in mihomo's statistics before start runs, so the dashboard can end
	// the flow (end) meanwhile, and end waits for it.
	setup sync.Mutex
}

// direction is one way of a flow. Only its current pump goroutine touches
// it; the poller starts a new one only after the last one has parked.
type direction struct {
	src, dst *net.TCPConn
	raw      syscall.RawConn
	counters []N.CountFunc // mihomo's byte counters of this direction
	total    int64
	armed    atomic.Bool // in the epoll set (re-armed with EPOLL_CTL_MOD)
	// The state of one read (read, readOnce).
	readFn func(fd uintptr) bool
	buf    *[]byte
	n      int
	err    error
	// The state of one write (write, writeAll) to dst, through dstRaw.
	dstRaw  syscall.RawConn
	writeFn func(fd uintptr) bool
	wbuf    []byte
	werr    error
}

func newFlow(p *parker, client, remote *net.TCPConn) *flow {
	return &flow{p: p, client: client, remote: remote}
}

// wrapRemote is the outbound connection as the tracker sees it: closing it
// (the dashboard, mihomo's "close all") ends the whole flow.
func (f *flow) wrapRemote(c C.Conn) C.Conn { return &flowRemote{Conn: c, f: f} }

// start relays the flow; it returns at once.
func (f *flow) start(tracker C.Conn) {
	f.setup.Lock()
	if f.closed.Load() {
		// Ended already: end closed both sockets and has no more to do here.
		f.setup.Unlock()
		return
	}
	f.tracker = tracker
	_, downCounters := N.UnwrapCountReader(tracker, nil)
	_, upCounters := N.UnwrapCountWriter(tracker, nil)
	up, down := &f.dirs[dirUp], &f.dirs[dirDown]
	*up = direction{src: f.client, dst: f.remote, counters: upCounters}
	*down = direction{src: f.remote, dst: f.client, counters: downCounters}
	up.readFn, down.readFn = up.readOnce, down.readOnce
	up.writeFn, down.writeFn = up.writeAll, down.writeAll
	var err error
	if up.raw, err = f.client.SyscallConn(); err == nil {
		down.raw, err = f.remote.SyscallConn()
	}
	up.dstRaw, down.dstRaw = down.raw, up.raw
	armReset(f.client)
	armReset(f.remote)
	// A flow ended before this point (closed from the dashboard) is not
	// added: end found no id to remove.
	ok := err == nil && !f.closed.Load() && f.p.add(f)
	f.setup.Unlock()
	if !ok {
		f.cut()
		return
	}
	// The client usually speaks first: if its bytes are there, pump them at
	// once. A remote that was just dialed rarely has any; its socket is
	// parked straight away (adding a readable socket to epoll reports it at
	// once, so nothing waits). A flow that is idle from the start (a
	// keep-alive connection, a server that speaks when asked) then never
	// holds a goroutine.
	if f.readable(dirUp) {
		go f.pump(dirUp)
	} else if !f.park(dirUp) {
		f.cut()
		return
	}
	if !f.park(dirDown) {
		f.cut()
	}
}

// readable reports whether a direction's source has something to read (or
// an EOF or error to report), without waiting or taking it.
func (f *flow) readable(dir int) bool {
	readable := true // on doubt, let the pump find out
	var buf [1]byte
	_ = f.dirs[dir].raw.Control(func(fd uintptr) {
		_, _, err := unix.Recvfrom(int(fd), buf[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		readable = err != unix.EAGAIN
	})
	return readable
}

// pump forwards one direction until it parks, splices, ends or fails.
func (f *flow) pump(dir int) {
	d := &f.dirs[dir]
	for {
		_ = d.src.SetReadDeadline(time.Now().Add(idleAfter))
		bp, n, err := d.read()
		if n > 0 {
			// Counted once read, before the write, as mihomo's tracker
			// counts what it reads: an answer to these bytes may reach the
			// client before this goroutine runs again, and the dashboard
			// (or a test) reading the counters then must see them.
			for _, count := range d.counters {
				count(int64(n))
			}
			werr := d.write((*bp)[:n])
			chunkPool.Put(bp)
			if werr != nil {
				f.cut()
				return
			}
			d.total += int64(n)
			if n == chunkSize || d.total >= bulkBytes {
				f.splice(dir)
				return
			}
			continue
		}
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			if !f.park(dir) {
				f.cut()
			}
			return
		case err == io.EOF:
			f.finish(dir)
			return
		default:
			f.cut()
			return
		}
	}
}

// read waits for the source to be readable (up to its deadline) and reads
// one chunk into a pooled buffer, taken only once there is data. It
// allocates nothing: the state of the read lives in d, and the function
// handed to RawConn.Read is made once per direction.
func (d *direction) read() (bp *[]byte, n int, err error) {
	d.buf, d.n, d.err = nil, 0, nil
	if werr := d.raw.Read(d.readFn); werr != nil {
		return nil, 0, werr
	}
	bp, n, err = d.buf, d.n, d.err
	d.buf = nil
	switch {
	case err != nil:
		chunkPool.Put(bp)
		return nil, 0, err
	case n == 0:
		chunkPool.Put(bp)
		return nil, 0, io.EOF
	}
	return bp, n, nil
}

// readOnce is d's RawConn.Read function: false (wait) while the socket is
// empty.
func (d *direction) readOnce(fd uintptr) bool {
	d.buf = chunkPool.Get().(*[]byte)
	d.n, d.err = rawRead(int(fd), *d.buf)
	if d.err == unix.EAGAIN {
		chunkPool.Put(d.buf)
		d.buf = nil
		return false
	}
	return true
}

// write writes all of b to the direction's destination, waiting in the
// poller while its send buffer is full. Like read, it allocates nothing.
func (d *direction) write(b []byte) error {
	d.wbuf, d.werr = b, nil
	err := d.dstRaw.Write(d.writeFn)
	d.wbuf = nil
	if err != nil {
		return err
	}
	return d.werr
}

// writeAll is d's RawConn.Write function: false (wait) while the socket
// takes no more.
func (d *direction) writeAll(fd uintptr) bool {
	n, err := rawWriteAll(int(fd), d.wbuf)
	d.wbuf = d.wbuf[n:]
	if err == unix.EAGAIN {
		return false
	}
	d.werr = err
	return true
}

// splice moves a bulk direction with splice(2) between the two sockets,
// counting for mihomo, until EOF.
func (f *flow) splice(dir int) {
	d := &f.dirs[dir]
	_ = d.src.SetReadDeadline(time.Time{})
	if err := spliceAll(d.raw, d.dstRaw, d.counters); err != nil {
		f.cut()
		return
	}
	f.finish(dir)
}

// finish passes a direction's EOF on (shutting down the write side of its
// destination) and ends the flow when both directions are done.
func (f *flow) finish(dir int) {
	if rawCloseWrite(f.dirs[dir].dstRaw) != nil {
		f.cut()
	} else if f.done.Add(1) == 2 {
		f.shutdown()
	}
}

// park puts a quiet direction's socket into the epoll set, armed for one
// event. Control holds the descriptor, so it cannot be closed (and its
// number reused) meanwhile; a closed flow fails here.
func (f *flow) park(dir int) bool {
	d := &f.dirs[dir]
	if f.closed.Load() {
		return false
	}
	op := unix.EPOLL_CTL_MOD
	if !d.armed.Load() {
		op = unix.EPOLL_CTL_ADD
		d.armed.Store(true) // a failed ADD ends the flow
	}
	// Nothing of d may be touched once the socket is armed: its event may
	// start the next pump of this direction at once.
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT, Fd: int32(f.id), Pad: int32(dir)}
	var err error
	cerr := d.raw.Control(func(fd uintptr) { err = unix.EpollCtl(f.p.epfd, op, int(fd), &ev) })
	return cerr == nil && err == nil
}

// shutdown ends the flow once: both sockets leave the epoll set and close,
// and the tracker leaves mihomo's statistics. Both directions have ended (or
// mihomo closes the flow: the dashboard): the sockets close gracefully.
func (f *flow) shutdown() { f.end(false) }

// cut ends the flow once after an error at either end (a reset, a failed
// read or write) or in tpgw: each end gets what is queued for it, then a
// reset, as a router passes a reset on behind the bytes before it. A FIN
// would make a stream cut short look complete.
func (f *flow) cut() { f.end(true) }

func (f *flow) end(cut bool) {
	if !f.closed.CompareAndSwap(false, true) {
		return
	}
	// start has finished with the fields, or has not begun and will see
	// closed.
	f.setup.Lock()
	defer f.setup.Unlock()
	f.p.remove(f)
	for i := range f.dirs {
		if raw := f.dirs[i].raw; raw != nil && f.dirs[i].armed.Load() {
			_ = raw.Control(func(fd uintptr) { _ = unix.EpollCtl(f.p.epfd, unix.EPOLL_CTL_DEL, int(fd), nil) })
		}
	}
	// Both sockets are armed to reset if tpgw dies (tcpconn.go): an aborted
	// flow closes with resets at once, a cut one once its queued bytes are
	// delivered, a finished one gracefully.
	switch {
	case f.aborted.Load():
	case cut:
		drainSends(f.client, f.remote)
	default:
		disarm(f.client)
		disarm(f.remote)
	}
	f.client.Close()
	if f.tracker != nil {
		f.tracker.Close() // → flowRemote.Close → the outbound's Close
	} else {
		f.remote.Close()
	}
}

// flowRemote is the outbound connection under the tracker. sing unwraps it
// (Upstream) when it gathers a connection's byte counters.
type flowRemote struct {
	C.Conn
	f *flow
}

func (c *flowRemote) Close() error {
	c.f.shutdown()
	return c.Conn.Close()
}

func (c *flowRemote) Upstream() any           { return c.Conn }
func (c *flowRemote) ReaderReplaceable() bool { return true }
func (c *flowRemote) WriterReplaceable() bool { return true }

// parker is the engine's epoll set of parked directions and its poller.
//
// The poller does not block in epoll_wait: the epoll set is itself in Go's
// poller (an epoll descriptor is readable while it has events), and the
// poller goroutine takes the events with a raw epoll_pwait that does not
// wait. A thread blocked in epoll_wait held its P (scheduler slot) until
// Go's monitor thread (sysmon) took it away, and every wake-up had to get
// one back: on 2 cores half the process's Ps, and sysmon waking every 20 µs
// to hand them over while connections came and went.
type parker struct {
	epfd   int
	epFile *os.File // epfd, in Go's poller
	wake   int      // eventfd: stops the poller
	mu     sync.Mutex
	flows  map[uint32]*flow
	next   uint32
	done   chan struct{}
	events []unix.EpollEvent
	// The state of one pass of the poller (take), for RawConn.Read.
	takeFn  func(fd uintptr) bool
	stopped bool
	err     error
}

// dirStop marks the eventfd's event (the directions are dirUp and dirDown).
const dirStop = 2

func newParker() (*parker, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("engine: epoll: %w", err)
	}
	wake, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err == nil {
		err = unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wake, &unix.EpollEvent{Events: unix.EPOLLIN, Pad: dirStop})
	}
	if err != nil {
		unix.Close(epfd)
		if wake > 0 {
			unix.Close(wake)
		}
		return nil, fmt.Errorf("engine: epoll eventfd: %w", err)
	}
	if err := unix.SetNonblock(epfd, true); err != nil {
		unix.Close(epfd)
		unix.Close(wake)
		return nil, fmt.Errorf("engine: epoll: %w", err)
	}
	p := &parker{epfd: epfd, wake: wake, flows: map[uint32]*flow{}, done: make(chan struct{}), events: make([]unix.EpollEvent, 128)}
	// Non-blocking, so os.NewFile puts it in Go's poller.
	p.epFile = os.NewFile(uintptr(epfd), "tpgw-parked-flows")
	rc, err := p.epFile.SyscallConn()
	if err != nil {
		p.epFile.Close()
		unix.Close(wake)
		return nil, fmt.Errorf("engine: epoll in Go's poller: %w", err)
	}
	p.takeFn = p.take
	go p.poll(rc)
	return p, nil
}

// close ends every flow, stops the poller and closes the epoll set.
func (p *parker) close() {
	p.closeAll()
	var one [8]byte
	one[0] = 1 // eventfd counters are host-endian; 1 in any byte order wakes it
	_, _ = unix.Write(p.wake, one[:])
	<-p.done
	p.epFile.Close()
	unix.Close(p.wake)
}

// add gives f an id for its epoll events.
func (p *parker) add(f *flow) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for {
		p.next++
		if _, used := p.flows[p.next]; !used {
			break
		}
	}
	f.id = p.next
	p.flows[f.id] = f
	return true
}

func (p *parker) remove(f *flow) {
	p.mu.Lock()
	if p.flows[f.id] == f {
		delete(p.flows, f.id)
	}
	p.mu.Unlock()
}

// closeAll ends every flow with a reset on both sockets (engine shutdown):
// the client and the server learn that the stream was cut, not finished,
// and neither socket stays behind in the kernel.
func (p *parker) closeAll() {
	p.mu.Lock()
	flows := make([]*flow, 0, len(p.flows))
	for _, f := range p.flows {
		flows = append(flows, f)
	}
	p.mu.Unlock()
	for _, f := range flows {
		f.aborted.Store(true) // its sockets stay armed to reset (start)
		f.shutdown()
	}
}

// poll starts a pump for each direction that became readable (or hung up),
// waiting in Go's poller while the epoll set has no events, until the
// eventfd's event stops it.
func (p *parker) poll(rc syscall.RawConn) {
	defer close(p.done)
	for !p.stopped {
		if err := rc.Read(p.takeFn); err != nil || p.err != nil {
			// Cannot happen while the parker is open: it closes the
			// epoll set only after the poller stopped.
			return
		}
	}
}

// take handles the events the epoll set has, without waiting; false (wait
// until it is readable) once it has none.
func (p *parker) take(fd uintptr) bool {
	for {
		// A raw system call with a zero timeout, which never waits
		// (epoll_pwait: every architecture has it).
		n, _, errno := unix.RawSyscall6(unix.SYS_EPOLL_PWAIT, fd, uintptr(unsafe.Pointer(&p.events[0])), uintptr(len(p.events)), 0, 0, 0)
		switch {
		case errno == unix.EINTR:
			continue
		case errno != 0:
			p.err = errno
			return true
		case n == 0:
			return false
		}
		p.mu.Lock()
		for _, ev := range p.events[:n] {
			if ev.Pad == dirStop {
				p.stopped = true
				p.mu.Unlock()
				return true
			}
			if f := p.flows[uint32(ev.Fd)]; f != nil && (ev.Pad == dirUp || ev.Pad == dirDown) {
				go f.pump(int(ev.Pad))
			}
		}
		p.mu.Unlock()
	}
}
