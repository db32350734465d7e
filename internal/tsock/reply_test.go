package tsock

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// pollerFds returns the descriptors registered with the process's epoll
// instances (the Go runtime's poller is one), from /proc/self/fdinfo.
func pollerFds(t *testing.T) map[int]bool {
	t.Helper()
	links, err := filepath.Glob("/proc/self/fd/*")
	if err != nil {
		t.Fatal(err)
	}
	fds := map[int]bool{}
	epolls := 0
	for _, l := range links {
		target, err := os.Readlink(l)
		if err != nil || target != "anon_inode:[eventpoll]" {
			continue
		}
		epolls++
		f, err := os.Open("/proc/self/fdinfo/" + filepath.Base(l))
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			// "tfd:        7 events:       19 data: ..."
			fields := strings.Fields(sc.Text())
			if len(fields) >= 2 && fields[0] == "tfd:" {
				if n, err := strconv.Atoi(fields[1]); err == nil {
					fds[n] = true
				}
			}
		}
		f.Close()
	}
	if epolls == 0 {
		t.Fatal("no epoll instance in /proc/self/fd: the runtime's poller should have one once a socket is open")
	}
	return fds
}

// A reply socket sends from its address, one datagram or a batch, and is
// never registered with the runtime's poller: the kernel would otherwise
// wake the poller's thread for room in its send buffer after every
// datagram, which nothing waits for (doc.go, "Sockets that only send").
func TestReplySocket(t *testing.T) {
	rcv, to := loopbackReceiver(t)

	rs, err := OpenReply(netip.MustParseAddrPort("127.0.0.1:0"), ReplyOptions{Plain: true, RcvBuf: 4096})
	if err != nil {
		t.Fatal(err)
	}
	from, err := rs.LocalAddr()
	if err != nil || from.Addr() != netip.MustParseAddr("127.0.0.1") || from.Port() == 0 {
		t.Fatalf("LocalAddr = %v, %v; want 127.0.0.1 and a port", from, err)
	}

	registered := pollerFds(t)
	if !registered[netFD(t, rcv)] {
		t.Fatal("the check is blind: a net.UDPConn's socket is not among the poller's descriptors")
	}
	if registered[rs.fd] {
		t.Fatalf("reply socket fd %d is registered with an epoll instance", rs.fd)
	}

	if n, err := rs.WriteToUDPAddrPort([]byte("one"), to); n != 3 || err != nil {
		t.Fatalf("WriteToUDPAddrPort = %d, %v", n, err)
	}
	w := NewBatchWriter(4, 0)
	bufs := [][]byte{[]byte("two"), []byte("three"), []byte("four")}
	for _, b := range bufs {
		if !w.Add(b, to, nil, rs.V6()) {
			t.Fatal("Add refused a datagram")
		}
	}
	if err := rs.Flush(w); err != nil || w.Len() != 0 {
		t.Fatalf("Flush = %v, %d left", err, w.Len())
	}
	if err := rcv.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	for _, want := range []string{"one", "two", "three", "four"} {
		n, src, err := rcv.ReadFromUDPAddrPort(buf)
		if err != nil {
			t.Fatalf("reading %q: %v", want, err)
		}
		if string(buf[:n]) != want || src != from {
			t.Fatalf("got %q from %v, want %q from %v", buf[:n], src, want, from)
		}
	}

	// An IPv6 destination cannot leave an IPv4 socket.
	if _, err := rs.WriteToUDPAddrPort([]byte("x"), netip.MustParseAddrPort("[2001:db8::1]:53")); err == nil {
		t.Error("an IPv6 destination on an IPv4 socket was accepted")
	}

	if err := rs.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := rs.WriteToUDPAddrPort([]byte("late"), to); !errors.Is(err, net.ErrClosed) {
		t.Errorf("send after Close = %v, want net.ErrClosed", err)
	}
	w.Add([]byte("late"), to, nil, false)
	if err := rs.Flush(w); !errors.Is(err, net.ErrClosed) || w.Len() != 0 {
		t.Errorf("Flush after Close = %v with %d left, want net.ErrClosed and none", err, w.Len())
	}
	if err := rs.Close(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("second Close = %v, want net.ErrClosed", err)
	}
}

// Close waits for the sends in progress and never closes the descriptor
// under one (which could then write to a socket opened later with the same
// number); sends that start after it fail cleanly.
func TestReplySocketCloseDuringSends(t *testing.T) {
	_, to := loopbackReceiver(t)
	rs, err := OpenReply(netip.MustParseAddrPort("127.0.0.1:0"), ReplyOptions{Plain: true})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for g := range 4 {
		wg.Go(func() {
			for i := range 2000 {
				_, err := rs.WriteToUDPAddrPort(fmt.Appendf(nil, "%d/%d", g, i), to)
				if errors.Is(err, net.ErrClosed) {
					return
				}
				if err != nil {
					errs <- err
					return
				}
			}
		})
	}
	time.Sleep(time.Millisecond)
	if err := rs.Close(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("send: %v", err)
	}
}

// loopbackReceiver is a UDP socket on 127.0.0.1 that the test closes at its
// end, and its address.
func loopbackReceiver(t *testing.T) (*net.UDPConn, netip.AddrPort) {
	t.Helper()
	rcv, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rcv.Close() })
	return rcv, rcv.LocalAddr().(*net.UDPAddr).AddrPort()
}

// netFD is the descriptor of a net.UDPConn.
func netFD(t *testing.T, c *net.UDPConn) int {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	fd := -1
	if err := rc.Control(func(f uintptr) { fd = int(f) }); err != nil {
		t.Fatal(err)
	}
	return fd
}
