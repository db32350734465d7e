package tsock

import (
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"
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
