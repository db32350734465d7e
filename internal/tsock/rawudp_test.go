package tsock

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tpgw/tpgw/internal/testenv"
	"github.com/tpgw/tpgw/internal/testnet"
)

// TestAppendUDPPacket checks the headers and checksums of built packets, for
// both families and odd and even payload lengths: a checksum is right when
// the one's complement sum over what it covers, itself included, is 0xffff.
func TestAppendUDPPacket(t *testing.T) {
	for _, c := range []struct{ src, dst string }{
		{"192.168.77.1:53", "192.168.77.2:40000"},
		{"[fd77::1]:53", "[fd77::2]:40000"},
	} {
		src, dst := netip.MustParseAddrPort(c.src), netip.MustParseAddrPort(c.dst)
		for _, payload := range [][]byte{[]byte("even"), []byte("odd"), {}, bytes.Repeat([]byte{0xff}, 513)} {
			p := AppendUDPPacket([]byte("prefix"), payload, src, dst)
			if string(p[:6]) != "prefix" {
				t.Fatalf("%s: the prefix was overwritten", c.src)
			}
			p = p[6:]
			var pseudo uint32
			var udp []byte
			if src.Addr().Is4() {
				ip := p[:ipv4HeaderLen]
				if ip[0] != 0x45 || ip[9] != 17 || int(binary.BigEndian.Uint16(ip[2:])) != len(p) || ip[8] == 0 {
					t.Fatalf("%s: IPv4 header % x", c.src, ip)
				}
				if got := fold(sum(0, ip)); got != 0xffff {
					t.Errorf("%s: IPv4 header checksum: sum %#x", c.src, got)
				}
				if netip.AddrFrom4([4]byte(ip[12:16])) != src.Addr() || netip.AddrFrom4([4]byte(ip[16:20])) != dst.Addr() {
					t.Errorf("%s: IPv4 addresses % x", c.src, ip[12:20])
				}
				pseudo = sum(0, ip[12:20])
				udp = p[ipv4HeaderLen:]
			} else {
				ip := p[:ipv6HeaderLen]
				if ip[0]>>4 != 6 || ip[6] != 17 || ip[7] == 0 || int(binary.BigEndian.Uint16(ip[4:])) != len(p)-ipv6HeaderLen {
					t.Fatalf("%s: IPv6 header % x", c.src, ip)
				}
				if netip.AddrFrom16([16]byte(ip[8:24])) != src.Addr() || netip.AddrFrom16([16]byte(ip[24:40])) != dst.Addr() {
					t.Errorf("%s: IPv6 addresses % x", c.src, ip[8:40])
				}
				pseudo = sum(0, ip[8:40])
				udp = p[ipv6HeaderLen:]
			}
			if binary.BigEndian.Uint16(udp) != src.Port() || binary.BigEndian.Uint16(udp[2:]) != dst.Port() ||
				int(binary.BigEndian.Uint16(udp[4:])) != len(udp) || !bytes.Equal(udp[8:], payload) {
				t.Fatalf("%s: UDP header and payload % x", c.src, udp)
			}
			if binary.BigEndian.Uint16(udp[6:]) == 0 {
				t.Errorf("%s: UDP checksum 0 (none)", c.src)
			}
			if got := fold(sum(pseudo+17+uint32(len(udp)), udp)); got != 0xffff {
				t.Errorf("%s, %d bytes: UDP checksum: sum %#x", c.src, len(payload), got)
			}
		}
	}
}

// TestRawUDPSend sends from an address and port another socket is bound to
// (as dnsmasq on the router's :53) to a real socket, over loopback for both
// families: the datagram arrives with that source, and a datagram sent to
// the bound socket meanwhile still reaches it.
func TestRawUDPSend(t *testing.T) {
	testenv.RequireRoot(t)
	r := NewRawUDP()
	defer r.Close()
	for _, c := range []struct{ network, from, to string }{
		{"udp4", "127.0.0.2:0", "127.0.0.1:0"},
		{"udp6", "[::1]:0", "[::1]:0"},
	} {
		// The socket that owns the source address and port.
		owner, err := net.ListenUDP(c.network, net.UDPAddrFromAddrPort(netip.MustParseAddrPort(c.from)))
		if err != nil {
			t.Fatal(err)
		}
		defer owner.Close()
		client, err := net.ListenUDP(c.network, net.UDPAddrFromAddrPort(netip.MustParseAddrPort(c.to)))
		if err != nil {
			t.Fatal(err)
		}
		defer client.Close()
		src := owner.LocalAddr().(*net.UDPAddr).AddrPort()
		dst := client.LocalAddr().(*net.UDPAddr).AddrPort()

		if err := r.Send([]byte("answer"), src, dst); err != nil {
			t.Fatalf("%s: Send: %v", c.network, err)
		}
		client.SetReadDeadline(time.Now().Add(2 * time.Second))
		buf := make([]byte, 64)
		n, from, err := client.ReadFromUDPAddrPort(buf)
		if err != nil || string(buf[:n]) != "answer" || from != src {
			t.Fatalf("%s: received %q from %v (%v); want \"answer\" from %v", c.network, buf[:n], from, err, src)
		}
		// The owner still gets what is sent to it.
		if _, err := client.WriteToUDPAddrPort([]byte("query"), src); err != nil {
			t.Fatal(err)
		}
		owner.SetReadDeadline(time.Now().Add(2 * time.Second))
		if n, _, err := owner.ReadFromUDPAddrPort(buf); err != nil || string(buf[:n]) != "query" {
			t.Fatalf("%s: the owner of %v received %q, %v", c.network, src, buf[:n], err)
		}
	}
	if err := r.Send([]byte("x"), netip.MustParseAddrPort("127.0.0.1:53"), netip.MustParseAddrPort("[::1]:53")); err == nil {
		t.Error("Send with mixed families: no error")
	}
	r.Close()
	if err := r.Send([]byte("x"), netip.MustParseAddrPort("127.0.0.1:53"), netip.MustParseAddrPort("127.0.0.1:54")); err != ErrRawClosed {
		t.Errorf("Send after Close: %v, want ErrRawClosed", err)
	}
}

// TestOpenRawUDP opens a RawUDP per family in a gateway namespace and sends
// from the test's own thread (another namespace), from a remote address and
// a port that a plain socket of the gateway holds on every address, to a
// client across the gateway's LAN: the datagrams arrive with that source.
// A RawUDP of one family refuses the other instead of making a socket where
// Send runs.
func TestOpenRawUDP(t *testing.T) {
	tp := testnet.New(t)
	for _, c := range []struct {
		network      string
		from, client netip.Addr
	}{
		{"udp4", tp.UpstreamIP, tp.ClientIP},
		{"udp6", tp.UpstreamIP6, tp.ClientIP6},
	} {
		v4 := c.network == "udp4"
		var r *RawUDP
		var holder *net.UDPConn
		if err := tp.Gateway.Do(func() (err error) {
			if holder, err = net.ListenUDP(c.network, nil); err != nil {
				return err
			}
			r, err = OpenRawUDP(v4)
			return err
		}); err != nil {
			t.Fatalf("%s: %v", c.network, err)
		}
		defer holder.Close()
		defer r.Close()
		var client *net.UDPConn
		if err := tp.Client.Do(func() (err error) {
			client, err = net.ListenUDP(c.network, &net.UDPAddr{IP: c.client.AsSlice()})
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer client.Close()
		src := netip.AddrPortFrom(c.from, holder.LocalAddr().(*net.UDPAddr).AddrPort().Port())
		dst := client.LocalAddr().(*net.UDPAddr).AddrPort()

		if err := r.Send([]byte("reply"), src, dst); err != nil {
			t.Fatalf("%s: Send: %v", c.network, err)
		}
		client.SetReadDeadline(time.Now().Add(2 * time.Second))
		buf := make([]byte, 64)
		n, from, err := client.ReadFromUDPAddrPort(buf)
		if err != nil || string(buf[:n]) != "reply" || from != src {
			t.Fatalf("%s: received %q from %v (%v); want \"reply\" from %v", c.network, buf[:n], from, err, src)
		}
		other := netip.MustParseAddrPort("[fd77::1]:53")
		if !v4 {
			other = netip.MustParseAddrPort("192.168.77.1:53")
		}
		if err := r.Send([]byte("x"), other, other); !errors.Is(err, unix.EAFNOSUPPORT) {
			t.Errorf("%s: Send of the other family: %v, want EAFNOSUPPORT", c.network, err)
		}
		r.Close()
		if err := r.Send([]byte("x"), src, dst); err != ErrRawClosed {
			t.Errorf("%s: Send after Close: %v, want ErrRawClosed", c.network, err)
		}
	}
}

// TestChecksum: RFC 1071's worked example (sum ddf2, so checksum 220d), an
// odd length, and a message that holds its own checksum.
func TestChecksum(t *testing.T) {
	if got := Checksum([]byte{0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7}); got != 0x220d {
		t.Errorf("RFC 1071 example: %#04x, want 0x220d", got)
	}
	if got := Checksum([]byte{0x01}); got != ^uint16(0x0100) {
		t.Errorf("odd length: %#04x, want %#04x", got, ^uint16(0x0100))
	}
	msg := []byte{8, 0, 0, 0, 0x12, 0x34, 0, 7, 'x'}
	c := Checksum(msg)
	msg[2], msg[3] = byte(c>>8), byte(c)
	if got := Checksum(msg); got != 0 {
		t.Errorf("over a message holding its checksum: %#04x, want 0", got)
	}
}
