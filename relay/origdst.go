package relay

import (
	"encoding/binary"
	"net/netip"

	"golang.org/x/sys/unix"
)

// Control message layout (struct cmsghdr): cmsg_len is a size_t, then two
// ints, level and type; each message starts at a size_t-aligned offset.
const (
	cmsgHdrLen   = unix.SizeofCmsghdr
	cmsgLenSize  = cmsgHdrLen - 8
	cmsgAlignTo  = cmsgLenSize
	sockaddr4Len = unix.SizeofSockaddrInet4 // family, port, addr[4], zero[8]
	sockaddr6Len = unix.SizeofSockaddrInet6 // family, port, flowinfo, addr[16], scope_id
)

func cmsgAlign(n int) int { return (n + cmsgAlignTo - 1) &^ (cmsgAlignTo - 1) }

// parseOrigDst finds the original destination in the control messages of a
// datagram read from a socket with IP_RECVORIGDSTADDR/IPV6_RECVORIGDSTADDR:
// SOL_IP/IP_ORIGDSTADDR carries a sockaddr_in, SOL_IPV6/IPV6_ORIGDSTADDR a
// sockaddr_in6. The bytes are treated as untrusted: anything short, oddly
// sized or of the wrong family is skipped, never indexed past its end. A
// v4-mapped IPv6 destination is unmapped. It does not allocate.
func parseOrigDst(oob []byte) (netip.AddrPort, bool) {
	for len(oob) >= cmsgHdrLen {
		var msgLen uint64
		if cmsgLenSize == 8 {
			msgLen = binary.NativeEndian.Uint64(oob)
		} else {
			msgLen = uint64(binary.NativeEndian.Uint32(oob))
		}
		level := int32(binary.NativeEndian.Uint32(oob[cmsgLenSize:]))
		typ := int32(binary.NativeEndian.Uint32(oob[cmsgLenSize+4:]))
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
			break
		}
		oob = oob[next:]
	}
	return netip.AddrPort{}, false
}

func parseSockaddr4(b []byte) (netip.AddrPort, bool) {
	if len(b) < sockaddr4Len || binary.NativeEndian.Uint16(b) != unix.AF_INET {
		return netip.AddrPort{}, false
	}
	port := binary.BigEndian.Uint16(b[2:])
	addr := netip.AddrFrom4([4]byte(b[4:8]))
	return netip.AddrPortFrom(addr, port), true
}

func parseSockaddr6(b []byte) (netip.AddrPort, bool) {
	if len(b) < sockaddr6Len || binary.NativeEndian.Uint16(b) != unix.AF_INET6 {
		return netip.AddrPort{}, false
	}
	port := binary.BigEndian.Uint16(b[2:])
	// The scope id (link-local destinations) is left out: naming its zone
	// would need an interface lookup per datagram, and nothing downstream
	// dials a link-local original destination.
	addr := netip.AddrFrom16([16]byte(b[8:24])).Unmap()
	return netip.AddrPortFrom(addr, port), true
}
