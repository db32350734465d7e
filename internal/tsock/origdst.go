package tsock

import (
	"encoding/binary"
	"net/netip"
	"strconv"

	"golang.org/x/sys/unix"
)

// Control message layout (struct cmsghdr): cmsg_len is a size_t (8 bytes on
// 64-bit platforms, 4 on 32-bit ones such as many OpenWrt routers), then two
// ints, level and type; each message starts at a size_t-aligned offset.
const (
	cmsgHdrLen   = unix.SizeofCmsghdr
	cmsgLenSize  = cmsgHdrLen - 8
	cmsgAlignTo  = cmsgLenSize
	sockaddr4Len = unix.SizeofSockaddrInet4 // family, port, addr[4], zero[8]
	sockaddr6Len = unix.SizeofSockaddrInet6 // family, port, flowinfo, addr[16], scope_id
)

func cmsgAlign(n int) int { return (n + cmsgAlignTo - 1) &^ (cmsgAlignTo - 1) }

// ParseOrigDst finds the original destination in the control messages of a
// datagram read from a socket with SetRecvOrigDst: SOL_IP/IP_ORIGDSTADDR
// carries a sockaddr_in, SOL_IPV6/IPV6_ORIGDSTADDR a sockaddr_in6. The first
// one found wins; ok is false when there is none.
//
// The bytes come from the kernel but are treated as untrusted all the same:
// anything short, oddly sized or of the wrong family is skipped, never
// indexed past its end, and a length that cannot be framed ends the search. A
// v4-mapped IPv6 destination is unmapped. A scope id (link-local
// destinations) becomes a numeric zone (fe80::1%2), which package net and
// ZoneID understand without an interface lookup. It does not allocate, but
// for a scope id of 100 or more.
func ParseOrigDst(oob []byte) (ap netip.AddrPort, ok bool) {
	for len(oob) >= cmsgHdrLen {
		msgLen, level, typ := cmsgHeader(oob)
		if msgLen < cmsgHdrLen || msgLen > uint64(len(oob)) {
			return netip.AddrPort{}, false // malformed: the rest cannot be framed
		}
		data := oob[cmsgHdrLen:msgLen]
		switch {
		case level == unix.SOL_IP && typ == unix.IP_ORIGDSTADDR:
			if ap, ok := parseSockaddr4(data); ok {
				return ap, true
			}
		case level == unix.SOL_IPV6 && typ == unix.IPV6_ORIGDSTADDR:
			if ap, ok := parseSockaddr6(data); ok {
				return ap, true
			}
		}
		next := cmsgAlign(int(msgLen))
		if next >= len(oob) {
			return netip.AddrPort{}, false
		}
		oob = oob[next:]
	}
	return netip.AddrPort{}, false
}

// cmsgHeader decodes struct cmsghdr; b holds at least cmsgHdrLen bytes.
func cmsgHeader(b []byte) (msgLen uint64, level, typ int32) {
	if cmsgLenSize == 8 {
		msgLen = binary.NativeEndian.Uint64(b)
	} else {
		msgLen = uint64(binary.NativeEndian.Uint32(b))
	}
	level = int32(binary.NativeEndian.Uint32(b[cmsgLenSize:]))
	typ = int32(binary.NativeEndian.Uint32(b[cmsgLenSize+4:]))
	return msgLen, level, typ
}

// parseSockaddr4 reads struct sockaddr_in: family, port (network order), addr.
func parseSockaddr4(b []byte) (netip.AddrPort, bool) {
	if len(b) < sockaddr4Len || binary.NativeEndian.Uint16(b) != unix.AF_INET {
		return netip.AddrPort{}, false
	}
	port := binary.BigEndian.Uint16(b[2:])
	addr := netip.AddrFrom4([4]byte(b[4:8]))
	return netip.AddrPortFrom(addr, port), true
}

// parseSockaddr6 reads struct sockaddr_in6: family, port, flowinfo, addr,
// scope_id.
func parseSockaddr6(b []byte) (netip.AddrPort, bool) {
	if len(b) < sockaddr6Len || binary.NativeEndian.Uint16(b) != unix.AF_INET6 {
		return netip.AddrPort{}, false
	}
	port := binary.BigEndian.Uint16(b[2:])
	addr := netip.AddrFrom16([16]byte(b[8:24])).Unmap()
	if scope := binary.NativeEndian.Uint32(b[24:28]); scope != 0 && addr.Is6() {
		addr = addr.WithZone(strconv.FormatUint(uint64(scope), 10))
	}
	return netip.AddrPortFrom(addr, port), true
}

// OrigDstCmsg is the control message the kernel attaches to a datagram sent
// to ap, as ParseOrigDst reads it: IP_ORIGDSTADDR for an IPv4 address,
// IPV6_ORIGDSTADDR (with ap's zone as scope id) for an IPv6 one, v4-mapped
// included. It lets tests feed a listener datagrams "diverted" to ap.
func OrigDstCmsg(ap netip.AddrPort) []byte {
	if ap.Addr().Is4() {
		return cmsg(unix.SOL_IP, unix.IP_ORIGDSTADDR, sockaddr4(ap))
	}
	return cmsg(unix.SOL_IPV6, unix.IPV6_ORIGDSTADDR, sockaddr6(ap))
}

// cmsg lays out one control message the way the kernel does: header, data,
// padding to the next aligned offset.
func cmsg(level, typ int32, data []byte) []byte {
	b := make([]byte, cmsgAlign(cmsgHdrLen+len(data)))
	if cmsgLenSize == 8 {
		binary.NativeEndian.PutUint64(b, uint64(cmsgHdrLen+len(data)))
	} else {
		binary.NativeEndian.PutUint32(b, uint32(cmsgHdrLen+len(data)))
	}
	binary.NativeEndian.PutUint32(b[cmsgLenSize:], uint32(level))
	binary.NativeEndian.PutUint32(b[cmsgLenSize+4:], uint32(typ))
	copy(b[cmsgHdrLen:], data)
	return b
}

func sockaddr4(ap netip.AddrPort) []byte {
	b := make([]byte, sockaddr4Len)
	binary.NativeEndian.PutUint16(b, unix.AF_INET)
	binary.BigEndian.PutUint16(b[2:], ap.Port())
	a := ap.Addr().As4()
	copy(b[4:], a[:])
	return b
}

func sockaddr6(ap netip.AddrPort) []byte {
	b := make([]byte, sockaddr6Len)
	binary.NativeEndian.PutUint16(b, unix.AF_INET6)
	binary.BigEndian.PutUint16(b[2:], ap.Port())
	a := ap.Addr().As16()
	copy(b[8:], a[:])
	binary.NativeEndian.PutUint32(b[24:], ZoneID(ap.Addr()))
	return b
}
