package relay

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"syscall"

	"github.com/tpgw/tpgw/internal/tsock"
)

// TCPHandler receives TPROXYed TCP flows. HandleTCP owns conn: it relays the
// flow and closes conn when the flow ends. It may block for the life of the
// flow, or return earlier and go on relaying without the caller's goroutine
// (the engine parks idle DIRECT flows); flows it still blocks on are the ones
// the listener's Close ends.
type TCPHandler interface {
	HandleTCP(conn net.Conn, src, dst netip.AddrPort)
}

// TCPListener accepts TPROXYed TCP connections on one port for IPv4 and IPv6.
type TCPListener struct {
	ln      *net.TCPListener
	handler TCPHandler
	log     *slog.Logger

	wg     sync.WaitGroup
	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool
}

// ListenTCP opens a transparent TCP listener on addr (e.g. ":7893", which is
// dual-stack: TPROXYed IPv4 flows arrive as v4-mapped addresses).
func ListenTCP(addr string, h TCPHandler, log *slog.Logger) (*TCPListener, error) {
	if log == nil {
		log = slog.Default()
	}
	// IP_TRANSPARENT (CAP_NET_ADMIN) lets it accept connections to
	// non-local addresses, which is what TPROXY delivers.
	// Keep-alive probes are set once on the listener, which the accepted
	// connections inherit; KeepAlive < 0 stops Go's Accept from setting
	// them again on each (four setsockopt calls per connection).
	lc := net.ListenConfig{Control: tsock.Control(tsock.SetTransparent, tsock.SetKeepAlive), KeepAlive: -1}
	// Go ≥ 1.24 listens with MPTCP by default; TPROXY does not divert MPTCP
	// subflows to the listener on some kernels, so force plain TCP.
	lc.SetMultipathTCP(false)
	ln, err := lc.Listen(context.Background(), "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("relay: listen tcp %s: %w", addr, err)
	}
	return &TCPListener{ln: ln.(*net.TCPListener), handler: h, log: log.With("part", "relay"), conns: map[net.Conn]struct{}{}}, nil
}

// Addr is the listening address.
func (l *TCPListener) Addr() netip.AddrPort {
	return l.ln.Addr().(*net.TCPAddr).AddrPort()
}

// Serve accepts until Close. It returns nil after Close.
func (l *TCPListener) Serve() error {
	var backoff tsock.AcceptBackoff
	for {
		c, err := l.ln.Accept()
		if err != nil {
			l.mu.Lock()
			closed := l.closed
			l.mu.Unlock()
			if closed {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			if errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				if warn, n := backoff.Failed(); warn {
					l.log.Warn("accept: out of file descriptors; new connections wait", "err", err, "failed_accepts", n)
				}
				continue
			}
			return fmt.Errorf("relay: accept: %w", err)
		}
		backoff.Succeeded()
		if !l.track(c) {
			c.Close()
			return nil
		}
		go l.handle(c)
	}
}

func (l *TCPListener) track(c net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return false
	}
	l.conns[c] = struct{}{}
	// Under mu, with the check of closed: a Close that follows waits for
	// this connection's handler.
	l.wg.Add(1)
	return true
}

func (l *TCPListener) handle(c net.Conn) {
	defer l.wg.Done()
	defer func() {
		l.mu.Lock()
		delete(l.conns, c)
		l.mu.Unlock()
	}()
	src := c.RemoteAddr().(*net.TCPAddr).AddrPort()
	dst := c.LocalAddr().(*net.TCPAddr).AddrPort()
	src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	if dst == l.Addr() || isLocalListener(dst, l.Addr()) {
		// A connection to the listener itself (not TPROXYed): relaying it would
		// loop back here. Nothing to proxy.
		l.log.Debug("refusing direct connection to the tproxy port", "src", src)
		c.Close()
		return
	}
	l.handler.HandleTCP(c, src, dst)
}

// isLocalListener reports whether dst is the listener's own port on a
// loopback address, i.e. somebody connected to the TPROXY port directly.
func isLocalListener(dst, ln netip.AddrPort) bool {
	return dst.Port() == ln.Port() && dst.Addr().IsLoopback()
}

// Abort stops accepting and resets (RST) the flows whose handlers still
// run, without waiting for the handlers; Close waits. A gateway that stops
// aborts its flows while its rules still bring the clients' packets here: a
// flow closed after the rules are gone ends with a FIN (a cut-off download
// would look complete), and the client's answers to it, routed past the
// socket, are dropped, so the socket lingers, retrying its FIN. (Flows a
// handler went on relaying without its goroutine are the handler's to end:
// the engine's AbortFlows.)
func (l *TCPListener) Abort() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil
	}
	l.closed = true
	err := l.ln.Close()
	for c := range l.conns {
		reset(c)
	}
	return err
}

// Close is Abort, then waits for the handlers to return.
func (l *TCPListener) Close() error {
	err := l.Abort()
	l.wg.Wait()
	return err
}

// reset closes c with a reset (RST) rather than a FIN when it is a TCP
// connection (SO_LINGER 0): the peer learns at once that the stream was cut,
// and no socket stays behind in the kernel.
func reset(c net.Conn) error {
	if tc, ok := c.(interface{ SetLinger(int) error }); ok {
		_ = tc.SetLinger(0)
	}
	return c.Close()
}
