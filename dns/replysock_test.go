package dns

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tpgw/tpgw/internal/testenv"
	"github.com/tpgw/tpgw/internal/tsock"
)

// replyTarget is a UDP socket on loopback that reports where datagrams came from.
func replyTarget(t testing.TB) (*net.UDPConn, netip.AddrPort) {
	t.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, c.LocalAddr().(*net.UDPAddr).AddrPort()
}

// freeLoopbackPort returns a UDP port on 127.0.0.2 that is free right now.
func freeLoopbackPort(t testing.TB) netip.AddrPort {
	t.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 2)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return c.LocalAddr().(*net.UDPAddr).AddrPort()
}

func newTestReplySockets(t testing.TB) *replySockets {
	home, err := tsock.CurrentNetns()
	if err != nil {
		t.Fatal(err)
	}
	r := newReplySockets(home, os.Geteuid() == 0, testLogger(t))
	t.Cleanup(func() { r.close() })
	return r
}

// Replies leave from the requested source; one socket per source is reused
// by concurrent senders, and the cache stays within its bound.
func TestReplySockets(t *testing.T) {
	r := newTestReplySockets(t)
	// Loopback addresses are local, and replies from local addresses are
	// never cached: pretend they are not, to test the cache.
	r.isLocal = func(netip.Addr) bool { return false }
	target, to := replyTarget(t)
	from := freeLoopbackPort(t)

	var wg sync.WaitGroup
	for range 20 {
		wg.Go(func() {
			if err := r.send([]byte("hi"), to, from); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	buf := make([]byte, 16)
	for range 20 {
		n, src, err := target.ReadFromUDPAddrPort(buf)
		if err != nil {
			t.Fatal(err)
		}
		if src != from || string(buf[:n]) != "hi" {
			t.Fatalf("got %q from %v, want %q from %v", buf[:n], src, "hi", from)
		}
	}
	r.mu.Lock()
	if len(r.socks) != 1 || r.socks[from].users != 0 {
		t.Errorf("cache after 20 replies from one source: %d sockets (want 1), users %d", len(r.socks), r.socks[from].users)
	}
	r.mu.Unlock()

	// More sources than the cache holds: the least recently used make room.
	for range maxReplySockets + 5 {
		if err := r.send([]byte("x"), to, freeLoopbackPort(t)); err != nil {
			t.Fatal(err)
		}
	}
	r.mu.Lock()
	if n := len(r.socks); n > maxReplySockets {
		t.Errorf("cache holds %d sockets, over %d", n, maxReplySockets)
	}
	r.mu.Unlock()
	if err := r.close(); err != nil {
		t.Fatal(err)
	}
	if err := r.send([]byte("x"), to, from); err == nil {
		t.Error("send after close succeeded")
	}
}

// TestReplySocketsLocalAddress: replies from one of the host's own addresses,
// where a resolver listens (as dnsmasq on the router's :53), arrive from
// that address and port, nothing is cached for it, and the resolver gets
// every datagram sent to it meanwhile. With a socket bound there for each
// reply (before), the datagrams that came during a send went to that
// socket, which closed unread.
func TestReplySocketsLocalAddress(t *testing.T) {
	testenv.RequireRoot(t) // the raw socket (CAP_NET_RAW)
	if !isLocalAddr(netip.MustParseAddr("127.0.0.2")) || isLocalAddr(netip.MustParseAddr("192.0.2.1")) {
		t.Fatal("isLocalAddr: 127.0.0.2 must be local, 192.0.2.1 not")
	}
	r := newTestReplySockets(t)
	target, to := replyTarget(t)
	// The resolver, bound with SO_REUSEADDR as dnsmasq is.
	lc := net.ListenConfig{Control: tsock.Control(func(fd int) error {
		return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
	})}
	pc, err := lc.ListenPacket(context.Background(), "udp4", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	resolver := pc.(*net.UDPConn)
	defer resolver.Close()
	from := resolver.LocalAddr().(*net.UDPAddr).AddrPort()
	asker, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(from))
	if err != nil {
		t.Fatal(err)
	}
	defer asker.Close()

	// Both receivers read while the sends go on, with buffers that hold
	// every datagram: a loss is a datagram taken by another socket.
	const n = 2000
	for _, c := range []*net.UDPConn{target, resolver} {
		rc, err := c.SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		rc.Control(func(fd uintptr) { tsock.RaiseRcvBuf(int(fd)) })
	}
	recv := func(conn *net.UDPConn, want string, wantSrc netip.AddrPort) <-chan error {
		done := make(chan error, 1)
		go func() {
			buf := make([]byte, 16)
			conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			for i := range n {
				k, src, err := conn.ReadFromUDPAddrPort(buf)
				if err != nil {
					done <- fmt.Errorf("received %d of %d datagrams: %w", i, n, err)
					return
				}
				if src != wantSrc || string(buf[:k]) != want {
					done <- fmt.Errorf("received %q from %v, want %q from %v", buf[:k], src, want, wantSrc)
					return
				}
			}
			done <- nil
		}()
		return done
	}
	client := recv(target, "reply", from)
	server := recv(resolver, "query", asker.LocalAddr().(*net.UDPAddr).AddrPort())
	go func() {
		for range n {
			if err := r.send([]byte("reply"), to, from); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	for range n {
		if _, err := asker.Write([]byte("query")); err != nil {
			t.Fatal(err)
		}
	}
	if err := <-client; err != nil {
		t.Errorf("client: %v", err)
	}
	if err := <-server; err != nil {
		t.Errorf("resolver (while replies left from its address): %v", err)
	}
	r.mu.Lock()
	cached := len(r.socks)
	r.mu.Unlock()
	if cached != 0 {
		t.Errorf("%d sockets cached after replies from a local address, want 0", cached)
	}
}

// failingRaw is a raw sender whose sends fail with err: EPERM without
// CAP_NET_RAW, EMSGSIZE for a datagram over the link's MTU.
type failingRaw struct {
	sends *int
	err   error
}

func (d failingRaw) Send([]byte, netip.AddrPort, netip.AddrPort) error {
	*d.sends++
	return fmt.Errorf("tsock: raw udp: %w", d.err)
}
func (failingRaw) Close() error { return nil }

// TestReplySocketsLocalWithoutRaw: when the raw socket cannot send (no
// CAP_NET_RAW; a reply over the link's MTU, which only a UDP socket's send
// fragments), replies from a local address still arrive from it (a socket
// bound there for each reply), and nothing stays bound there. Without the
// capability the raw socket is tried once; a reply too large for it does
// not stop the next one from using it.
func TestReplySocketsLocalWithoutRaw(t *testing.T) {
	for _, c := range []struct {
		err       error
		wantTries int
	}{{unix.EPERM, 1}, {unix.EMSGSIZE, 3}} {
		r := newTestReplySockets(t)
		var tries int
		r.raw = failingRaw{&tries, c.err}
		target, to := replyTarget(t)
		from := freeLoopbackPort(t)
		buf := make([]byte, 16)
		for range 3 {
			if err := r.send([]byte("hi"), to, from); err != nil {
				t.Fatal(err)
			}
			target.SetReadDeadline(time.Now().Add(2 * time.Second))
			if n, src, err := target.ReadFromUDPAddrPort(buf); err != nil || src != from || string(buf[:n]) != "hi" {
				t.Fatalf("%v: reply %q from %v (%v), want \"hi\" from %v", c.err, buf[:n], src, err, from)
			}
		}
		if tries != c.wantTries || r.rawDenied.Load() != (c.err == unix.EPERM) {
			t.Errorf("%v: raw socket tried %d times (denied: %v), want %d", c.err, tries, r.rawDenied.Load(), c.wantTries)
		}
		checkUnbound(t, from)
	}
}

// checkUnbound fails if a socket is left bound to from.
func checkUnbound(t *testing.T, from netip.AddrPort) {
	t.Helper()
	c, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(from))
	if err != nil {
		t.Fatalf("port still taken after the replies: %v", err)
	}
	c.Close()
}

// BenchmarkReplySocket compares a cached reply socket with one made per reply.
func BenchmarkReplySocket(b *testing.B) {
	_, to := replyTarget(b)
	payload := make([]byte, 60)
	b.Run("cached", func(b *testing.B) {
		r := newTestReplySockets(b)
		r.isLocal = func(netip.Addr) bool { return false }
		from := freeLoopbackPort(b)
		for b.Loop() {
			if err := r.send(payload, to, from); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("per-reply", func(b *testing.B) {
		// What a reply from a local address costs: loopback is local.
		r := newTestReplySockets(b)
		from := freeLoopbackPort(b)
		for b.Loop() {
			if err := r.send(payload, to, from); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkServeUDP measures queries per second over loopback: parallel
// clients, each sending one query and waiting for its answer.
func BenchmarkServeUDP(b *testing.B) {
	s := startServer(b, "127.0.0.1:0")
	req, err := query("bench.test", 1).Pack()
	if err != nil {
		b.Fatal(err)
	}
	b.SetParallelism(16)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(s.Addr()))
		if err != nil {
			b.Error(err)
			return
		}
		defer c.Close()
		buf := make([]byte, 512)
		for pb.Next() {
			if _, err := c.Write(req); err != nil {
				b.Error(err)
				return
			}
			if _, err := c.Read(buf); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "queries/s")
}
