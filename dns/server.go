package dns

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"

	D "github.com/miekg/dns"

	"github.com/tpgw/tpgw/internal/tsock"
)

// Engine answers DNS queries: fake IPs from the engine's pool, real answers
// for fake-ip-filter names and other types. engine.Engine satisfies it.
// ServeDNS must return once ctx is done (a query's 5s bound, or Close): a
// query slot stays taken until it returns.
type Engine interface {
	ServeDNS(ctx context.Context, q *D.Msg) (*D.Msg, error)
}

// InstantEngine is an Engine that answers some queries at once: those its
// answer takes nothing but the process's memory for (a fake IP, a hosts
// entry). The UDP reader answers those itself, with the rest of their
// burst, instead of handing each to a worker to wait for the engine. Those
// that carry a new fake-ip mapping go to the reader's settler, which writes
// their mappings and sends them: a burst of new names then costs one write
// and one send, not a worker, a write and a send each, and the reader never
// waits for the disk.
type InstantEngine interface {
	Engine
	// NewInstant returns the functions of one caller that answers a burst
	// at a time. serve answers q as ServeDNS would, if it can at once; ok
	// false leaves q to ServeDNS. unsettled says the answer needs something
	// written first (a new fake-ip mapping): it may not leave before a
	// settle called after serve returned has returned. serve and settle may
	// run concurrently (the reader serves, the settler settles), each not
	// with itself.
	NewInstant() (serve func(q *D.Msg) (r *D.Msg, ok, unsettled bool), settle func())
}

// Limits of one Server. A flood of queries or connections cannot make it
// start more goroutines or hold more sockets than these.
const (
	// maxInFlight bounds queries being answered at once (UDP and TCP). When
	// all are busy the UDP reader waits, and the kernel's socket buffer
	// absorbs the burst (and drops beyond it, counted in /proc/net/snmp
	// Udp RcvbufErrors).
	maxInFlight = 1024
	// maxTCPConns bounds open TCP connections; more are closed at once.
	maxTCPConns = 256
)

// Stats counts what a Server did since Listen.
type Stats struct {
	Queries   uint64 // well-formed queries handed to the engine
	Malformed uint64 // messages dropped as garbage, or answered FORMERR/NOTIMP
	Errors    uint64 // queries answered SERVFAIL (engine error or timeout)
}

// Server is the fake-ip DNS server: one UDP socket and one TCP listener on the
// same address, both transparent when the process may make them so.
type Server struct {
	eng Engine
	log *slog.Logger

	udp  *net.UDPConn
	tcp  *net.TCPListener
	addr netip.AddrPort // the bound address (port resolved when 0 was asked)

	transparent bool
	replies     *replySockets

	ctx    context.Context // canceled by Close: in-flight queries stop
	cancel context.CancelFunc
	sem    chan struct{} // one token per query in flight
	idle   chan udpQuery // to a UDP worker waiting for a query (udpWorker)
	wg     sync.WaitGroup

	mu       sync.Mutex
	conns    map[net.Conn]struct{}
	closed   bool
	closeErr error

	queries, malformed, errs atomic.Uint64
	workers                  atomic.Uint64 // UDP workers started (udpWorker)
	workerReplies            replyCombiner // the UDP workers' answers (sendReply)
	cache                    *replyCache
	local                    *localForward // ForwardLocalNames; nil: off
}

// Listen opens the UDP and TCP sockets of the DNS server on addr.
//
// An unspecified address (0.0.0.0 or ::, as in the default dns.listen
// "0.0.0.0:1053") means every address: the sockets are bound to [::]:port
// dual-stack, so IPv6 clients are served too and IPv4 ones arrive as
// v4-mapped addresses. A host without IPv6 gets IPv4-only sockets.
//
// The sockets get IP_TRANSPARENT so that queries diverted by nftables' tproxy
// reach them. That needs CAP_NET_ADMIN; without it Listen logs a warning and
// opens plain sockets, which still answer queries sent to addr itself.
//
// Listen records the network namespace of the calling thread: reply sockets
// made later, from other goroutines, are made in it (see replySockets).
func Listen(addr netip.AddrPort, eng Engine, log *slog.Logger) (*Server, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if eng == nil {
		return nil, errors.New("dns: listen: nil engine")
	}
	log = log.With("part", "dns")
	home, err := tsock.CurrentNetns()
	if err != nil {
		// Without /proc there is no namespace to switch to; reply sockets
		// are then made wherever the creating thread is.
		log.Warn("cannot record the network namespace; reply sockets are made in the sender's", "err", err)
	}
	s := &Server{eng: eng, log: log, transparent: true, sem: make(chan struct{}, maxInFlight), idle: make(chan udpQuery), conns: map[net.Conn]struct{}{}, cache: newReplyCache()}
	if err := s.listen(addr); err != nil {
		home.Close()
		return nil, err
	}
	s.replies = newReplySockets(home, s.transparent, log)
	s.ctx, s.cancel = context.WithCancel(context.Background())
	log.Info("dns listening", "addr", s.addr, "transparent", s.transparent)
	return s, nil
}

// listen binds UDP then TCP on the same port; with port 0 the TCP listener
// takes the port the kernel gave the UDP socket (retried a few times in case
// it is taken for TCP).
func (s *Server) listen(addr netip.AddrPort) error {
	if !addr.IsValid() {
		return fmt.Errorf("dns: listen: invalid address %v", addr)
	}
	a := addr.Addr().Unmap()
	if a.IsUnspecified() {
		a = netip.IPv6Unspecified()
	}
	addr = netip.AddrPortFrom(a, addr.Port())
	var lastErr error
	for range 5 {
		u, err := s.listenUDP(addr)
		if err != nil && a == netip.IPv6Unspecified() && errors.Is(err, syscall.EAFNOSUPPORT) {
			// IPv6 disabled in the kernel: IPv4 only.
			a, addr = netip.IPv4Unspecified(), netip.AddrPortFrom(netip.IPv4Unspecified(), addr.Port())
			u, err = s.listenUDP(addr)
		}
		if err != nil {
			return err
		}
		bound := u.LocalAddr().(*net.UDPAddr).AddrPort()
		t, err := s.listenTCP(netip.AddrPortFrom(addr.Addr(), bound.Port()))
		if err != nil {
			u.Close()
			lastErr = err
			if addr.Port() == 0 && errors.Is(err, syscall.EADDRINUSE) {
				continue
			}
			return err
		}
		s.udp, s.tcp = u, t
		s.addr = netip.AddrPortFrom(bound.Addr().Unmap(), bound.Port())
		return nil
	}
	return lastErr
}

// listenConfig makes transparent sockets, or plain ones (with a warning, once)
// when the process lacks CAP_NET_ADMIN. extra runs after that, in order,
// before bind.
func (s *Server) listenConfig(extra ...func(fd int) error) *net.ListenConfig {
	transparent := func(fd int) error {
		if !s.transparent {
			return nil
		}
		if err := tsock.SetTransparent(fd); err != nil {
			if !errors.Is(err, tsock.ErrNotPermitted) {
				return err
			}
			s.transparent = false
			s.log.Warn("no CAP_NET_ADMIN: plain sockets; queries hijacked by tproxy will not reach this server", "err", err)
		}
		return nil
	}
	lc := &net.ListenConfig{Control: tsock.Control(append([]func(int) error{transparent}, extra...)...)}
	// Go ≥ 1.24 listens with MPTCP by default; tproxy does not hand MPTCP
	// to the listener reliably and DNS has no use for it.
	lc.SetMultipathTCP(false)
	return lc
}

func (s *Server) listenUDP(addr netip.AddrPort) (*net.UDPConn, error) {
	// Every client's queries queue in this one socket; a burst (a client
	// with hundreds in flight, or many clients at once) must not overflow it.
	pc, err := s.listenConfig(tsock.SetRecvOrigDst, tsock.RaiseRcvBuf).ListenPacket(context.Background(), "udp", addr.String())
	if err != nil {
		return nil, fmt.Errorf("dns: listen udp %s: %w", addr, err)
	}
	return pc.(*net.UDPConn), nil
}

func (s *Server) listenTCP(addr netip.AddrPort) (*net.TCPListener, error) {
	ln, err := s.listenConfig().Listen(context.Background(), "tcp", addr.String())
	if err != nil {
		return nil, fmt.Errorf("dns: listen tcp %s: %w", addr, err)
	}
	return ln.(*net.TCPListener), nil
}

// Addr is the bound address; its port is the real one when Listen got port 0.
func (s *Server) Addr() netip.AddrPort { return s.addr }

// Transparent reports whether the sockets have IP_TRANSPARENT, i.e. whether
// queries diverted by tproxy can reach them.
func (s *Server) Transparent() bool { return s.transparent }

// Serve answers queries over UDP and TCP until Close, then returns nil. If
// either socket fails otherwise, Serve closes the server and returns the error.
func (s *Server) Serve() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.wg.Add(3)
	s.mu.Unlock()
	errc := make(chan error, 3)
	go func() { defer s.wg.Done(); errc <- s.serveUDP() }()
	go func() { defer s.wg.Done(); errc <- s.serveTCP() }()
	go func() { defer s.wg.Done(); s.replies.expireLoop(s.ctx); errc <- nil }()
	var first error
	for range 3 {
		if err := <-errc; err != nil && first == nil {
			first = err
			s.Close()
		}
	}
	return first
}

// Close stops both listeners, closes open TCP connections, cancels queries in
// flight, waits for every goroutine of the server and closes reply sockets.
// It is safe to call more than once.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return s.closeErr
	}
	s.closed = true
	s.cancel()
	err := errors.Join(s.udp.Close(), s.tcp.Close())
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
	err = errors.Join(err, s.replies.close())
	s.mu.Lock()
	s.closeErr = err
	s.mu.Unlock()
	return err
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// FlushCache forgets the replies kept for repeated queries (at most a
// second old): after a reload they may no longer be what the engine says.
func (s *Server) FlushCache() { s.cache.flush() }

// Stats returns the counters so far.
func (s *Server) Stats() Stats {
	return Stats{Queries: s.queries.Load(), Malformed: s.malformed.Load(), Errors: s.errs.Load()}
}

// answer handles one message and counts the outcome.
func (s *Server) answer(req []byte, udp bool, origDst netip.AddrPort) []byte {
	if b := s.cache.get(req, udp); b != nil {
		s.queries.Add(1)
		return b
	}
	var rt route
	if s.local != nil {
		rt = func(ctx context.Context, q *D.Msg, req []byte) ([]byte, bool, bool) {
			return s.routeLocal(ctx, q, req, udp, origDst)
		}
	}
	gen := s.cache.generation()
	b, v, ttl := handle(s.ctx, s.eng, req, udp, rt)
	if v == answered {
		s.cache.put(req, b, udp, ttl, gen)
	}
	s.count(v)
	return b
}

// count counts a query by what became of it, for Stats.
func (s *Server) count(v verdict) {
	switch v {
	case answered:
		s.queries.Add(1)
	case failed:
		s.queries.Add(1)
		s.errs.Add(1)
	case malformed:
		s.malformed.Add(1)
	}
}

// acquire takes a query slot, or reports false once the server is closing.
func (s *Server) acquire() bool {
	select {
	case s.sem <- struct{}{}:
		return true
	case <-s.ctx.Done():
		return false
	}
}

func (s *Server) release() { <-s.sem }
