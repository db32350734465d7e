package tsock

import (
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestBatchReader sends datagrams from two sockets (IPv4 and IPv6) to a
// dual-stack socket and reads them back in batches, with their sources and
// original destinations.
func TestBatchReader(t *testing.T) {
	srv, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv6unspecified})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	rc, err := srv.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = SetRecvOrigDst(int(fd)) }); err != nil || serr != nil {
		t.Fatal(err, serr)
	}
	port := srv.LocalAddr().(*net.UDPAddr).Port
	br, err := NewBatchReader(srv, 8, 2048, 128)
	if err != nil {
		t.Fatal(err)
	}
	type sent struct {
		src  netip.AddrPort
		dst  netip.AddrPort
		data string
	}
	var want []sent
	for _, ip := range []string{"127.0.0.1", "::1"} {
		dst := netip.AddrPortFrom(netip.MustParseAddr(ip), uint16(port))
		c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(dst))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		for i := range 10 {
			data := fmt.Sprintf("%s #%d", ip, i)
			if _, err := c.Write([]byte(data)); err != nil {
				t.Fatal(err)
			}
			want = append(want, sent{c.LocalAddr().(*net.UDPAddr).AddrPort(), dst, data})
		}
	}
	var got []sent
	calls := 0
	srv.SetReadDeadline(time.Now().Add(5 * time.Second))
	for len(got) < len(want) {
		msgs, err := br.Read()
		if err != nil {
			t.Fatalf("after %d datagrams: %v", len(got), err)
		}
		calls++
		if len(msgs) > 8 {
			t.Fatalf("%d messages in a batch of 8", len(msgs))
		}
		for _, m := range msgs {
			dst, ok := ParseOrigDst(m.OOB)
			if !ok {
				t.Fatalf("no original destination in %x", m.OOB)
			}
			got = append(got, sent{m.Src, dst, string(m.Data)})
		}
	}
	for i := range want {
		w := want[i]
		w.src = netip.AddrPortFrom(w.src.Addr().Unmap(), w.src.Port())
		if got[i] != w {
			t.Errorf("datagram %d: got %+v, want %+v", i, got[i], w)
		}
	}
	if calls >= len(want) {
		t.Errorf("%d datagrams took %d reads: not batched", len(want), calls)
	}
	t.Logf("%d datagrams in %d reads", len(want), calls)
}

// TestBatchWriter sends one batch from a dual-stack socket to an IPv4 and an
// IPv6 receiver, and one from an IPv4 socket with a source-address control
// message and a datagram the kernel refuses in the middle: the refusal is
// reported and the others still arrive.
func TestBatchWriter(t *testing.T) {
	recv := func(network, ip string) (*net.UDPConn, netip.AddrPort) {
		c, err := net.ListenUDP(network, &net.UDPAddr{IP: net.ParseIP(ip)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c, c.LocalAddr().(*net.UDPAddr).AddrPort()
	}
	expect := func(c *net.UDPConn, want []string, from netip.Addr) {
		t.Helper()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 100)
		for _, w := range want {
			n, src, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				t.Fatalf("waiting for %q: %v", w, err)
			}
			if string(buf[:n]) != w || (from.IsValid() && src.Addr().Unmap() != from) {
				t.Fatalf("got %q from %v, want %q from %v", buf[:n], src, w, from)
			}
		}
	}
	w := NewBatchWriter(8, 64)

	// Dual-stack socket: IPv4 destinations go out v4-mapped.
	rx4, to4 := recv("udp4", "127.0.0.1")
	rx6, to6 := recv("udp6", "::1")
	tx, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv6unspecified})
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Close()
	var want4, want6 []string
	for i := range 4 {
		m4, m6 := fmt.Sprintf("v4 %d", i), fmt.Sprintf("v6 %d", i)
		want4, want6 = append(want4, m4), append(want6, m6)
		if !w.Add([]byte(m4), to4, nil, true) || !w.Add([]byte(m6), to6, nil, true) {
			t.Fatal("Add refused a datagram to a batch with room")
		}
	}
	if w.Add([]byte("x"), to4, nil, true) {
		t.Fatal("Add took a ninth datagram into a batch of 8")
	}
	rc, _ := tx.SyscallConn()
	if err := w.Flush(rc); err != nil || w.Len() != 0 {
		t.Fatalf("Flush: %v, %d left", err, w.Len())
	}
	expect(rx4, want4, netip.Addr{})
	expect(rx6, want6, netip.Addr{})

	// IPv4 socket on 127.0.0.2, replies asked to leave from 127.0.0.1
	// (IP_PKTINFO), and a datagram to port 0 (refused: EINVAL) between.
	tx4, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 2)})
	if err != nil {
		t.Fatal(err)
	}
	defer tx4.Close()
	src := unix.PktInfo4(&unix.Inet4Pktinfo{Spec_dst: [4]byte{127, 0, 0, 1}})
	w.Add([]byte("first"), to4, src, false)
	w.Add([]byte("refused"), netip.MustParseAddrPort("127.0.0.1:0"), nil, false)
	w.Add([]byte("last"), to4, src, false)
	if w.Add([]byte("v6 on v4"), to6, nil, false) {
		t.Fatal("Add took an IPv6 destination for an IPv4 socket")
	}
	rc4, _ := tx4.SyscallConn()
	if err := w.Flush(rc4); err == nil {
		t.Fatal("Flush of a batch with a datagram to port 0 reported no error")
	}
	expect(rx4, []string{"first", "last"}, netip.MustParseAddr("127.0.0.1"))
}
