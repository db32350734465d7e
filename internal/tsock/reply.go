package tsock

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ReplyOptions tune OpenReply; the zero value makes a transparent socket.
type ReplyOptions struct {
	// Plain leaves IP_TRANSPARENT out, for a process without CAP_NET_ADMIN:
	// from must then be one of the host's addresses.
	Plain bool
	// RcvBuf, when positive, sets SO_RCVBUF (best effort). A reply socket
	// only sends; a small receive buffer bounds what stray datagrams to its
	// address can hold.
	RcvBuf int
}

// ReplySocket is a UDP socket that only sends, kept out of the Go runtime's
// poller (see doc.go, "Sockets that only send"). Its methods may run from
// several goroutines at once; Close waits for the sends in progress.
type ReplySocket struct {
	mu     sync.RWMutex // held for reading by every send, for writing by Close
	fd     int
	v6     bool
	closed bool
}

// sendTimeout bounds a send that waits for room in the socket's send
// buffer (SO_SNDTIMEO): a UDP socket's buffer drains as its datagrams leave
// the host, so a wait that long means they do not, and the datagram is
// dropped with EAGAIN.
var sendTimeout = unix.Timeval{Sec: 1}

// OpenReply opens a UDP socket bound to from, in the calling thread's
// network namespace (run it in Netns.Do to choose another), for sending
// replies that must come from from, typically a remote host's address: the
// original destination of a diverted datagram. IP_TRANSPARENT lets it bind
// (and send from) an address that is not the host's; SO_REUSEADDR lets it
// share from with other sockets bound there (other reply sockets, a local
// resolver).
//
// The socket is left unconnected: a connected one would be the established
// socket that the tproxy lookup prefers for the client's next datagram to
// from, which would then miss the listener. It is never read, and never
// registered with the runtime's poller (doc.go, "Sockets that only send").
func OpenReply(from netip.AddrPort, o ReplyOptions) (*ReplySocket, error) {
	family, sa := sockaddr(from)
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socket for %v: %w", from, err)
	}
	fail := func(err error) (*ReplySocket, error) {
		unix.Close(fd)
		return nil, fmt.Errorf("socket for %v: %w", from, err)
	}
	if !o.Plain {
		if err := SetTransparent(fd); err != nil {
			return fail(err)
		}
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		return fail(fmt.Errorf("set SO_REUSEADDR: %w", err))
	}
	if o.RcvBuf > 0 {
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, o.RcvBuf)
	}
	tv := sendTimeout
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv); err != nil {
		return fail(fmt.Errorf("set SO_SNDTIMEO: %w", err))
	}
	if err := unix.Bind(fd, sa); err != nil {
		return fail(fmt.Errorf("bind: %w", err))
	}
	return &ReplySocket{fd: fd, v6: family == unix.AF_INET6}, nil
}

// sockaddr is ap as a socket address, and its family.
func sockaddr(ap netip.AddrPort) (int, unix.Sockaddr) {
	if ap.Addr().Is4() {
		return unix.AF_INET, &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}
	}
	return unix.AF_INET6, &unix.SockaddrInet6{Addr: ap.Addr().As16(), Port: int(ap.Port()), ZoneId: ZoneID(ap.Addr())}
}

// LocalAddr is the address the socket is bound to.
func (s *ReplySocket) LocalAddr() (netip.AddrPort, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return netip.AddrPort{}, net.ErrClosed
	}
	sa, err := unix.Getsockname(s.fd)
	if err != nil {
		return netip.AddrPort{}, os.NewSyscallError("getsockname", err)
	}
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port)), nil
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port)), nil
	}
	return netip.AddrPort{}, fmt.Errorf("getsockname: unexpected %T", sa)
}

// V6 reports whether the socket is AF_INET6 (IPv4 destinations are then
// written v4-mapped, see BatchWriter.Add).
func (s *ReplySocket) V6() bool { return s.v6 }

// WriteToUDPAddrPort sends b to dst with one sendto, as
// net.UDPConn.WriteToUDPAddrPort does; it returns net.ErrClosed after Close.
func (s *ReplySocket) WriteToUDPAddrPort(b []byte, dst netip.AddrPort) (int, error) {
	var sa unix.RawSockaddrInet6 // large enough for sockaddr_in too
	salen, ok := putSockaddr(&sa, dst, s.v6)
	if !ok {
		return 0, fmt.Errorf("send to %v: %w", dst, unix.EAFNOSUPPORT)
	}
	var p unsafe.Pointer
	if len(b) > 0 {
		p = unsafe.Pointer(&b[0])
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return 0, net.ErrClosed
	}
	// A raw system call that does not wait (doc.go, "Raw system calls"),
	// then, when the send buffer is full, one that waits.
	flags := uintptr(unix.MSG_DONTWAIT)
	for {
		var errno unix.Errno
		if flags != 0 {
			_, _, errno = unix.RawSyscall6(unix.SYS_SENDTO, uintptr(s.fd), uintptr(p), uintptr(len(b)), flags, uintptr(unsafe.Pointer(&sa)), uintptr(salen))
		} else {
			_, _, errno = unix.Syscall6(unix.SYS_SENDTO, uintptr(s.fd), uintptr(p), uintptr(len(b)), 0, uintptr(unsafe.Pointer(&sa)), uintptr(salen))
		}
		switch {
		case errno == 0:
			return len(b), nil
		case errno == unix.EINTR:
		case (errno == unix.EAGAIN || errno == unix.EWOULDBLOCK) && flags != 0:
			flags = 0
		default:
			return 0, &net.OpError{Op: "write", Net: "udp", Addr: net.UDPAddrFromAddrPort(dst), Err: os.NewSyscallError("sendto", errno)}
		}
	}
}

// Flush sends the datagrams queued in w with sendmmsg and empties w, as
// BatchWriter.Flush does on a socket of the poller. A first try does not
// wait (a raw system call with MSG_DONTWAIT); when the send buffer is full
// the rest goes with a system call that waits, at most sendTimeout.
func (s *ReplySocket) Flush(w *BatchWriter) error {
	if w.n == 0 {
		return nil
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		w.clear()
		return net.ErrClosed
	}
	w.off, w.err = 0, nil
	if !w.send(uintptr(s.fd), false) {
		w.send(uintptr(s.fd), true)
	}
	w.clear()
	return w.err
}

// Close closes the socket, once the sends in progress are done; later ones
// fail with net.ErrClosed.
func (s *ReplySocket) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return net.ErrClosed
	}
	s.closed = true
	return unix.Close(s.fd)
}

// TryBind binds a plain (not transparent) UDP socket to a, port 0, in the
// calling thread's network namespace, closes it and returns the error of
// socket(2) or bind(2). Binding succeeds only for an address of this host
// (or for any with net.ipv4.ip_nonlocal_bind=1); EADDRNOTAVAIL says a is not
// one. Port 0 never conflicts with a bound socket.
func TryBind(a netip.Addr) error {
	family, sa := sockaddr(netip.AddrPortFrom(a, 0))
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return unix.Bind(fd, sa)
}

// ZoneID is the interface index of a scoped IPv6 address (a numeric zone, as
// ParseOrigDst makes it, or an interface name), 0 if none.
func ZoneID(a netip.Addr) uint32 {
	z := a.Zone()
	if z == "" {
		return 0
	}
	if n, err := strconv.ParseUint(z, 10, 32); err == nil {
		return uint32(n)
	}
	if ifi, err := net.InterfaceByName(z); err == nil {
		return uint32(ifi.Index)
	}
	return 0
}
