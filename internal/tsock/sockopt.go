package tsock

import (
	"errors"
	"fmt"
	"syscall"

	"golang.org/x/sys/unix"
)

// ErrNotPermitted marks a failure to set IP_TRANSPARENT for lack of
// CAP_NET_ADMIN, which a caller may turn into a warning and a plain socket.
var ErrNotPermitted = errors.New("needs CAP_NET_ADMIN")

// SetTransparent sets IP_TRANSPARENT, and IPV6_TRANSPARENT on a v6 or
// dual-stack socket. Without it the kernel neither hands the socket packets
// that nftables' tproxy diverted to it (their destination is not local) nor
// lets it bind to, and send from, an address that is not the host's.
func SetTransparent(fd int) error {
	if err := unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_TRANSPARENT, 1); err != nil {
		if errors.Is(err, unix.EPERM) {
			return fmt.Errorf("set IP_TRANSPARENT: %w (%w)", err, ErrNotPermitted)
		}
		return fmt.Errorf("set IP_TRANSPARENT: %w", err)
	}
	// ENOPROTOOPT on a pure v4 socket: nothing to do there.
	if err := unix.SetsockoptInt(fd, unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1); err != nil && !errors.Is(err, unix.ENOPROTOOPT) {
		return fmt.Errorf("set IPV6_TRANSPARENT: %w", err)
	}
	return nil
}

// SetRecvOrigDst asks for the original destination of each datagram
// (IP_ORIGDSTADDR / IPV6_ORIGDSTADDR control messages, see ParseOrigDst).
// TPROXY delivers without rewriting the packet, so that is the address and
// port the client sent to.
func SetRecvOrigDst(fd int) error {
	// SOL_IP options apply to a dual-stack socket's IPv4 datagrams too.
	if err := unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_RECVORIGDSTADDR, 1); err != nil {
		return fmt.Errorf("set IP_RECVORIGDSTADDR: %w", err)
	}
	// ENOPROTOOPT: a pure IPv4 socket, which has no IPv6 datagrams.
	if err := unix.SetsockoptInt(fd, unix.SOL_IPV6, unix.IPV6_RECVORIGDSTADDR, 1); err != nil && !errors.Is(err, unix.ENOPROTOOPT) {
		return fmt.Errorf("set IPV6_RECVORIGDSTADDR: %w", err)
	}
	return nil
}

// Control makes a net.ListenConfig (or net.Dialer) Control function that runs
// fns, in order, on the raw socket before bind; the first error fails it.
func Control(fns ...func(fd int) error) func(network, address string, c syscall.RawConn) error {
	return func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			for _, fn := range fns {
				if serr = fn(int(fd)); serr != nil {
					return
				}
			}
		})
		if err != nil {
			return err
		}
		return serr
	}
}

// ListenerRcvBuf is the receive buffer RaiseRcvBuf gives a UDP listener that
// every client shares (the relay's, the DNS server's). The default (about
// 208 KiB: some 150 full-size datagrams, or some 270 small queries, each
// charged its whole skb) overflows within a millisecond whenever the reading
// goroutine is not scheduled at once, and the kernel drops what does not fit.
// The memory is taken only while datagrams wait.
const ListenerRcvBuf = 4 << 20

// RaiseRcvBuf sets the socket's receive buffer to ListenerRcvBuf, past
// net.core.rmem_max where allowed (SO_RCVBUFFORCE needs CAP_NET_ADMIN, which
// a transparent socket needs anyway), else as far as rmem_max permits. It
// never fails: a smaller buffer only drops sooner under load.
func RaiseRcvBuf(fd int) error {
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, ListenerRcvBuf); err != nil {
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, ListenerRcvBuf)
	}
	return nil
}

// SendQueued returns the bytes in c's send queue that its peer has not yet
// acknowledged (SIOCOUTQ on a TCP socket).
func SendQueued(c syscall.Conn) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, err
	}
	n, ierr := 0, error(nil)
	if err := rc.Control(func(fd uintptr) { n, ierr = unix.IoctlGetInt(int(fd), unix.SIOCOUTQ) }); err != nil {
		return 0, err
	}
	return n, ierr
}

// Keep-alive probes of the connections a listener accepts: Go's defaults
// (15 s idle, 15 s between probes, 9 probes), so that a client that vanished
// is noticed within about 2.5 minutes.
const (
	KeepAliveIdle     = 15 // seconds
	KeepAliveInterval = 15 // seconds
	KeepAliveCount    = 9
)

// SetKeepAlive turns keep-alive probes on with KeepAliveIdle,
// KeepAliveInterval and KeepAliveCount. Set on a listening socket, they are
// inherited by every connection it accepts (Linux copies the listener's
// socket options into each), which saves the four setsockopt calls per
// connection that Go's Accept would make (with ListenConfig.KeepAlive < 0).
func SetKeepAlive(fd int) error {
	for _, o := range []struct {
		level, opt, v int
		name          string
	}{
		{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1, "SO_KEEPALIVE"},
		{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, KeepAliveIdle, "TCP_KEEPIDLE"},
		{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, KeepAliveInterval, "TCP_KEEPINTVL"},
		{unix.IPPROTO_TCP, unix.TCP_KEEPCNT, KeepAliveCount, "TCP_KEEPCNT"},
	} {
		if err := unix.SetsockoptInt(fd, o.level, o.opt, o.v); err != nil {
			return fmt.Errorf("set %s: %w", o.name, err)
		}
	}
	return nil
}
