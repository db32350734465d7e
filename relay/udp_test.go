package relay

import (
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/tpgw/tpgw/internal/testenv"
	"github.com/tpgw/tpgw/internal/tsock"
)

// origDst is the control message of a datagram TPROXYed to ap.
func origDst(ap string) []byte { return tsock.OrigDstCmsg(netip.MustParseAddrPort(ap)) }

// recordingHandler keeps the last datagram's arguments and releases at once.
type recordingHandler struct {
	src, dst netip.AddrPort
	data     []byte
	reply    func([]byte, netip.AddrPort) (int, error)
	calls    int
}

func (h *recordingHandler) HandleUDP(src, dst netip.AddrPort, data []byte, reply func([]byte, netip.AddrPort) (int, error), release func()) {
	h.src, h.dst, h.reply = src, dst, reply
	h.data = append(h.data[:0], data...)
	h.calls++
	release()
}

// newTestListener is a listener without a socket: dispatch and reply run as
// in Serve, and reply sockets are fakes that record the address they bind.
func newTestListener(h UDPHandler, max int) (*UDPListener, *[]netip.AddrPort) {
	var mu sync.Mutex
	var bound []netip.AddrPort
	l := &UDPListener{
		addr:    netip.MustParseAddrPort("[::]:7893"),
		handler: h,
		log:     slog.New(slog.DiscardHandler),
		home:    new(tsock.Netns), // runs in place
		stop:    make(chan struct{}),
	}
	l.small.New = func() any { return newDatagram(smallDatagram, &l.small) }
	l.large.New = func() any { return newDatagram(maxDatagram, &l.large) }
	l.table = newSessionTable(max, time.Minute, func(from netip.AddrPort) (replySocket, error) {
		mu.Lock()
		bound = append(bound, from)
		mu.Unlock()
		return &fakeSocket{from: from}, nil
	}, time.Now)
	return l, &bound
}

func TestDispatch(t *testing.T) {
	h := &recordingHandler{}
	l, bound := newTestListener(h, 10)
	src := netip.MustParseAddrPort("[::ffff:192.168.77.2]:40000")
	l.dispatch([]byte("hello"), origDst("203.0.113.2:7000"), src)
	if h.calls != 1 || h.src != netip.MustParseAddrPort("192.168.77.2:40000") || h.dst != netip.MustParseAddrPort("203.0.113.2:7000") || string(h.data) != "hello" {
		t.Fatalf("handler got %v -> %v %q (%d calls)", h.src, h.dst, h.data, h.calls)
	}

	// A link-local destination's scope id is left out.
	h.calls = 0
	l.dispatch([]byte("six"), origDst("[fe80::1%3]:53"), netip.MustParseAddrPort("[fe80::2%3]:40000"))
	if h.calls != 1 || h.dst != netip.MustParseAddrPort("[fe80::1]:53") {
		t.Fatalf("handler got dst %v (%d calls), want [fe80::1]:53", h.dst, h.calls)
	}
	l.dispatch([]byte("hello"), origDst("203.0.113.2:7000"), src)

	// Where replies come from: from, or the original destination when from
	// is unset or of the client's other family.
	for _, tt := range []struct{ from, want string }{
		{"", "203.0.113.2:7000"},
		{"198.51.100.9:53", "198.51.100.9:53"},
		{"[::ffff:198.51.100.9]:53", "198.51.100.9:53"},
		{"[2001:db8::1]:53", "203.0.113.2:7000"},
	} {
		var from netip.AddrPort
		if tt.from != "" {
			from = netip.MustParseAddrPort(tt.from)
		}
		*bound = (*bound)[:0]
		l.table.close()
		l.table = newSessionTable(10, time.Minute, l.table.open, time.Now)
		if n, err := h.reply([]byte("abc"), from); n != 3 || err != nil {
			t.Fatalf("reply from %q: %d, %v", tt.from, n, err)
		}
		if len(*bound) != 1 || (*bound)[0] != netip.MustParseAddrPort(tt.want) {
			t.Errorf("reply from %q bound %v, want %s", tt.from, *bound, tt.want)
		}
	}
}

func TestDispatchDrops(t *testing.T) {
	for _, tt := range []struct {
		name string
		oob  []byte
	}{
		{"no control message", nil},
		{"garbage control message", []byte("garbage garbage garbage")},
		{"to the listener on loopback", origDst("127.0.0.1:7893")},
		{"to the listener, unspecified", origDst("[::]:7893")},
	} {
		t.Run(tt.name, func(t *testing.T) {
			h := &recordingHandler{}
			l, _ := newTestListener(h, 10)
			l.dispatch([]byte("x"), tt.oob, netip.MustParseAddrPort("192.168.77.2:1"))
			if h.calls != 0 || l.Stats().Dropped != 1 {
				t.Fatalf("handler called %d times, stats %+v; want dropped", h.calls, l.Stats())
			}
		})
	}
}

func TestDispatchBufferClasses(t *testing.T) {
	h := &recordingHandler{}
	l, _ := newTestListener(h, 10)
	for _, n := range []int{0, 1, smallDatagram, smallDatagram + 1, 65507} {
		payload := make([]byte, n)
		for i := range payload {
			payload[i] = byte(i)
		}
		l.dispatch(payload, origDst("203.0.113.2:7000"), netip.MustParseAddrPort("192.168.77.2:1"))
		if len(h.data) != n || string(h.data) != string(payload) {
			t.Fatalf("%d-byte datagram arrived as %d bytes or changed", n, len(h.data))
		}
	}
}

// The hot path allocates only the reply closure per datagram, and an
// existing session's reply allocates nothing.
func TestDispatchAllocations(t *testing.T) {
	h := &recordingHandler{}
	l, _ := newTestListener(h, 10)
	payload := make([]byte, 1200)
	oob := origDst("203.0.113.2:7000")
	src := netip.MustParseAddrPort("192.168.77.2:40000")
	l.dispatch(payload, oob, src) // warm the pool
	if n := testing.AllocsPerRun(1000, func() { l.dispatch(payload, oob, src) }); n > 1 {
		t.Errorf("dispatch allocates %v times per datagram, want ≤ 1", n)
	}
	h.reply(payload, netip.AddrPort{}) // open the session
	if n := testing.AllocsPerRun(1000, func() { h.reply(payload, netip.AddrPort{}) }); n != 0 {
		t.Errorf("reply allocates %v times per datagram, want 0", n)
	}
}

func BenchmarkDispatch(b *testing.B) {
	h := &recordingHandler{}
	l, _ := newTestListener(h, 10)
	payload := make([]byte, 1200)
	oob := origDst("203.0.113.2:7000")
	src := netip.MustParseAddrPort("192.168.77.2:40000")
	b.ReportAllocs()
	for b.Loop() {
		l.dispatch(payload, oob, src)
	}
}

// TestListenUDPCloseStopsServe runs a real listener on loopback: a datagram
// sent straight to it is dropped (it would loop), Close makes Serve return
// nil, and replies after Close fail.
func TestListenUDPCloseStopsServe(t *testing.T) {
	testenv.RequireRoot(t)
	h := &recordingHandler{}
	l, err := ListenUDP("127.0.0.1:0", h, UDPOptions{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- l.Serve() }()

	c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(l.Addr()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("direct")); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(2 * time.Second); l.Stats().Dropped == 0 && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}
	if st := l.Stats(); st.Dropped != 1 || st.Datagrams != 0 {
		t.Fatalf("stats %+v: want the direct datagram dropped", st)
	}

	if err := l.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	select {
	case err := <-served:
		if err != nil {
			t.Fatalf("Serve after Close: %v", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Serve did not return after Close")
	}
	if err := l.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := l.Serve(); err != nil {
		t.Fatalf("Serve on a closed listener: %v", err)
	}
	if _, err := l.reply(netip.MustParseAddrPort("127.0.0.1:1"), netip.MustParseAddrPort("127.0.0.2:2"), []byte("x"), netip.AddrPort{}); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("reply after Close: %v, want net.ErrClosed", err)
	}
}

// A raw reply socket that was closed (an evicted session) reports
// net.ErrClosed, as a closed ReplySocket does, so that reply tries again
// with a new session.
func TestRawReplySocketClosed(t *testing.T) {
	s := &rawReplySocket{raw: tsock.NewRawUDP(), from: netip.MustParseAddrPort("203.0.113.2:51820")}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.WriteToUDPAddrPort([]byte("x"), netip.MustParseAddrPort("192.168.77.2:40000")); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("send after Close: %v, want net.ErrClosed", err)
	}
}
