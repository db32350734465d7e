package relay

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"

	"github.com/tpgw/tpgw/internal/tsock"
)

// A fake IP stands for a name, so no host answers a ping to it, and ICMP
// cannot be relayed through a proxy. Users and devices that check their
// connection with "ping some.name" would see every packet lost and take the
// gateway for broken. netcfg routes echo requests to the fake-ip range to the
// gateway itself (as it does with diverted TCP and UDP); the kernel answers
// those to the IPv6 range, but not those to the IPv4 range: its reply would
// come from an address that is not one of the gateway's. PingResponder
// answers those, from the fake IP, as mihomo's TUN inbound does.

// PingRate is how many echo requests per second a PingResponder answers, at
// most; the rest are dropped (the burst allows PingBurst at once).
const (
	PingRate  = 1000
	PingBurst = 100
)

const (
	icmpEchoReply   = 0
	icmpEchoRequest = 8
	pingMaxPacket   = 65535
)

// PingResponder answers IPv4 pings to the fake-ip range.
type PingResponder struct {
	conn   *net.IPConn
	raw    syscall.RawConn
	prefix atomic.Pointer[netip.Prefix]
	log    *slog.Logger

	mu      sync.Mutex // the token bucket
	tokens  float64
	last    time.Time
	now     func() time.Time
	closed  atomic.Bool
	replies atomic.Uint64
	limited atomic.Uint64
}

// ListenPing opens a raw ICMP socket in the calling goroutine's network
// namespace that sees the echo requests to prefix (an IPv4 range) the kernel
// delivers locally, and may send replies from any address (IP_TRANSPARENT).
// It needs CAP_NET_RAW and CAP_NET_ADMIN.
func ListenPing(prefix netip.Prefix, log *slog.Logger) (*PingResponder, error) {
	if !prefix.IsValid() || !prefix.Addr().Is4() {
		return nil, fmt.Errorf("relay: ping responder: %v is not an IPv4 range", prefix)
	}
	pc, err := net.ListenPacket("ip4:icmp", "0.0.0.0")
	if err != nil {
		return nil, fmt.Errorf("relay: ping responder: %w", err)
	}
	conn := pc.(*net.IPConn)
	raw, err := conn.SyscallConn()
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("relay: ping responder: %w", err)
	}
	p := &PingResponder{conn: conn, raw: raw, log: log, tokens: PingBurst, now: time.Now}
	var serr error
	err = raw.Control(func(fd uintptr) {
		// The reply carries its own IP header: its source is the fake IP.
		if serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_HDRINCL, 1); serr != nil {
			serr = fmt.Errorf("IP_HDRINCL: %w", serr)
			return
		}
		serr = tsock.SetTransparent(int(fd))
	})
	if err == nil {
		err = serr
	}
	if err == nil {
		err = p.SetPrefix(prefix)
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("relay: ping responder: %w", err)
	}
	return p, nil
}

// SetPrefix changes the range answered for (a reload that moved fake-ip-range).
func (p *PingResponder) SetPrefix(prefix netip.Prefix) error {
	if !prefix.IsValid() || !prefix.Addr().Is4() {
		return fmt.Errorf("%v is not an IPv4 range", prefix)
	}
	prefix = prefix.Masked()
	prog, err := bpf.Assemble(echoFilter(prefix))
	if err != nil {
		return err
	}
	fprog := make([]unix.SockFilter, len(prog))
	for i, ins := range prog {
		fprog[i] = unix.SockFilter{Code: ins.Op, Jt: ins.Jt, Jf: ins.Jf, K: ins.K}
	}
	var serr error
	err = p.raw.Control(func(fd uintptr) {
		// Only echo requests to the range reach the socket: a raw ICMP
		// socket is otherwise handed a copy of every ICMP packet the
		// gateway receives.
		serr = unix.SetsockoptSockFprog(int(fd), unix.SOL_SOCKET, unix.SO_ATTACH_FILTER,
			&unix.SockFprog{Len: uint16(len(fprog)), Filter: &fprog[0]})
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		return fmt.Errorf("SO_ATTACH_FILTER: %w", err)
	}
	p.prefix.Store(&prefix)
	return nil
}

// echoFilter accepts IPv4 packets to prefix whose ICMP type is echo request.
// A raw IPv4 socket's packets start at the IP header.
func echoFilter(prefix netip.Prefix) []bpf.Instruction {
	a := prefix.Addr().As4()
	mask := uint32(0)
	if bits := prefix.Bits(); bits > 0 {
		mask = ^uint32(0) << (32 - bits)
	}
	return []bpf.Instruction{
		bpf.LoadAbsolute{Off: 16, Size: 4}, // destination address
		bpf.ALUOpConstant{Op: bpf.ALUOpAnd, Val: mask},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: binary.BigEndian.Uint32(a[:]), SkipFalse: 3},
		bpf.LoadMemShift{Off: 0},          // X = the IP header's length
		bpf.LoadIndirect{Off: 0, Size: 1}, // the ICMP type
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: icmpEchoRequest, SkipTrue: 1},
		bpf.RetConstant{Val: 0},
		bpf.RetConstant{Val: pingMaxPacket},
	}
}

// Serve answers echo requests until Close; it returns nil then.
func (p *PingResponder) Serve() error {
	buf := make([]byte, pingMaxPacket)
	out := make([]byte, pingMaxPacket)
	// recvfrom on the descriptor: net.IPConn's ReadFrom strips the IP
	// header, and with it the fake IP the request was sent to.
	var n int
	var rerr error
	read := func(fd uintptr) bool {
		for {
			n, _, rerr = unix.Recvfrom(int(fd), buf, unix.MSG_DONTWAIT)
			if rerr != unix.EINTR {
				return rerr != unix.EAGAIN // EAGAIN: wait until readable
			}
		}
	}
	for {
		err := p.raw.Read(read)
		if err == nil {
			err = rerr
		}
		if err != nil {
			if p.closed.Load() || errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("relay: ping responder: %w", err)
		}
		pfx := p.prefix.Load()
		dst, reply := echoReply(buf[:n], out, *pfx)
		if reply == nil {
			continue
		}
		if !p.allow() {
			p.limited.Add(1)
			continue
		}
		if _, err := p.conn.WriteTo(reply, &net.IPAddr{IP: dst.AsSlice()}); err != nil {
			p.log.Debug("ping reply not sent", "to", dst, "err", err)
			continue
		}
		p.replies.Add(1)
	}
}

// allow takes a token from the bucket (PingRate per second, PingBurst deep).
func (p *PingResponder) allow() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := p.now()
	if !p.last.IsZero() {
		p.tokens += now.Sub(p.last).Seconds() * PingRate
		if p.tokens > PingBurst {
			p.tokens = PingBurst
		}
	}
	p.last = now
	if p.tokens < 1 {
		return false
	}
	p.tokens--
	return true
}

// Replies is the number of echo replies sent; Limited the requests dropped
// by the rate limit.
func (p *PingResponder) Replies() uint64 { return p.replies.Load() }
func (p *PingResponder) Limited() uint64 { return p.limited.Load() }

// Close stops Serve.
func (p *PingResponder) Close() error {
	p.closed.Store(true)
	return p.conn.Close()
}

// echoReply checks that pkt (an IPv4 packet, header included) is an echo
// request to prefix and writes the reply into out: an IPv4 header from the
// request's destination to its source, and the request's ICMP message with
// type echo reply. It returns the reply's destination and the reply, or nil
// when pkt is anything else. The kernel fills in the IP checksum and ID.
func echoReply(pkt, out []byte, prefix netip.Prefix) (netip.Addr, []byte) {
	if len(pkt) < 20 || pkt[0]>>4 != 4 {
		return netip.Addr{}, nil
	}
	ihl := int(pkt[0]&0x0f) * 4
	total := int(binary.BigEndian.Uint16(pkt[2:4]))
	if ihl < 20 || total < ihl+8 || total > len(pkt) || pkt[9] != unix.IPPROTO_ICMP {
		return netip.Addr{}, nil
	}
	src := netip.AddrFrom4([4]byte(pkt[12:16]))
	dst := netip.AddrFrom4([4]byte(pkt[16:20]))
	msg := pkt[ihl:total]
	if !prefix.Contains(dst) || msg[0] != icmpEchoRequest || msg[1] != 0 || tsock.Checksum(msg) != 0 {
		return netip.Addr{}, nil
	}
	n := 20 + len(msg)
	if n > len(out) {
		return netip.Addr{}, nil
	}
	h := out[:20]
	h[0] = 0x45
	h[1] = pkt[1] // TOS
	binary.BigEndian.PutUint16(h[2:4], uint16(n))
	binary.BigEndian.PutUint32(h[4:8], 0) // ID (filled in), flags, fragment offset
	h[8] = 64                             // TTL
	h[9] = unix.IPPROTO_ICMP
	binary.BigEndian.PutUint16(h[10:12], 0) // checksum (filled in)
	copy(h[12:16], pkt[16:20])
	copy(h[16:20], pkt[12:16])
	m := out[20:n]
	copy(m, msg)
	m[0] = icmpEchoReply
	binary.BigEndian.PutUint16(m[2:4], 0)
	binary.BigEndian.PutUint16(m[2:4], tsock.Checksum(m))
	return src, out[:n]
}
