package relay_test

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tpgw/tpgw/internal/testenv"
	"github.com/tpgw/tpgw/internal/testnet"
	"github.com/tpgw/tpgw/netcfg"
	"github.com/tpgw/tpgw/relay"
)

const (
	tproxyPort = 7893
	echoPort   = 7000 // upstream's UDP echo: relayed DIRECT by directHandler
	conePort   = 7001 // answered at once from coneFrom, not from the destination
)

// coneFrom is where fullConeHandler's replies claim to come from: a full-cone
// reply from an address the client never sent to.
var coneFrom = netip.MustParseAddrPort("203.0.113.99:5353")

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelInfo}))
}

// gateway builds a topology and installs netcfg's real TPROXY rules in the
// gateway namespace (IPv4 and IPv6, LAN interface lan0, no forwarding: what
// comes back to the client can only have come through the relay).
func gateway(t *testing.T) *testnet.Topology {
	t.Helper()
	testenv.RequireRoot(t)
	tp := testnet.New(t)
	plan, err := netcfg.BuildPlan(netcfg.Options{
		Mark: 666, Table: 666, TProxyPort: tproxyPort,
		Interfaces: []string{testnet.LANIface}, IPv6: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	var inst *netcfg.Installed
	dir := t.TempDir()
	if err := tp.Gateway.Do(func() (err error) {
		inst, err = netcfg.NewNftables(testLogger(t)).Apply(plan, dir)
		return err
	}); err != nil {
		t.Fatalf("apply netcfg plan in %s: %v", tp.Gateway.Name, err)
	}
	t.Cleanup(func() {
		if err := tp.Gateway.Do(inst.Remove); err != nil {
			t.Errorf("remove netcfg plan: %v", err)
		}
	})
	return tp
}

// serveUDP opens the relay's UDP listener inside the gateway namespace and
// serves it until the test ends.
func serveUDP(t *testing.T, tp *testnet.Topology, h relay.UDPHandler, opts relay.UDPOptions) *relay.UDPListener {
	t.Helper()
	var l *relay.UDPListener
	if err := tp.Gateway.Do(func() (err error) {
		l, err = relay.ListenUDP(fmt.Sprintf(":%d", tproxyPort), h, opts, testLogger(t))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- l.Serve() }()
	t.Cleanup(func() {
		closed := make(chan error, 1)
		go func() { closed <- l.Close() }()
		select {
		case err := <-closed:
			if err != nil {
				t.Errorf("Close: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("Close did not return within 5s")
		}
		waitServe(t, served)
	})
	return l
}

// waitServe waits (5 s at most) for a Serve that was closed to return, and
// reports its error.
func waitServe(t *testing.T, served <-chan error) {
	t.Helper()
	select {
	case err := <-served:
		if err != nil {
			t.Errorf("Serve: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Error("Serve did not return within 5s of Close")
	}
}

// directHandler is a minimal DIRECT engine: one real UDP socket per client
// in the gateway namespace sends each datagram to its original destination
// and passes every answer back through reply, from the address it came from.
type directHandler struct {
	gw *testnet.NS
	t  *testing.T

	mu    sync.Mutex
	conns map[netip.AddrPort]*net.UDPConn
	wg    sync.WaitGroup
	seen  []flow // src, dst of each datagram
}

type flow struct{ src, dst netip.AddrPort }

func newDirectHandler(t *testing.T, gw *testnet.NS) *directHandler {
	h := &directHandler{gw: gw, t: t, conns: map[netip.AddrPort]*net.UDPConn{}}
	t.Cleanup(func() {
		h.mu.Lock()
		for _, c := range h.conns {
			c.Close()
		}
		h.mu.Unlock()
		h.wg.Wait()
	})
	return h
}

func (h *directHandler) HandleUDP(src, dst netip.AddrPort, data []byte, reply func([]byte, netip.AddrPort) (int, error), release func()) {
	defer release()
	h.mu.Lock()
	h.seen = append(h.seen, flow{src, dst})
	c := h.conns[src]
	h.mu.Unlock()
	if c == nil {
		network := "udp4"
		if dst.Addr().Is6() {
			network = "udp6"
		}
		if err := h.gw.Do(func() (err error) {
			c, err = net.ListenUDP(network, nil)
			return err
		}); err != nil {
			h.t.Errorf("direct: open outbound socket: %v", err)
			return
		}
		h.mu.Lock()
		h.conns[src] = c
		h.mu.Unlock()
		h.wg.Add(1)
		go func() {
			defer h.wg.Done()
			buf := make([]byte, 64<<10)
			for {
				n, from, err := c.ReadFromUDPAddrPort(buf)
				if err != nil {
					return
				}
				if _, err := reply(buf[:n], from); err != nil {
					h.t.Errorf("direct: reply from %v to %v: %v", from, src, err)
				}
			}
		}()
	}
	if _, err := c.WriteToUDPAddrPort(data, dst); err != nil {
		h.t.Errorf("direct: send to %v: %v", dst, err)
	}
}

func (h *directHandler) flows() []flow {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]flow(nil), h.seen...)
}

// portMux sends each datagram to a handler by destination port.
type portMux map[uint16]relay.UDPHandler

func (m portMux) HandleUDP(src, dst netip.AddrPort, data []byte, reply func([]byte, netip.AddrPort) (int, error), release func()) {
	h, ok := m[dst.Port()]
	if !ok {
		release()
		return
	}
	h.HandleUDP(src, dst, data, reply, release)
}

// replyAtOnce answers every datagram itself, from `from` (zero: from the
// original destination), and counts what it handled.
type replyAtOnce struct {
	from    netip.AddrPort
	handled atomic.Int64
	errs    atomic.Int64
}

func (h *replyAtOnce) HandleUDP(_, _ netip.AddrPort, data []byte, reply func([]byte, netip.AddrPort) (int, error), release func()) {
	h.handled.Add(1)
	if _, err := reply(data, h.from); err != nil {
		h.errs.Add(1)
	}
	release()
}

// clientSocket opens an unconnected UDP socket in the client namespace.
func clientSocket(t *testing.T, tp *testnet.Topology, network string) *net.UDPConn {
	t.Helper()
	var c *net.UDPConn
	if err := tp.Client.Do(func() (err error) {
		c, err = net.ListenUDP(network, nil)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// pingPong sends count numbered datagrams to dst and returns the replies that
// came back with the same payload from wantFrom; other replies are errors.
func pingPong(t *testing.T, c *net.UDPConn, dst, wantFrom netip.AddrPort, count int) int {
	t.Helper()
	for i := range count {
		if _, err := c.WriteToUDPAddrPort(fmt.Appendf(nil, "ping %d", i), dst); err != nil {
			t.Fatalf("send to %v: %v", dst, err)
		}
		time.Sleep(time.Millisecond) // keep the datagrams apart; this is not a load test
	}
	got := map[string]bool{}
	buf := make([]byte, 2048)
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	for len(got) < count {
		n, from, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			break // deadline: whatever did not come back is lost
		}
		from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
		if from != wantFrom {
			t.Errorf("reply %q from %v, want from %v", buf[:n], from, wantFrom)
			continue
		}
		if !bytes.HasPrefix(buf[:n], []byte("ping ")) {
			t.Errorf("unexpected reply %q", buf[:n])
			continue
		}
		got[string(buf[:n])] = true
	}
	return len(got)
}

// TestUDPRelayThroughGateway sends UDP from the client to the upstream's echo
// server through netcfg's TPROXY rules and the relay's listener, with a
// DIRECT handler, over IPv4 and IPv6. The gateway does not forward, so every
// reply the client gets went through the relay and its transparent reply
// sockets.
func TestUDPRelayThroughGateway(t *testing.T) {
	tp := gateway(t)
	tp.StartUDPEcho(t, echoPort)
	direct := newDirectHandler(t, tp.Gateway)
	cone := &replyAtOnce{from: coneFrom}
	l := serveUDP(t, tp, portMux{echoPort: direct, conePort: cone}, relay.UDPOptions{})

	for _, tc := range []struct {
		name, network string
		client, up    netip.Addr
	}{
		{"ipv4", "udp4", tp.ClientIP, tp.UpstreamIP},
		{"ipv6", "udp6", tp.ClientIP6, tp.UpstreamIP6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := clientSocket(t, tp, tc.network)
			echo := netip.AddrPortFrom(tc.up, echoPort)
			if got := pingPong(t, c, echo, echo, 50); got < 48 {
				t.Fatalf("%d of 50 datagrams came back from %v, want ≥ 48", got, echo)
			}
			clientPort := c.LocalAddr().(*net.UDPAddr).AddrPort().Port()
			wantFlow := flow{netip.AddrPortFrom(tc.client, clientPort), echo}
			found := false
			for _, f := range direct.flows() {
				found = found || f == wantFlow
			}
			if !found {
				t.Errorf("handler never saw flow %v -> %v; saw %v", wantFlow.src, wantFlow.dst, direct.flows())
			}
		})
	}

	t.Run("full cone reply from another address", func(t *testing.T) {
		c := clientSocket(t, tp, "udp4")
		dst := netip.AddrPortFrom(tp.UpstreamIP, conePort)
		if got := pingPong(t, c, dst, coneFrom, 10); got < 9 {
			t.Fatalf("%d of 10 replies came back from %v, want ≥ 9", got, coneFrom)
		}
	})

	// The loop the relay must break: the engine relaying a datagram to the
	// gateway's own TPROXY port (DIRECT from the gateway itself, which
	// netcfg's input chain lets through) would get it back, again and again.
	t.Run("sent to the tproxy port directly is dropped", func(t *testing.T) {
		before := l.Stats()
		var c *net.UDPConn
		if err := tp.Gateway.Do(func() (err error) {
			c, err = net.ListenUDP("udp4", nil)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		for range 5 {
			if _, err := c.WriteToUDPAddrPort([]byte("loop?"), netip.AddrPortFrom(tp.GatewayLAN, tproxyPort)); err != nil {
				t.Fatal(err)
			}
		}
		deadline := time.Now().Add(3 * time.Second)
		for l.Stats().Dropped < before.Dropped+5 && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		after := l.Stats()
		if after.Dropped != before.Dropped+5 || after.Datagrams != before.Datagrams {
			t.Fatalf("stats before %+v, after %+v: want 5 more dropped, none handled", before, after)
		}
	})

	st := l.Stats()
	t.Logf("stats: %+v", st)
	if st.Sessions == 0 || st.ReplyErrors != 0 {
		t.Errorf("stats %+v: want open sessions and no reply errors", st)
	}
}

// openFDs counts the process's open file descriptors.
func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// TestUDPFloodBounded sends 20,000 datagrams from distinct source ports to a
// listener whose handler answers each at once: the session table never
// grows past MaxSessions, evicts instead, and after the idle timeout every
// reply socket is closed.
func TestUDPFloodBounded(t *testing.T) {
	testenv.Short(t)
	const (
		flood       = 20000
		maxSessions = 1000
		idle        = 2 * time.Second
		firstPort   = 20000
		inFlight    = 64
	)
	tp := gateway(t)
	h := &replyAtOnce{}
	baseFDs := openFDs(t)
	l := serveUDP(t, tp, h, relay.UDPOptions{MaxSessions: maxSessions, IdleTimeout: idle})

	// Watch the table while the flood runs.
	var peak atomic.Int64
	stopWatch := make(chan struct{})
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		for {
			if n := int64(l.Sessions()); n > peak.Load() {
				peak.Store(n)
			}
			select {
			case <-stopWatch:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()

	dst := unix.SockaddrInet4{Addr: tp.UpstreamIP.As4(), Port: echoPort}
	peakFDs := 0
	start := time.Now()
	err := tp.Client.Do(func() error {
		for i := range flood {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return err
			}
			err = unix.Bind(fd, &unix.SockaddrInet4{Addr: tp.ClientIP.As4(), Port: firstPort + i})
			if err == nil {
				err = unix.Sendto(fd, []byte("flood"), 0, &dst)
			}
			unix.Close(fd)
			if err != nil {
				return fmt.Errorf("datagram %d: %w", i, err)
			}
			// Keep at most inFlight datagrams queued at the listener, so that
			// they fit its receive buffer: the bound is under test, not the
			// throughput. A lost datagram only delays the sender, boundedly.
			for wait := time.Now(); int64(i+1)-int64(l.Stats().Datagrams) > inFlight && time.Since(wait) < 100*time.Millisecond; {
				time.Sleep(50 * time.Microsecond)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// Wait until the listener has read everything that reached it.
	var st relay.UDPStats
	for last, stable := uint64(0), 0; stable < 5 && time.Since(start) < 30*time.Second; {
		time.Sleep(20 * time.Millisecond)
		st = l.Stats()
		if st.Datagrams == last {
			stable++
		} else {
			last, stable = st.Datagrams, 0
		}
		peakFDs = max(peakFDs, openFDs(t))
	}
	close(stopWatch)
	<-watched
	t.Logf("flood of %d in %v: stats %+v, peak sessions %d, fds base %d peak %d", flood, time.Since(start).Round(time.Millisecond), st, peak.Load(), baseFDs, peakFDs)

	if p := peak.Load(); p > maxSessions {
		t.Errorf("sessions peaked at %d, over MaxSessions %d", p, maxSessions)
	}
	if st.Datagrams < flood*95/100 {
		t.Errorf("only %d of %d datagrams handled", st.Datagrams, flood)
	}
	if st.Opened <= maxSessions || st.Evicted == 0 || st.Opened != st.Evicted+st.Expired+uint64(st.Sessions) {
		t.Errorf("stats %+v: want more than %d opened, evictions, and opened = evicted + expired + open", st, maxSessions)
	}
	if h.errs.Load() != 0 {
		t.Errorf("%d replies failed", h.errs.Load())
	}
	if peakFDs > baseFDs+maxSessions+50 {
		t.Errorf("open fds peaked at %d, base %d: more reply sockets than MaxSessions", peakFDs, baseFDs)
	}

	deadline := time.Now().Add(idle + 5*time.Second)
	for l.Sessions() > 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if n := l.Sessions(); n != 0 {
		t.Fatalf("%d sessions still open %v after the flood (idle timeout %v)", n, idle+5*time.Second, idle)
	}
	// Expiry unlinks sessions first and closes their sockets after; give the
	// closes a moment. The listener and its namespace handle stay open.
	fds := openFDs(t)
	for deadline := time.Now().Add(2 * time.Second); fds > baseFDs+10 && time.Now().Before(deadline); fds = openFDs(t) {
		time.Sleep(20 * time.Millisecond)
	}
	if fds > baseFDs+10 {
		t.Errorf("%d fds open after every session expired, %d before the listener: reply sockets leaked", fds, baseFDs)
	}
	if st := l.Stats(); st.Expired == 0 {
		t.Errorf("stats %+v: no session expired", st)
	}
}

// Ports of remote servers that sockets of the gateway itself also hold, on
// every address and without SO_REUSEADDR: a kernel WireGuard server on the
// router (51820) while a LAN client talks to a WireGuard server elsewhere,
// or a peer whose port is one of mihomo's DIRECT sockets' ephemeral ports.
const (
	takenPort      = 51820 // the upstream's UDP echo, relayed DIRECT
	takenSizedPort = 51821 // answered at once by sizedReply
)

// holdPort binds plain UDP sockets to 0.0.0.0:port and [::]:port (IPv6 only)
// in the gateway namespace, as a WireGuard server does, for the test's
// duration.
func holdPort(t *testing.T, tp *testnet.Topology, port uint16) []*net.UDPConn {
	t.Helper()
	var conns []*net.UDPConn
	err := tp.Gateway.Do(func() error {
		for _, network := range []string{"udp4", "udp6"} {
			// Go's net sets no SO_REUSEADDR on a unicast UDP socket, and "udp6" is IPV6_V6ONLY.
			c, err := net.ListenUDP(network, &net.UDPAddr{Port: int(port)})
			if err != nil {
				return err
			}
			conns = append(conns, c)
		}
		return nil
	})
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	if err != nil {
		t.Fatalf("hold port %d in %s: %v", port, tp.Gateway.Name, err)
	}
	return conns
}

// sizedReply answers a datagram holding a decimal number n with n bytes from
// the original destination, and passes on reply's error.
type sizedReply struct{ errs chan error }

func (h *sizedReply) HandleUDP(_, _ netip.AddrPort, data []byte, reply func([]byte, netip.AddrPort) (int, error), release func()) {
	var n int
	_, err := fmt.Sscan(string(data), &n)
	release()
	if err == nil {
		_, err = reply(bytes.Repeat([]byte{'r'}, n), netip.AddrPort{})
	}
	h.errs <- err
}

// TestUDPReplyFromTakenPort relays UDP to remote servers on a port that
// sockets of the gateway hold on 0.0.0.0 and [::] without SO_REUSEADDR, where
// the kernel refuses to bind a reply socket to the original destination.
// Replies still reach the client from the original destination, for IPv4 and
// IPv6; the gateway's own sockets still get what is sent to them; a reply
// that fills the LAN's MTU arrives whole, and one byte more fails as a reply
// error (a raw socket's packet is not fragmented) instead of going out
// malformed.
func TestUDPReplyFromTakenPort(t *testing.T) {
	tp := gateway(t)
	tp.StartUDPEcho(t, takenPort)
	holders := append(holdPort(t, tp, takenPort), holdPort(t, tp, takenSizedPort)...)
	direct := newDirectHandler(t, tp.Gateway)
	sized := &sizedReply{errs: make(chan error, 1)}
	l := serveUDP(t, tp, portMux{takenPort: direct, takenSizedPort: sized}, relay.UDPOptions{})

	var mtu int
	if err := tp.Gateway.Do(func() error {
		ifi, err := net.InterfaceByName(testnet.LANIface)
		if err == nil {
			mtu = ifi.MTU
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name, network string
		up            netip.Addr
		headers       int // IP and UDP
	}{
		{"ipv4", "udp4", tp.UpstreamIP, 20 + 8},
		{"ipv6", "udp6", tp.UpstreamIP6, 40 + 8},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := clientSocket(t, tp, tc.network)
			echo := netip.AddrPortFrom(tc.up, takenPort)
			if got := pingPong(t, c, echo, echo, 20); got < 19 {
				t.Fatalf("%d of 20 datagrams came back from %v, want ≥ 19", got, echo)
			}

			dst := netip.AddrPortFrom(tc.up, takenSizedPort)
			fits := mtu - tc.headers
			for _, size := range []int{fits, fits + 1} {
				before := l.Stats().ReplyErrors
				if _, err := c.WriteToUDPAddrPort(fmt.Append(nil, size), dst); err != nil {
					t.Fatal(err)
				}
				var err error
				select {
				case err = <-sized.errs:
				case <-time.After(3 * time.Second):
					t.Fatalf("%d-byte reply: the handler was not called within 3s", size)
				}
				if size == fits {
					if err != nil {
						t.Fatalf("%d-byte reply (the LAN's MTU): %v", size, err)
					}
					buf := make([]byte, 64<<10)
					c.SetReadDeadline(time.Now().Add(3 * time.Second))
					n, from, rerr := c.ReadFromUDPAddrPort(buf)
					from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
					if rerr != nil || n != size || from != dst {
						t.Fatalf("received %d bytes from %v (%v), want %d from %v", n, from, rerr, size, dst)
					}
					continue
				}
				if !errors.Is(err, unix.EMSGSIZE) {
					t.Errorf("%d-byte reply, over the LAN's MTU %d: %v, want EMSGSIZE", size, mtu, err)
				}
				if after := l.Stats().ReplyErrors; after != before+1 {
					t.Errorf("reply errors %d, then %d: want the refused reply counted", before, after)
				}
			}
		})
	}

	// The sockets that hold the ports still get their own datagrams.
	var probe []*net.UDPConn
	if err := tp.Gateway.Do(func() error {
		for _, network := range []string{"udp4", "udp6"} {
			c, err := net.ListenUDP(network, nil)
			if err != nil {
				return err
			}
			probe = append(probe, c)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for _, c := range probe {
		defer c.Close()
	}
	for i, h := range holders {
		to := netip.MustParseAddrPort("127.0.0.1:0")
		c := probe[0]
		if i%2 == 1 {
			to, c = netip.MustParseAddrPort("[::1]:0"), probe[1]
		}
		to = netip.AddrPortFrom(to.Addr(), h.LocalAddr().(*net.UDPAddr).AddrPort().Port())
		if _, err := c.WriteToUDPAddrPort([]byte("own"), to); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 64)
		h.SetReadDeadline(time.Now().Add(2 * time.Second))
		if n, _, err := h.ReadFromUDPAddrPort(buf); err != nil || string(buf[:n]) != "own" {
			t.Errorf("the gateway's socket on %v got %q, %v; want its own datagram", to, buf[:n], err)
		}
	}

	st := l.Stats()
	t.Logf("stats: %+v", st)
	// One session per family and port: the echo's and sizedReply's.
	if st.ReplyErrors != 2 || st.RawSessions != 4 {
		t.Errorf("stats %+v: want 2 reply errors (the replies over the MTU) and 4 raw sessions", st)
	}
}
