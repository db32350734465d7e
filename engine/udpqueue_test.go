package engine

import (
	"net"
	"net/netip"
	"testing"
	"time"

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
