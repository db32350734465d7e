package tsock

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strconv"

	"golang.org/x/sys/unix"
)

// ReplyOptions tune ListenReply; the zero value makes a transparent socket.
type ReplyOptions struct {
	// Plain leaves IP_TRANSPARENT out, for a process without CAP_NET_ADMIN:
	// from must then be one of the host's addresses.
	Plain bool
	// RcvBuf, when positive, sets SO_RCVBUF (best effort). A reply socket
	// only sends; a small receive buffer bounds what stray datagrams to its
	// address can hold.
	RcvBuf int
}

// ListenReply opens a UDP socket bound to from, in the calling thread's
// network namespace (run it in Netns.Do to choose another), for sending
// replies that must come from from, typically a remote host's address: the
// original destination of a diverted datagram. IP_TRANSPARENT lets it bind
// (and send from) an address that is not the host's; SO_REUSEADDR lets it
// share from with other sockets bound there (other reply sockets, a local
// resolver).
//
// The socket is left unconnected: send with WriteToUDPAddrPort. Connected,
// it would be the established socket that the tproxy lookup prefers for the
// client's next datagram to from, which would then miss the listener.
func ListenReply(from netip.AddrPort, o ReplyOptions) (*net.UDPConn, error) {
	network := "udp4"
	if from.Addr().Is6() {
		network = "udp6"
	}
	lc := net.ListenConfig{Control: Control(func(fd int) error {
		if !o.Plain {
			if err := SetTransparent(fd); err != nil {
				return err
			}
		}
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
			return fmt.Errorf("set SO_REUSEADDR: %w", err)
		}
		if o.RcvBuf > 0 {
			_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, o.RcvBuf)
		}
		return nil
	})}
	pc, err := lc.ListenPacket(context.Background(), network, from.String())
	if err != nil {
		return nil, err
	}
	return pc.(*net.UDPConn), nil
}

// TryBind binds a plain (not transparent) UDP socket to a, port 0, in the
// calling thread's network namespace, closes it and returns the error of
// socket(2) or bind(2). Binding succeeds only for an address of this host
// (or for any with net.ipv4.ip_nonlocal_bind=1); EADDRNOTAVAIL says a is not
// one. Port 0 never conflicts with a bound socket.
func TryBind(a netip.Addr) error {
	var family int
	var sa unix.Sockaddr
	if a.Is4() {
		family, sa = unix.AF_INET, &unix.SockaddrInet4{Addr: a.As4()}
	} else {
		family, sa = unix.AF_INET6, &unix.SockaddrInet6{Addr: a.As16(), ZoneId: ZoneID(a)}
	}
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
