package engine

import (
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
	_ "unsafe" // go:linkname

	"github.com/metacubex/mihomo/common/utils"
	C "github.com/metacubex/mihomo/constant"
)

// A TPROXYed datagram goes to mihomo's tunnel the way mihomo's
// Tunnel.HandleUDPPacket hands it on (v1.19.24): into one of its UDP
// workers' queues, chosen by the hash of the datagram's source, so that a
// source's datagrams keep their order. mihomo drops the datagram when that
// queue (64 datagrams) is full. tpgw waits for room instead, up to
// udpQueueWait, holding up the relay's reader: what arrives meanwhile waits
// in the listener's socket buffer (tsock.ListenerRcvBuf, 4 MiB, about 60 ms
// of a 300 Mbit/s stream of 1400-byte datagrams). On a host whose cores are
// busy, the worker goroutine is sometimes not run for a few milliseconds,
// and a stream of datagrams then overflowed its queue: of 134,000 datagrams
// at 300 Mbit/s in the bench's namespaces, 300–1,600 were dropped there in
// each of 5 runs (0.28–1.54% lost in all, kernel forwarding 0–0.33% in the
// same runs); with the wait, 10–18 found the queue full, none waited out
// udpQueueWait, and 0.14–0.19% were lost (kernel forwarding 0.11–0.26%),
// most of the rest at the receiving socket as with kernel forwarding. Past
// the worker, the queue of the datagram's session is the next place mihomo
// drops; udpgate.go waits for room there too.
//
// The queues and their once-only set-up are mihomo's unexported variables,
// reached by name as flow.go reaches its functions; TestUDPThroughMihomoQueues
// checks that they are there and that a queued datagram is relayed.

//go:linkname mihomoUDPInit github.com/metacubex/mihomo/tunnel.udpInit
var mihomoUDPInit sync.Once

//go:linkname mihomoInitUDP github.com/metacubex/mihomo/tunnel.initUDP
func mihomoInitUDP()

//go:linkname mihomoUDPQueues github.com/metacubex/mihomo/tunnel.udpQueues
var mihomoUDPQueues []chan C.PacketAdapter

// udpQueueWait bounds how long a datagram waits for room in its worker's
// queue before it is dropped, as mihomo drops it at once. It bounds how long
// one starved worker holds up the relay's reader, and with it the datagrams
// of every other source.
const udpQueueWait = 10 * time.Millisecond

// queueUDP hands p, a datagram from src to dst, to mihomo's UDP worker for
// its source, waiting up to udpQueueWait for room in its session's sender
// queue (udpgate.go) and up to udpQueueWait for room in the worker's.
func (e *Engine) queueUDP(p *udpPacket, src, dst netip.AddrPort) {
	mihomoUDPInit.Do(mihomoInitUDP)
	pa := C.NewPacketAdapter(p, e.metadata(C.UDP, src, dst))
	// The hash mihomo's own inbounds use, so that a source's datagrams from
	// any inbound share a worker.
	h := utils.MapHash(pa.Key())
	g := &e.senders[h%uint64(len(e.senders))]
	p.gate, p.seq = g, g.handed.Add(1)
	if waited, room := g.admit(p.seq, udpQueueWait); waited {
		e.udpDrops.senderWaits.Add(1)
		if !room {
			e.udpDrops.senderWaitedOut.Add(1)
		}
	}
	q := mihomoUDPQueues[h%uint64(len(mihomoUDPQueues))]
	if !sendWithin(q, pa, udpQueueWait) {
		p.unsent = nil
		e.udpDrops.queueFull.Add(1)
		p.Drop()
	}
}

// udpDropCounters counts the datagrams the gateway process dropped before
// they were sent on (UDPDrops), and those it held for their session's
// sender (UDPSenderWaits).
type udpDropCounters struct {
	queueFull atomic.Uint64
	unsent    atomic.Uint64
	// senderWaits counts the datagrams that waited for room in their
	// session's sender queue (udpgate.go), senderWaitedOut those of them
	// that found none within their wait (udpQueueWait, or what the gate's
	// share of the reader's time left of it).
	senderWaits     atomic.Uint64
	senderWaitedOut atomic.Uint64
}

// UDPDrops counts the TPROXYed datagrams the engine dropped before they
// were sent on, since it started.
type UDPDrops struct {
	// QueueFull: mihomo's UDP worker for their source had no room for
	// udpQueueWait.
	QueueFull uint64
	// Unsent: mihomo released them unread (udpPacket.Drop): the sender
	// queue of their session was full, the session was closing (its
	// outbound could not be set up), or their destination had no address.
	Unsent uint64
}

// Total is every datagram UDPDrops counts.
func (d UDPDrops) Total() uint64 { return d.QueueFull + d.Unsent }

// UDPDrops returns the engine's counts of dropped datagrams.
func (e *Engine) UDPDrops() UDPDrops {
	return UDPDrops{QueueFull: e.udpDrops.queueFull.Load(), Unsent: e.udpDrops.unsent.Load()}
}

// UDPSenderWaits counts the TPROXYed datagrams the relay's reader held
// until their session's sender queue in mihomo had room (udpgate.go), since
// the engine started.
type UDPSenderWaits struct {
	Held   uint64 // held at all
	GaveUp uint64 // of those: no room within their wait, at most udpQueueWait (mihomo may drop them then)
}

// UDPSenderWaits returns the engine's counts of held datagrams.
func (e *Engine) UDPSenderWaits() UDPSenderWaits {
	return UDPSenderWaits{Held: e.udpDrops.senderWaits.Load(), GaveUp: e.udpDrops.senderWaitedOut.Load()}
}

// sendWithin puts pa into q, waiting at most wait for room; false if there
// was none by then.
func sendWithin(q chan<- C.PacketAdapter, pa C.PacketAdapter, wait time.Duration) bool {
	select {
	case q <- pa:
		return true
	default:
	}
	t := time.NewTimer(wait) // only when the queue is full
	defer t.Stop()
	select {
	case q <- pa:
		return true
	case <-t.C:
		return false
	}
}
