package tsock

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"sync"

	"golang.org/x/sys/unix"
)

// RawUDP sends UDP datagrams with any source address and port from raw
// sockets (IPPROTO_RAW: the IP header is ours, and such a socket receives
// nothing). A reply that must come from an address and port another socket
// of the host is bound to (a DNS reply from the router's 192.168.1.1:53,
// where dnsmasq listens) goes out without binding a socket there: one bound
// there, even for a single send, takes the datagrams that reach that address
// meanwhile (the lookup prefers the newest of equally bound sockets, and an
// address-bound one to a wildcard), and they are lost.
//
// The same goes for a reply whose source address and port a socket of the
// host holds without SO_REUSEADDR, on that address or on all of them
// (0.0.0.0:51820, a WireGuard server's): binding a reply socket there fails
// with EADDRINUSE, IP_TRANSPARENT or not, and a raw socket binds nothing.
//
// The kernel does not fragment what a raw socket sends: a packet larger than
// the MTU of the interface it leaves by fails with EMSGSIZE.
//
// It needs CAP_NET_RAW. NewRawUDP's sockets are made on first use, in the
// calling thread's network namespace; OpenRawUDP's one socket at once.
type RawUDP struct {
	mu     sync.Mutex
	fd4    int
	fd6    int
	fixed  bool // made by OpenRawUDP: Send makes no socket of its own
	closed bool
	buf    []byte
}

// NewRawUDP returns a RawUDP without sockets yet.
func NewRawUDP() *RawUDP { return &RawUDP{fd4: -1, fd6: -1} }

// OpenRawUDP returns a RawUDP with the socket of one family (IPv4 when v4)
// made now, in the calling thread's network namespace. It sends that
// family only, so Send may then run on any thread and never makes a socket
// in another namespace.
func OpenRawUDP(v4 bool) (*RawUDP, error) {
	r := NewRawUDP()
	if _, err := r.socket(v4); err != nil {
		return nil, err
	}
	r.fixed = true
	return r, nil
}

// ErrRawClosed is returned by Send after Close.
var ErrRawClosed = errors.New("tsock: raw udp: closed")

const (
	ipv4HeaderLen = 20
	ipv6HeaderLen = 40
	udpHeaderLen  = 8
	defaultTTL    = 64
)

// Send sends payload from src to dst. Both must be of one family (an IPv4
// address mapped into IPv6 counts as IPv4).
func (r *RawUDP) Send(payload []byte, src, dst netip.AddrPort) error {
	src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	if src.Addr().Is4() != dst.Addr().Is4() {
		return fmt.Errorf("tsock: raw udp: %v to %v: mixed address families", src, dst)
	}
	v4 := src.Addr().Is4()
	hl := ipv6HeaderLen
	if v4 {
		hl = ipv4HeaderLen
	}
	if len(payload) > 0xffff-hl-udpHeaderLen {
		return fmt.Errorf("tsock: raw udp: %d bytes do not fit a datagram: %w", len(payload), unix.EMSGSIZE)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return ErrRawClosed
	}
	fd, err := r.socket(v4)
	if err != nil {
		return err
	}
	r.buf = AppendUDPPacket(r.buf[:0], payload, src, dst)
	var sa unix.Sockaddr
	if v4 {
		sa = &unix.SockaddrInet4{Addr: dst.Addr().As4()}
	} else {
		sa = &unix.SockaddrInet6{Addr: dst.Addr().As16(), ZoneId: ZoneID(dst.Addr())}
	}
	if err := unix.Sendto(fd, r.buf, 0, sa); err != nil {
		return fmt.Errorf("tsock: raw udp: %v to %v: %w", src, dst, err)
	}
	return nil
}

// socket returns the family's raw socket, made on first use.
func (r *RawUDP) socket(v4 bool) (int, error) {
	p, family := &r.fd6, unix.AF_INET6
	if v4 {
		p, family = &r.fd4, unix.AF_INET
	}
	if *p >= 0 {
		return *p, nil
	}
	if r.fixed {
		return -1, fmt.Errorf("tsock: raw udp: no socket of this family: %w", unix.EAFNOSUPPORT)
	}
	// Blocking: a full send buffer waits rather than drops the reply, at
	// most sendTimeout, as on a ReplySocket (Send holds mu meanwhile).
	fd, err := unix.Socket(family, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
	if err != nil {
		return -1, fmt.Errorf("tsock: raw udp socket: %w", err)
	}
	tv := sendTimeout
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("tsock: raw udp socket: set SO_SNDTIMEO: %w", err)
	}
	*p = fd
	return fd, nil
}

// Close closes the sockets; Send fails after it.
func (r *RawUDP) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closed = true
	var errs []error
	for _, p := range []*int{&r.fd4, &r.fd6} {
		if *p >= 0 {
			errs = append(errs, unix.Close(*p))
			*p = -1
		}
	}
	return errors.Join(errs...)
}

// AppendUDPPacket appends the IP packet (IPv4 or IPv6 header, UDP header
// with its checksum, payload) of a datagram from src to dst to b. The
// addresses must be of one family, unmapped.
func AppendUDPPacket(b, payload []byte, src, dst netip.AddrPort) []byte {
	udpLen := udpHeaderLen + len(payload)
	var pseudo uint32
	if src.Addr().Is4() {
		s, d := src.Addr().As4(), dst.Addr().As4()
		var h [ipv4HeaderLen]byte
		h[0] = 0x45 // version 4, 5 words
		binary.BigEndian.PutUint16(h[2:], uint16(ipv4HeaderLen+udpLen))
		h[6] = 0x40 // don't fragment, as the kernel sets on UDP with path MTU discovery
		h[8] = defaultTTL
		h[9] = unix.IPPROTO_UDP
		copy(h[12:16], s[:])
		copy(h[16:20], d[:])
		binary.BigEndian.PutUint16(h[10:], Checksum(h[:]))
		b = append(b, h[:]...)
		pseudo = sum(sum(0, s[:]), d[:])
	} else {
		s, d := src.Addr().As16(), dst.Addr().As16()
		var h [ipv6HeaderLen]byte
		h[0] = 0x60 // version 6
		binary.BigEndian.PutUint16(h[4:], uint16(udpLen))
		h[6] = unix.IPPROTO_UDP
		h[7] = defaultTTL
		copy(h[8:24], s[:])
		copy(h[24:40], d[:])
		b = append(b, h[:]...)
		pseudo = sum(sum(0, s[:]), d[:])
	}
	pseudo += unix.IPPROTO_UDP + uint32(udpLen)
	u := len(b)
	b = binary.BigEndian.AppendUint16(b, src.Port())
	b = binary.BigEndian.AppendUint16(b, dst.Port())
	b = binary.BigEndian.AppendUint16(b, uint16(udpLen))
	b = append(b, 0, 0)
	b = append(b, payload...)
	c := ^uint16(fold(sum(pseudo, b[u:])))
	if c == 0 {
		c = 0xffff // 0 means "no checksum" in UDP
	}
	binary.BigEndian.PutUint16(b[u+6:], c)
	return b
}

// Checksum is the Internet checksum (RFC 1071) of b; over a message that
// holds its own checksum it is 0.
func Checksum(b []byte) uint16 { return ^uint16(fold(sum(0, b))) }

// sum adds b to the one's complement sum acc as big-endian 16-bit words
// (an odd last byte padded with zero).
func sum(acc uint32, b []byte) uint32 {
	for len(b) >= 2 {
		acc += uint32(binary.BigEndian.Uint16(b))
		b = b[2:]
		if acc > 0xffff0000 {
			acc = fold(acc)
		}
	}
	if len(b) == 1 {
		acc += uint32(b[0]) << 8
	}
	return acc
}

// fold reduces a sum to 16 bits with end-around carry.
func fold(acc uint32) uint32 {
	for acc > 0xffff {
		acc = acc>>16 + acc&0xffff
	}
	return acc
}
