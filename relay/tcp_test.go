package relay

import (
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tpgw/tpgw/internal/testenv"
	"github.com/tpgw/tpgw/internal/tsock"
)

// TestAcceptedKeepAlive: a connection the relay's listener accepts has
// keep-alive probes on with tsock's values, inherited from the listener
// (Go's Accept, told KeepAlive < 0, sets nothing itself).
func TestAcceptedKeepAlive(t *testing.T) {
	testenv.RequireRoot(t)
	l, err := ListenTCP("127.0.0.1:0", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer l.ln.Close()
	client, err := net.DialTimeout("tcp", l.ln.Addr().String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	// The listener's own Accept, as Serve makes it.
	if err := l.ln.SetDeadline(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	c, err := l.ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range []struct {
		name       string
		level, opt int
		want       int
	}{
		{"SO_KEEPALIVE", unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
		{"TCP_KEEPIDLE", unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, tsock.KeepAliveIdle},
		{"TCP_KEEPINTVL", unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, tsock.KeepAliveInterval},
		{"TCP_KEEPCNT", unix.IPPROTO_TCP, unix.TCP_KEEPCNT, tsock.KeepAliveCount},
		// Go sets this on every connection it accepts; it is not inherited
		// from the listener's settings but checked here as the relay expects.
		{"TCP_NODELAY", unix.IPPROTO_TCP, unix.TCP_NODELAY, 1},
	} {
		var got int
		var gerr error
		if err := rc.Control(func(fd uintptr) { got, gerr = unix.GetsockoptInt(int(fd), o.level, o.opt) }); err != nil {
			t.Fatal(err)
		}
		if gerr != nil {
			t.Fatalf("%s: %v", o.name, gerr)
		}
		if got != o.want {
			t.Errorf("accepted connection: %s = %d, want %d", o.name, got, o.want)
		}
	}
}
