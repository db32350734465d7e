package tsock

import (
	"encoding/binary"
	"net/netip"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"
)

func origDst(ap string) []byte { return OrigDstCmsg(netip.MustParseAddrPort(ap)) }

func cat(bs ...[]byte) []byte {
	var out []byte
	for _, b := range bs {
		out = append(out, b...)
	}
	return out
}

// withLen overwrites the cmsg_len of the first message.
func withLen(b []byte, n uint64) []byte {
	b = append([]byte(nil), b...)
	if cmsgLenSize == 8 {
		binary.NativeEndian.PutUint64(b, n)
	} else {
		binary.NativeEndian.PutUint32(b, uint32(n))
	}
	return b
}

func TestParseOrigDst(t *testing.T) {
	tos := cmsg(unix.SOL_IP, unix.IP_TOS, []byte{0x10})
	timestamp := cmsg(unix.SOL_SOCKET, unix.SO_TIMESTAMP, make([]byte, 16))
	wrongFamily := sockaddr4(netip.MustParseAddrPort("1.2.3.4:5"))
	binary.NativeEndian.PutUint16(wrongFamily, unix.AF_INET6)
	v4 := origDst("203.0.113.2:53")
	tests := []struct {
		name string
		oob  []byte
		want string // "" = not found
	}{
		{"ipv4", origDst("203.0.113.2:7000"), "203.0.113.2:7000"},
		{"ipv6", origDst("[2001:db8:1::2]:53"), "[2001:db8:1::2]:53"},
		{"v4-mapped ipv6 is unmapped", origDst("[::ffff:198.18.0.7]:443"), "198.18.0.7:443"},
		{"v4-mapped ipv6 drops its scope", origDst("[::ffff:192.0.2.1%3]:5353"), "192.0.2.1:5353"},
		{"link-local keeps its scope", origDst("[fe80::1%7]:53"), "[fe80::1%7]:53"},
		{"any scope id becomes a zone", origDst("[2001:db8:1::2%3]:53"), "[2001:db8:1::2%3]:53"},
		{"after another message", cat(tos, origDst("8.8.8.8:53")), "8.8.8.8:53"},
		{"after a 16-byte message", cat(timestamp, v4), "203.0.113.2:53"},
		{"first of two", cat(origDst("[2001:db8::1]:1"), origDst("8.8.8.8:53")), "[2001:db8::1]:1"},
		{"port zero", origDst("10.0.0.1:0"), "10.0.0.1:0"},
		{"empty", nil, ""},
		{"other message only", tos, ""},
		{"unrelated 16-byte message only", timestamp, ""},
		{"garbage", []byte("this is not a control message at all"), ""},
		{"header only, no data", cmsg(unix.SOL_IP, unix.IP_ORIGDSTADDR, nil), ""},
		{"header only, cut", v4[:unix.SizeofCmsghdr], ""},
		{"truncated buffer", origDst("1.2.3.4:5")[:cmsgHdrLen+6], ""},
		{"truncated padding", v4[:len(v4)-6], ""},
		{"truncated sockaddr_in", cmsg(unix.SOL_IP, unix.IP_ORIGDSTADDR, sockaddr4(netip.MustParseAddrPort("1.2.3.4:5"))[:7]), ""},
		{"truncated sockaddr_in6", cmsg(unix.SOL_IPV6, unix.IPV6_ORIGDSTADDR, sockaddr6(netip.MustParseAddrPort("[::1]:5"))[:20]), ""},
		{"v4 message with a v6 family", cmsg(unix.SOL_IP, unix.IP_ORIGDSTADDR, wrongFamily), ""},
		{"v6 type on the v4 level", cmsg(unix.SOL_IP, unix.IPV6_ORIGDSTADDR, sockaddr6(netip.MustParseAddrPort("[::1]:5"))), ""},
		{"length below the header", withLen(origDst("1.2.3.4:5"), 3), ""},
		{"length past the buffer", withLen(origDst("1.2.3.4:5"), 1<<31), ""},
		{"huge length", withLen(origDst("1.2.3.4:5"), 1<<62), ""},
		{"short trailing header after a message", cat(tos, []byte{1, 2, 3}), ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := ParseOrigDst(tt.oob)
			if tt.want == "" {
				if ok || got.IsValid() {
					t.Fatalf("ParseOrigDst = %v, %v; want not found", got, ok)
				}
				return
			}
			if !ok || got != netip.MustParseAddrPort(tt.want) {
				t.Fatalf("ParseOrigDst = %v, %v; want %s", got, ok, tt.want)
			}
		})
	}
}

func TestParseOrigDstDoesNotAllocate(t *testing.T) {
	oob := cat(cmsg(unix.SOL_IP, unix.IP_TOS, []byte{0}), origDst("[2001:db8::7]:9"))
	if n := testing.AllocsPerRun(100, func() { ParseOrigDst(oob) }); n != 0 {
		t.Fatalf("ParseOrigDst allocates %v times per call", n)
	}
}

// FuzzParseOrigDst: control messages are the kernel's, but parsing them must
// not trust lengths blindly either. Whatever the bytes, parsing must not
// panic; a found destination must be a valid, unmapped address whose zone,
// if any, is a scope id; and OrigDstCmsg must give it back.
func FuzzParseOrigDst(f *testing.F) {
	f.Add([]byte{})
	f.Add(origDst("203.0.113.2:53"))
	f.Add(origDst("[2001::2]:53"))
	f.Add(origDst("203.0.113.2:7000"))
	f.Add(origDst("[2001:db8:1::2%3]:53"))
	f.Add(cat(cmsg(unix.SOL_IP, unix.IP_TOS, []byte{1}), origDst("1.1.1.1:1")))
	f.Add(origDst("[::ffff:1.2.3.4%3]:5")[:30])
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0x14, 0, 0, 0})
	f.Fuzz(func(t *testing.T, oob []byte) {
		ap, ok := ParseOrigDst(oob)
		if !ok {
			if ap.IsValid() {
				t.Fatalf("ParseOrigDst(%x) = %v but not found", oob, ap)
			}
			return
		}
		if !ap.IsValid() || ap.Addr().Is4In6() {
			t.Fatalf("ParseOrigDst(%x) = %v: not a valid unmapped address", oob, ap)
		}
		if z := ap.Addr().Zone(); z != "" {
			if n, err := strconv.ParseUint(z, 10, 32); err != nil || n == 0 || !ap.Addr().Is6() {
				t.Fatalf("ParseOrigDst(%x) = %v: zone is not a scope id", oob, ap)
			}
		}
		if back, ok := ParseOrigDst(OrigDstCmsg(ap)); !ok || back != ap {
			t.Fatalf("ParseOrigDst(OrigDstCmsg(%v)) = %v, %v", ap, back, ok)
		}
	})
}
