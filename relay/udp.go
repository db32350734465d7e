package relay

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tpgw/tpgw/internal/tsock"
)

// UDPHandler receives TPROXYed UDP datagrams (engine.Engine satisfies it).
//
// HandleUDP must not block for long: while it runs, datagrams wait in the
// listener's socket buffer (the engine waits at most 10 ms, for room in a
// full queue). data is valid until release is called, which the
// handler does exactly once, when it no longer needs data (the relay then
// recycles the buffer). reply(b, from) sends b to src so that it appears to
// come from from (full cone: the address the reply really came from), or from
// the original destination dst when from is the zero AddrPort; it may be
// called from any goroutine, also after release, for as long as the handler
// keeps the flow.
type UDPHandler interface {
	HandleUDP(src, dst netip.AddrPort, data []byte, reply func(b []byte, from netip.AddrPort) (int, error), release func())
}

// UDPOptions tune a UDPListener; zero values take the defaults.
type UDPOptions struct {
	// IdleTimeout closes a reply session that sent nothing for this long
	// (default DefaultUDPIdleTimeout).
	IdleTimeout time.Duration
	// MaxSessions bounds the reply-session table (default
	// DefaultUDPMaxSessions); when full, the least recently used session is
	// closed to make room.
	MaxSessions int
}

// Defaults of UDPOptions.
const (
	DefaultUDPIdleTimeout = 60 * time.Second
	DefaultUDPMaxSessions = 4096
)

// UDPStats counts what a UDPListener did since it was opened.
type UDPStats struct {
	Datagrams   uint64 // handed to the handler
	Dropped     uint64 // no original destination, or addressed to the listener itself
	Sessions    int    // reply sessions open now
	Opened      uint64 // reply sessions opened
	Evicted     uint64 // closed to make room (table full)
	Expired     uint64 // closed after IdleTimeout
	ReplyErrors uint64 // replies that could not be sent
	RawSessions uint64 // reply sessions opened on a raw socket: another socket of the gateway held their source
}

// Buffer sizes. Serve reads up to udpBatch datagrams per system call
// (recvmmsg), each into a 64 KiB scratch buffer (more than any UDP payload,
// so nothing is ever truncated; only the pages a datagram touches become
// resident), and copies each
// into a pooled buffer of the smallest class that fits: the handler may queue
// datagrams for a while, and typical ones (≤ MTU) then hold 2 KiB, not 64.
const (
	udpBatch        = 16
	maxDatagram     = 64 << 10
	smallDatagram   = 2 << 10
	oobSize         = 128 // one IP(V6)_ORIGDSTADDR message needs 48 bytes
	replyBufferSize = 4 << 10
)

// UDPListener receives TPROXYed UDP datagrams on one port for IPv4 and IPv6
// and sends the handler's replies from transparent sockets bound to the
// address each reply must come from.
type UDPListener struct {
	conn    *net.UDPConn
	addr    netip.AddrPort
	handler UDPHandler
	log     *slog.Logger
	home    *tsock.Netns
	table   *sessionTable

	small, large sync.Pool // *datagram

	datagrams, dropped, replyErrors, rawSessions atomic.Uint64

	mu      sync.Mutex
	closed  bool
	serving sync.WaitGroup
	stop    chan struct{}
	janitor sync.WaitGroup
}

// ListenUDP opens a transparent UDP listener on addr (e.g. ":7893", which is
// dual-stack: IPv4 clients arrive as v4-mapped addresses and are unmapped).
// It needs CAP_NET_ADMIN.
//
// Reply sockets are opened later, from whichever goroutine calls reply; they
// are created in the network namespace of the thread that called ListenUDP
// (a no-op when the whole process is in one namespace, as tpgw is). A caller
// inside a namespace it switched into must hold its thread locked, as
// testnet's NS.Do does.
func ListenUDP(addr string, h UDPHandler, opts UDPOptions, log *slog.Logger) (*UDPListener, error) {
	if log == nil {
		log = slog.Default()
	}
	if opts.IdleTimeout <= 0 {
		opts.IdleTimeout = DefaultUDPIdleTimeout
	}
	if opts.MaxSessions <= 0 {
		opts.MaxSessions = DefaultUDPMaxSessions
	}
	// Transparent, to receive TPROXYed datagrams; each datagram's original
	// destination comes with it: TPROXY delivers without rewriting the
	// packet, and IP(V6)_RECVORIGDSTADDR hands the destination the client
	// used (address and port) to recvmsg.
	lc := net.ListenConfig{Control: tsock.Control(tsock.SetTransparent, tsock.SetRecvOrigDst, tsock.RaiseRcvBuf)}
	pc, err := lc.ListenPacket(context.Background(), "udp", addr)
	if err != nil {
		return nil, fmt.Errorf("relay: listen udp %s: %w", addr, err)
	}
	conn := pc.(*net.UDPConn)
	home, _ := tsock.CurrentNetns() // on error, one that makes sockets in place
	l := &UDPListener{
		conn:    conn,
		addr:    conn.LocalAddr().(*net.UDPAddr).AddrPort(),
		handler: h,
		log:     log.With("part", "relay", "proto", "udp"),
		home:    home,
		stop:    make(chan struct{}),
	}
	l.small.New = func() any { return newDatagram(smallDatagram, &l.small) }
	l.large.New = func() any { return newDatagram(maxDatagram, &l.large) }
	l.table = newSessionTable(opts.MaxSessions, opts.IdleTimeout, l.openReplySocket, time.Now)
	l.janitor.Add(1)
	go l.runJanitor(janitorInterval(opts.IdleTimeout))
	return l, nil
}

// janitorInterval is how often idle sessions are looked for: a quarter of
// the timeout (so a session lives at most 1.25 × IdleTimeout), 10 ms to 5 s.
func janitorInterval(idle time.Duration) time.Duration {
	return min(max(idle/4, 10*time.Millisecond), 5*time.Second)
}

func (l *UDPListener) runJanitor(every time.Duration) {
	defer l.janitor.Done()
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-tick.C:
			if n := l.table.expire(); n > 0 {
				l.log.Debug("idle udp sessions closed", "count", n)
			}
		}
	}
}

// Addr is the listening address.
func (l *UDPListener) Addr() netip.AddrPort { return l.addr }

// Sessions is the number of reply sessions open now.
func (l *UDPListener) Sessions() int { return l.table.len() }

// Stats returns the listener's counters.
func (l *UDPListener) Stats() UDPStats {
	c := l.table.counts()
	return UDPStats{
		Datagrams:   l.datagrams.Load(),
		Dropped:     l.dropped.Load(),
		Sessions:    c.open,
		Opened:      c.opened,
		Evicted:     c.evicted,
		Expired:     c.expired,
		ReplyErrors: l.replyErrors.Load(),
		RawSessions: l.rawSessions.Load(),
	}
}

// Serve reads datagrams and hands them to the handler until Close. It returns
// nil after Close. Each call has its own read buffers, so several goroutines
// may serve one listener.
func (l *UDPListener) Serve() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.serving.Add(1)
	l.mu.Unlock()
	defer l.serving.Done()

	br, err := tsock.NewBatchReader(l.conn, udpBatch, maxDatagram, oobSize)
	if err != nil {
		return fmt.Errorf("relay: udp: %w", err)
	}
	for {
		msgs, err := br.Read()
		if err != nil {
			if l.isClosed() {
				return nil
			}
			if transientReadError(err) {
				continue
			}
			return fmt.Errorf("relay: read udp: %w", err)
		}
		for _, m := range msgs {
			l.dispatch(m.Data, m.OOB, m.Src)
		}
	}
}

// transientReadError reports errors after which reading may go on.
func transientReadError(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	return errors.Is(err, unix.EINTR) || errors.Is(err, unix.ENOBUFS) || errors.Is(err, unix.ENOMEM) ||
		errors.Is(err, unix.ECONNREFUSED) || errors.Is(err, unix.EHOSTUNREACH) || errors.Is(err, unix.ENETUNREACH)
}

// dispatch is the per-datagram hot path: parse the original destination,
// copy into a pooled buffer, call the handler. Its one allocation is the
// reply closure (it outlives the datagram, so it cannot be pooled with it).
func (l *UDPListener) dispatch(payload, oob []byte, src netip.AddrPort) {
	dst, ok := tsock.ParseOrigDst(oob)
	if !ok {
		l.dropped.Add(1)
		return
	}
	if dst.Addr().Zone() != "" {
		// The scope id of a link-local destination is left out: nothing
		// downstream dials a link-local original destination.
		dst = netip.AddrPortFrom(dst.Addr().WithZone(""), dst.Port())
	}
	src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
	if l.toSelf(dst) {
		// Sent to the TPROXY port itself, not diverted: relaying it would
		// send it here again, a loop.
		l.dropped.Add(1)
		if l.log.Enabled(context.Background(), slog.LevelDebug) {
			l.log.Debug("dropping datagram sent to the tproxy port directly", "src", src, "dst", dst)
		}
		return
	}
	d := l.getDatagram(len(payload))
	copy(d.buf, payload)
	l.datagrams.Add(1)
	l.handler.HandleUDP(src, dst, d.buf[:len(payload)], func(b []byte, from netip.AddrPort) (int, error) {
		return l.reply(src, dst, b, from)
	}, d.release)
}

// toSelf reports whether dst is the listener itself: its port on a local
// address. TPROXYed datagrams never have a local destination (netcfg's plan
// leaves those alone), so only a datagram sent straight to the port matches.
// The port is compared first; only datagrams to the listener's port pay for
// the address check.
func (l *UDPListener) toSelf(dst netip.AddrPort) bool {
	if dst.Port() != l.addr.Port() {
		return false
	}
	a := dst.Addr()
	if a.IsLoopback() || a.IsUnspecified() || a == l.addr.Addr().Unmap() {
		return true
	}
	return l.isLocalAddr(a)
}

// isLocalAddr asks the kernel: binding a plain socket to a succeeds only
// for an address of this host (in the listener's namespace).
func (l *UDPListener) isLocalAddr(a netip.Addr) bool {
	local := false
	_ = l.home.Do(func() error {
		// Any other failure (even of socket(2)): cannot tell, so err on the
		// side of no loop.
		err := tsock.TryBind(a)
		local = err == nil || !errors.Is(err, unix.EADDRNOTAVAIL)
		return nil
	})
	return local
}

// reply sends b to client from from, or from dst when from is the zero
// AddrPort or of the other address family (the client only accepts replies
// of the family it sent).
func (l *UDPListener) reply(client, dst netip.AddrPort, b []byte, from netip.AddrPort) (int, error) {
	if from.IsValid() {
		from = netip.AddrPortFrom(from.Addr().Unmap().WithZone(""), from.Port())
	}
	if !from.IsValid() || from.Addr().Is4() != client.Addr().Is4() {
		from = dst
	}
	k := sessionKey{client: client, from: from}
	// Two tries: an eviction may close the socket between get and write.
	for try := 0; ; try++ {
		sock, err := l.table.get(k)
		if err != nil {
			l.replyErrors.Add(1)
			return 0, err
		}
		n, err := sock.WriteToUDPAddrPort(b, client)
		if err != nil && try == 0 && errors.Is(err, net.ErrClosed) {
			continue
		}
		if err != nil {
			l.replyErrors.Add(1)
		}
		return n, err
	}
}

// openReplySocket opens a socket whose datagrams come from from, an address
// of some remote host, in the listener's namespace (tsock.OpenReply):
// IP_TRANSPARENT allows binding it (and sending from it); SO_REUSEADDR lets
// every client's session bind the same from address.
//
// The socket stays unconnected and replies use sendto. A connected socket
// bound to (from) would also be what the TPROXY lookup of established
// sockets matches for the client's next datagram to from, which would then
// land in the reply socket instead of the listener.
//
// When another socket of the gateway holds from's port on all addresses (or
// on from's) without SO_REUSEADDR, the bind fails with EADDRINUSE whatever
// IP_TRANSPARENT says: tpgw's own listeners, a WireGuard server on the
// router, mihomo's DIRECT sockets on their ephemeral ports. The session then
// sends from a raw socket that writes the IP and UDP headers itself
// (rawReplySocket).
func (l *UDPListener) openReplySocket(from netip.AddrPort) (replySocket, error) {
	var sock replySocket
	err := l.home.Do(func() error {
		conn, err := tsock.OpenReply(from, tsock.ReplyOptions{RcvBuf: replyBufferSize})
		if err == nil {
			sock = conn
			return nil
		}
		if !errors.Is(err, unix.EADDRINUSE) {
			return err
		}
		raw, rerr := tsock.OpenRawUDP(from.Addr().Unmap().Is4())
		if rerr != nil {
			return fmt.Errorf("%w; raw socket instead: %w", err, rerr)
		}
		sock = &rawReplySocket{raw: raw, from: from}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("relay: open udp reply socket from %s: %w", from, err)
	}
	if _, ok := sock.(*rawReplySocket); ok {
		l.rawSessions.Add(1)
		l.log.Debug("udp reply source held by another socket of the gateway: the session replies from a raw socket", "from", from)
	}
	return sock, nil
}

// rawReplySocket is a session's reply socket for a source address and port
// it cannot bind (openReplySocket): each reply is a whole IP packet with from
// as its source, sent on a raw socket of the listener's namespace
// (tsock.RawUDP). Nothing is bound, so the socket that holds the port keeps
// receiving what is sent to it. Unlike a UDP socket's, a reply larger than
// the MTU of the LAN interface is not fragmented: it fails with EMSGSIZE
// and counts as a reply error.
type rawReplySocket struct {
	raw  *tsock.RawUDP
	from netip.AddrPort
}

func (s *rawReplySocket) WriteToUDPAddrPort(b []byte, client netip.AddrPort) (int, error) {
	if err := s.raw.Send(b, s.from, client); err != nil {
		if errors.Is(err, tsock.ErrRawClosed) {
			// Evicted meanwhile, as a closed ReplySocket: reply tries again.
			return 0, net.ErrClosed
		}
		return 0, fmt.Errorf("relay: udp reply from %v to %v: %w", s.from, client, err)
	}
	return len(b), nil
}

func (s *rawReplySocket) Close() error { return s.raw.Close() }

func (l *UDPListener) isClosed() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.closed
}

// Close stops Serve, the janitor and every reply session. Handlers that
// reply afterwards get net.ErrClosed.
func (l *UDPListener) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	l.mu.Unlock()
	err := l.conn.Close()
	close(l.stop)
	l.janitor.Wait()
	// Serve returns at its next read; HandleUDP blocks for at most a few
	// milliseconds, so this is short.
	l.serving.Wait()
	l.table.close()
	l.home.Close()
	if err != nil {
		return fmt.Errorf("relay: close udp listener: %w", err)
	}
	return nil
}

// datagram is a pooled receive buffer. release is bound once, when the
// datagram is made, so handing it to the handler does not allocate.
type datagram struct {
	buf     []byte
	pool    *sync.Pool
	release func()
}

func newDatagram(size int, pool *sync.Pool) *datagram {
	d := &datagram{buf: make([]byte, size), pool: pool}
	d.release = func() { d.pool.Put(d) }
	return d
}

func (l *UDPListener) getDatagram(n int) *datagram {
	if n <= smallDatagram {
		return l.small.Get().(*datagram)
	}
	return l.large.Get().(*datagram)
}
