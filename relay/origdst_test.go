package relay

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

// cmsg builds one control message the way the kernel lays it out: header,
// data, padding to the next aligned offset.
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
	binary.NativeEndian.PutUint32(b[24:], 3) // scope id, ignored
	return b
}

func origDst4(ap string) []byte {
	return cmsg(unix.SOL_IP, unix.IP_ORIGDSTADDR, sockaddr4(netip.MustParseAddrPort(ap)))
}

func origDst6(ap string) []byte {
	return cmsg(unix.SOL_IPV6, unix.IPV6_ORIGDSTADDR, sockaddr6(netip.MustParseAddrPort(ap)))
}

func cat(bs ...[]byte) []byte {
	var out []byte
	for _, b := range bs {
		out = append(out, b...)
	}
	return out
}

func TestParseOrigDst(t *testing.T) {
	tos := cmsg(unix.SOL_IP, unix.IP_TOS, []byte{0x10})
	wrongFamily := sockaddr4(netip.MustParseAddrPort("1.2.3.4:5"))
	binary.NativeEndian.PutUint16(wrongFamily, unix.AF_INET6)
	tests := []struct {
		name string
		oob  []byte
		want string // "" = not found
	}{
		{"ipv4", origDst4("203.0.113.2:7000"), "203.0.113.2:7000"},
		{"ipv6", origDst6("[2001:db8:1::2]:53"), "[2001:db8:1::2]:53"},
		{"v4-mapped ipv6 is unmapped", origDst6("[::ffff:198.18.0.7]:443"), "198.18.0.7:443"},
		{"after another message", cat(tos, origDst4("8.8.8.8:53")), "8.8.8.8:53"},
		{"first of two", cat(origDst6("[2001:db8::1]:1"), origDst4("8.8.8.8:53")), "[2001:db8::1]:1"},
		{"port zero", origDst4("10.0.0.1:0"), "10.0.0.1:0"},
		{"empty", nil, ""},
		{"other message only", tos, ""},
		{"garbage", []byte("this is not a control message at all"), ""},
		{"header only, no data", cmsg(unix.SOL_IP, unix.IP_ORIGDSTADDR, nil), ""},
		{"truncated buffer", origDst4("1.2.3.4:5")[:cmsgHdrLen+6], ""},
		{"truncated sockaddr_in", cmsg(unix.SOL_IP, unix.IP_ORIGDSTADDR, sockaddr4(netip.MustParseAddrPort("1.2.3.4:5"))[:7]), ""},
		{"truncated sockaddr_in6", cmsg(unix.SOL_IPV6, unix.IPV6_ORIGDSTADDR, sockaddr6(netip.MustParseAddrPort("[::1]:5"))[:20]), ""},
		{"v4 message with a v6 family", cmsg(unix.SOL_IP, unix.IP_ORIGDSTADDR, wrongFamily), ""},
		{"v6 type on the v4 level", cmsg(unix.SOL_IP, unix.IPV6_ORIGDSTADDR, sockaddr6(netip.MustParseAddrPort("[::1]:5"))), ""},
		{"length below the header", func() []byte {
			b := origDst4("1.2.3.4:5")
			binary.NativeEndian.PutUint32(b, 3)
			if cmsgLenSize == 8 {
				binary.NativeEndian.PutUint64(b, 3)
			}
			return b
		}(), ""},
		{"length past the buffer", func() []byte {
			b := origDst4("1.2.3.4:5")
			if cmsgLenSize == 8 {
				binary.NativeEndian.PutUint64(b, 1<<62)
			} else {
				binary.NativeEndian.PutUint32(b, 1<<31)
			}
			return b
		}(), ""},
		{"short trailing header after a message", cat(tos, []byte{1, 2, 3}), ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := parseOrigDst(tt.oob)
			if tt.want == "" {
				if ok {
					t.Fatalf("parseOrigDst = %v, want not found", got)
				}
				return
			}
			if !ok || got != netip.MustParseAddrPort(tt.want) {
				t.Fatalf("parseOrigDst = %v, %v; want %s", got, ok, tt.want)
			}
		})
	}
}

func TestParseOrigDstDoesNotAllocate(t *testing.T) {
	oob := cat(cmsg(unix.SOL_IP, unix.IP_TOS, []byte{0}), origDst6("[2001:db8::7]:9"))
	if n := testing.AllocsPerRun(100, func() { parseOrigDst(oob) }); n != 0 {
		t.Fatalf("parseOrigDst allocates %v times per call", n)
	}
}

// FuzzParseOrigDst: whatever the bytes, parsing must not panic, and a found
// destination must be a valid, unmapped address.
func FuzzParseOrigDst(f *testing.F) {
	f.Add(origDst4("203.0.113.2:7000"))
	f.Add(origDst6("[2001:db8:1::2]:53"))
	f.Add(cat(cmsg(unix.SOL_IP, unix.IP_TOS, []byte{1}), origDst4("1.1.1.1:1")))
	f.Add(origDst6("[::ffff:1.2.3.4]:5")[:30])
	f.Add([]byte{})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0x14, 0, 0, 0})
	f.Fuzz(func(t *testing.T, oob []byte) {
		ap, ok := parseOrigDst(oob)
		if !ok {
			return
		}
		if !ap.IsValid() || ap.Addr().Is4In6() || ap.Addr().Zone() != "" {
			t.Fatalf("parseOrigDst(%x) = %v: not a valid unmapped address", oob, ap)
		}
	})
}
