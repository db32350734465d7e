package tsock

import (
	"context"
	"errors"
	"net"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/tpgw/tpgw/internal/testenv"
)

// burstQueued sends n datagrams of size bytes to conn, which nobody reads,
// then reports how many of them the kernel kept in its receive buffer.
func burstQueued(t *testing.T, conn *net.UDPConn, n, size int) int {
	t.Helper()
	tx, err := net.DialUDP("udp", nil, conn.LocalAddr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Close()
	b := make([]byte, size)
	for range n {
		if _, err := tx.Write(b); err != nil {
			t.Fatal(err)
		}
	}
	rc, err := conn.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	got := 0
	var rerr error
	if err := rc.Control(func(fd uintptr) {
		for {
			if _, _, rerr = unix.Recvfrom(int(fd), b, unix.MSG_DONTWAIT); rerr != nil {
				return
			}
			got++
		}
	}); err != nil {
		t.Fatal(err)
	}
	if !errors.Is(rerr, unix.EAGAIN) {
		t.Fatalf("draining the queue: %v", rerr)
	}
	return got
}

// A burst of 3000 small datagrams (a DNS client with hundreds of queries in
// flight, several clients at once) overflows the default receive buffer
// while the reader is busy; RaiseRcvBuf keeps every one of them.
func TestRaiseRcvBufHoldsABurst(t *testing.T) {
	testenv.RequireRoot(t) // SO_RCVBUFFORCE, past net.core.rmem_max
	const n, size = 3000, 60
	listen := func(fns ...func(int) error) *net.UDPConn {
		lc := net.ListenConfig{Control: Control(fns...)}
		pc, err := lc.ListenPacket(context.Background(), "udp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { pc.Close() })
		return pc.(*net.UDPConn)
	}
	raised := listen(RaiseRcvBuf)
	rc, err := raised.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var size0 int
	var serr error
	if err := rc.Control(func(fd uintptr) { size0, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF) }); err != nil || serr != nil {
		t.Fatal(err, serr)
	}
	// The kernel doubles the value asked for, for its bookkeeping.
	if size0 < ListenerRcvBuf {
		t.Errorf("SO_RCVBUF = %d, want at least %d", size0, ListenerRcvBuf)
	}
	plain := burstQueued(t, listen(), n, size)
	if got := burstQueued(t, raised, n, size); got != n {
		t.Errorf("raised buffer kept %d of %d datagrams", got, n)
	}
	t.Logf("default buffer kept %d of %d, raised all", plain, n)
}
