package dns

import (
	"net"
	"net/netip"
	"os"
	"sync"
	"testing"

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

// A reply from one of the host's own addresses uses a one-off socket, so that
// nothing stays bound there to take datagrams meant for a local resolver.
func TestReplySocketsLocalNotCached(t *testing.T) {
	if !isLocalAddr(netip.MustParseAddr("127.0.0.2")) || isLocalAddr(netip.MustParseAddr("192.0.2.1")) {
		t.Fatal("isLocalAddr: 127.0.0.2 must be local, 192.0.2.1 not")
	}
	r := newTestReplySockets(t)
	target, to := replyTarget(t)
	from := freeLoopbackPort(t)
	if err := r.send([]byte("hi"), to, from); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 16)
	if _, src, err := target.ReadFromUDPAddrPort(buf); err != nil || src != from {
		t.Fatalf("reply from %v (%v), want from %v", src, err, from)
	}
	r.mu.Lock()
	n := len(r.socks)
	r.mu.Unlock()
	if n != 0 {
		t.Errorf("%d sockets cached after a reply from a local address, want 0", n)
	}
	// Nothing is left bound there: a resolver can take the port.
	c, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(from))
	if err != nil {
		t.Fatalf("port still taken after the reply: %v", err)
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
