package dns

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

func cmsg(level, typ int32, data []byte) []byte {
	b := make([]byte, unix.CmsgSpace(len(data)))
	if unix.SizeofCmsghdr == 16 {
		binary.NativeEndian.PutUint64(b[0:], uint64(unix.CmsgLen(len(data))))
		binary.NativeEndian.PutUint32(b[8:], uint32(level))
		binary.NativeEndian.PutUint32(b[12:], uint32(typ))
	} else {
		binary.NativeEndian.PutUint32(b[0:], uint32(unix.CmsgLen(len(data))))
		binary.NativeEndian.PutUint32(b[4:], uint32(level))
		binary.NativeEndian.PutUint32(b[8:], uint32(typ))
	}
	copy(b[unix.CmsgLen(0):], data)
	return b
}

func origDstCmsg4(ip [4]byte, port uint16) []byte {
	sa := make([]byte, unix.SizeofSockaddrInet4)
	binary.NativeEndian.PutUint16(sa, unix.AF_INET)
	binary.BigEndian.PutUint16(sa[2:], port)
	copy(sa[4:], ip[:])
	return cmsg(unix.SOL_IP, unix.IP_ORIGDSTADDR, sa)
}

func origDstCmsg6(ip [16]byte, port uint16, scope uint32) []byte {
	sa := make([]byte, unix.SizeofSockaddrInet6)
	binary.NativeEndian.PutUint16(sa, unix.AF_INET6)
	binary.BigEndian.PutUint16(sa[2:], port)
	copy(sa[8:], ip[:])
	binary.NativeEndian.PutUint32(sa[24:], scope)
	return cmsg(unix.SOL_IPV6, unix.IPV6_ORIGDSTADDR, sa)
}

func TestParseOrigDst(t *testing.T) {
	v4 := origDstCmsg4([4]byte{203, 0, 113, 2}, 53)
	v6 := origDstCmsg6(netip.MustParseAddr("2001:db8:1::2").As16(), 53, 0)
	mapped := origDstCmsg6(netip.MustParseAddr("::ffff:192.0.2.1").As16(), 5353, 0)
	linkLocal := origDstCmsg6(netip.MustParseAddr("fe80::1").As16(), 53, 7)
	other := cmsg(unix.SOL_SOCKET, unix.SO_TIMESTAMP, make([]byte, 16))
	tests := []struct {
		name string
		oob  []byte
		want string // "" = none
	}{
		{"none", nil, ""},
		{"v4", v4, "203.0.113.2:53"},
		{"v6", v6, "[2001:db8:1::2]:53"},
		{"v4-mapped v6", mapped, "192.0.2.1:5353"},
		{"link-local keeps its scope", linkLocal, "[fe80::1%7]:53"},
		{"after another cmsg", append(append([]byte(nil), other...), v4...), "203.0.113.2:53"},
		{"truncated", v4[:len(v4)-6], ""},
		{"header only", v4[:unix.SizeofCmsghdr], ""},
		{"unrelated only", other, ""},
	}
	for _, tc := range tests {
		got := parseOrigDst(tc.oob)
		if (tc.want == "" && got.IsValid()) || (tc.want != "" && got.String() != tc.want) {
			t.Errorf("%s: parseOrigDst = %v, want %q", tc.name, got, tc.want)
		}
	}
}
