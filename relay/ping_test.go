package relay

import (
	"encoding/binary"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/net/bpf"

	"github.com/tpgw/tpgw/internal/tsock"
)

var fakeRange = netip.MustParsePrefix("198.18.0.0/16")

// echoRequest is an IPv4 packet from src to dst holding an ICMP message of
// type typ (id 0x1234, sequence 7, payload "tpgw ping").
func echoRequest(src, dst string, typ uint8) []byte {
	msg := append([]byte{typ, 0, 0, 0, 0x12, 0x34, 0, 7}, "tpgw ping"...)
	binary.BigEndian.PutUint16(msg[2:4], tsock.Checksum(msg))
	h := make([]byte, 20)
	h[0] = 0x45
	binary.BigEndian.PutUint16(h[2:4], uint16(20+len(msg)))
	h[8] = 63
	h[9] = 1
	s, d := netip.MustParseAddr(src).As4(), netip.MustParseAddr(dst).As4()
	copy(h[12:16], s[:])
	copy(h[16:20], d[:])
	return append(h, msg...)
}

func TestEchoReply(t *testing.T) {
	out := make([]byte, 1500)
	req := echoRequest("192.168.77.2", "198.18.0.5", icmpEchoRequest)
	to, reply := echoReply(req, out, fakeRange)
	if reply == nil {
		t.Fatal("no reply to an echo request to a fake IP")
	}
	if to != netip.MustParseAddr("192.168.77.2") {
		t.Errorf("reply goes to %s, want the request's source", to)
	}
	if got := netip.AddrFrom4([4]byte(reply[12:16])); got != netip.MustParseAddr("198.18.0.5") {
		t.Errorf("reply comes from %s, want the fake IP", got)
	}
	if got := netip.AddrFrom4([4]byte(reply[16:20])); got != to {
		t.Errorf("reply's IP destination %s, want %s", got, to)
	}
	if reply[0] != 0x45 || reply[9] != 1 || reply[8] != 64 || int(binary.BigEndian.Uint16(reply[2:4])) != len(reply) {
		t.Errorf("bad IP header % x", reply[:20])
	}
	msg := reply[20:]
	if msg[0] != icmpEchoReply || msg[1] != 0 || tsock.Checksum(msg) != 0 {
		t.Errorf("ICMP message % x: want type 0 code 0 and a valid checksum", msg)
	}
	if string(msg[4:]) != string(req[24:]) {
		t.Errorf("id, sequence and payload % x, want the request's % x", msg[4:], req[24:])
	}

	for name, pkt := range map[string][]byte{
		"outside the range": echoRequest("192.168.77.2", "203.0.113.2", icmpEchoRequest),
		"echo reply":        echoRequest("192.168.77.2", "198.18.0.5", icmpEchoReply),
		"truncated":         req[:25],
		"bad checksum":      append(append([]byte{}, req[:len(req)-1]...), req[len(req)-1]^0xff),
		"not IPv4":          append([]byte{0x60}, req[1:]...),
	} {
		if _, r := echoReply(pkt, out, fakeRange); r != nil {
			t.Errorf("%s: answered, want no reply", name)
		}
	}
	if _, r := echoReply(req, out[:30], fakeRange); r != nil {
		t.Error("reply larger than the buffer was written")
	}
}

// TestEchoFilter runs the socket filter in x/net's BPF interpreter.
func TestEchoFilter(t *testing.T) {
	vm, err := bpf.NewVM(echoFilter(fakeRange))
	if err != nil {
		t.Fatal(err)
	}
	withOptions := echoRequest("192.168.77.2", "198.18.200.1", icmpEchoRequest)
	withOptions = append(append(append([]byte{}, withOptions[:20]...), 1, 1, 1, 0), withOptions[20:]...) // 4 bytes of NOP/EOL options
	withOptions[0] = 0x46
	for _, c := range []struct {
		name string
		pkt  []byte
		pass bool
	}{
		{"echo request to a fake IP", echoRequest("192.168.77.2", "198.18.0.5", icmpEchoRequest), true},
		{"with IP options", withOptions, true},
		{"echo request elsewhere", echoRequest("192.168.77.2", "198.19.0.5", icmpEchoRequest), false},
		{"other ICMP to a fake IP", echoRequest("192.168.77.2", "198.18.0.5", 3), false},
	} {
		n, err := vm.Run(c.pkt)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if (n > 0) != c.pass {
			t.Errorf("%s: filter returned %d, want pass=%v", c.name, n, c.pass)
		}
	}
}

func TestPingRateLimit(t *testing.T) {
	now := time.Unix(1000, 0)
	p := &PingResponder{tokens: PingBurst, now: func() time.Time { return now }}
	allowed := 0
	for range 2 * PingBurst {
		if p.allow() {
			allowed++
		}
	}
	if allowed != PingBurst {
		t.Errorf("a burst of %d: %d answered, want %d", 2*PingBurst, allowed, PingBurst)
	}
	now = now.Add(10 * time.Millisecond) // 10 more tokens at PingRate
	allowed = 0
	for range PingBurst {
		if p.allow() {
			allowed++
		}
	}
	if want := PingRate / 100; allowed != want {
		t.Errorf("10 ms later: %d answered, want %d", allowed, want)
	}
	now = now.Add(time.Hour)
	allowed = 0
	for range 2 * PingBurst {
		if p.allow() {
			allowed++
		}
	}
	if allowed != PingBurst {
		t.Errorf("after an hour: %d answered, want the burst %d", allowed, PingBurst)
	}
}
