package engine

import (
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/metacubex/mihomo/common/utils"
	C "github.com/metacubex/mihomo/constant"
)

// TestUDPThroughMihomoQueues: the queues reached by name are mihomo's UDP
// workers' (set up once, 64 datagrams each), and a datagram handed to them
// is relayed DIRECT and answered through reply, from the server's address,
// its buffer released once.
func TestUDPThroughMihomoQueues(t *testing.T) {
	mihomoUDPInit.Do(mihomoInitUDP)
	if len(mihomoUDPQueues) == 0 {
		t.Fatal("mihomo's UDP queues are not set up")
	}
	for i, q := range mihomoUDPQueues {
		if cap(q) != 64 {
			t.Errorf("queue %d holds %d datagrams, want mihomo's 64", i, cap(q))
		}
	}

	echo, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := echo.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			echo.WriteToUDPAddrPort(append([]byte("echo "), buf[:n]...), from)
		}
	}()
	server := echo.LocalAddr().(*net.UDPAddr).AddrPort()

	type answer struct {
		data string
		from netip.AddrPort
	}
	answers := make(chan answer, 8)
	released := make(chan struct{}, 8)
	reply := func(b []byte, from netip.AddrPort) (int, error) {
		answers <- answer{string(b), from}
		return len(b), nil
	}
	src := netip.MustParseAddrPort("127.0.0.1:40123")
	drops := testEngine.UDPDrops()
	testEngine.HandleUDP(src, server, []byte("ping"), reply, func() { released <- struct{}{} })
	select {
	case a := <-answers:
		if a.data != "echo ping" || a.from != server {
			t.Errorf("reply %q from %v, want %q from %v", a.data, a.from, "echo ping", server)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no reply within 5s")
	}
	select {
	case <-released:
	case <-time.After(5 * time.Second):
		t.Fatal("the datagram's buffer was not released within 5s")
	}
	select {
	case <-released:
		t.Error("the datagram's buffer was released twice")
	case <-time.After(100 * time.Millisecond):
	}
	if got := testEngine.UDPDrops(); got != drops {
		t.Errorf("a datagram sent on changed the drop counts from %+v to %+v", drops, got)
	}
	// mihomo read and released it as the gate of its session expects
	// (udpgate.go): the gate mihomo's key for the session picks.
	g := &testEngine.senders[utils.MapHash(src.String())%senderGates]
	if h, r, rel := g.handed.Load(), g.read.Load(), g.released.Load(); h == 0 || r != h || rel != h {
		t.Errorf("the session's sender gate: %d handed, the last read numbered %d, %d released; want them equal and above 0", h, r, rel)
	}
}

// TestUDPDropsCounted: a datagram mihomo releases without reading it (to a
// fake IP its pool does not map, which it refuses) counts as unsent; its
// buffer is released once.
func TestUDPDropsCounted(t *testing.T) {
	before := testEngine.UDPDrops()
	released := make(chan struct{}, 2)
	reply := func(b []byte, _ netip.AddrPort) (int, error) {
		t.Errorf("a reply (%q) to a datagram that was dropped", b)
		return len(b), nil
	}
	testEngine.HandleUDP(netip.MustParseAddrPort("127.0.0.1:40124"), netip.MustParseAddrPort("198.18.255.250:9"),
		[]byte("lost"), reply, func() { released <- struct{}{} })
	select {
	case <-released: // counted before the release
	case <-time.After(5 * time.Second):
		t.Fatal("the dropped datagram's buffer was not released within 5s")
	}
	if got, want := testEngine.UDPDrops(), (UDPDrops{QueueFull: before.QueueFull, Unsent: before.Unsent + 1}); got != want {
		t.Errorf("drop counts %+v, want %+v", got, want)
	}
	if got := testEngine.UDPDrops().Total(); got != before.Total()+1 {
		t.Errorf("Total() = %d, want %d", got, before.Total()+1)
	}
	select {
	case <-released:
		t.Error("the datagram's buffer was released twice")
	case <-time.After(100 * time.Millisecond):
	}
}

// TestUDPPacketDrop: a datagram released unread counts once, however often
// Drop is called; one read first does not count; one whose drop is counted
// elsewhere (unsent nil, as queueUDP's) does not count here.
func TestUDPPacketDrop(t *testing.T) {
	var unsent atomic.Uint64
	releases := 0
	p := &udpPacket{data: []byte("x"), release: func() { releases++ }, unsent: &unsent}
	p.Drop()
	p.Drop()
	if unsent.Load() != 1 || releases != 1 {
		t.Errorf("dropped unread twice: counted %d, released %d times; want 1 and 1", unsent.Load(), releases)
	}
	p = &udpPacket{data: []byte("x"), unsent: &unsent}
	if string(p.Data()) != "x" {
		t.Fatal("Data lost the datagram")
	}
	p.Drop()
	p = &udpPacket{data: []byte("x")}
	p.Drop()
	if unsent.Load() != 1 {
		t.Errorf("counted %d, want 1: a datagram read before its release, or counted elsewhere, is no unsent drop", unsent.Load())
	}
}

// TestSendWithin: a full queue holds the sender until there is room, for at
// most the given wait.
func TestSendWithin(t *testing.T) {
	q := make(chan C.PacketAdapter, 1)
	q <- nil
	go func() {
		time.Sleep(5 * time.Millisecond)
		<-q
	}()
	if !sendWithin(q, nil, 5*time.Second) {
		t.Error("sendWithin gave up although the queue had room after 5ms")
	}

	start := time.Now()
	if sendWithin(q, nil, 20*time.Millisecond) {
		t.Fatal("sendWithin put a datagram into a full queue nobody reads")
	}
	if took := time.Since(start); took < 20*time.Millisecond || took > 5*time.Second {
		t.Errorf("sendWithin gave up after %v, want 20ms", took)
	}
}
