package engine

import (
	"sync/atomic"
	"time"
)

// Past mihomo's UDP worker, each session (a source address) has a sender
// goroutine with a queue of senderQueueCap datagrams (v1.19.24,
// tunnel.senderCapacity), and mihomo drops a datagram at once when that
// queue is full. On a host whose cores are busy the sender goroutine is
// sometimes not run for a few milliseconds, and 128 datagrams are under 5 ms
// of a 300 Mbit/s stream: in the bench's namespaces up to 1,250 datagrams a
// run were dropped there (the "unsent" count), more than the other losses
// of the run.
//
// tpgw cannot reach that queue, but it can tell how full it is, two ways.
// A senderGate numbers the datagrams it hands over (handed); it counts those
// mihomo released (udpPacket.Drop: sent on, or dropped), and keeps the
// highest number mihomo read (udpPacket.Data, which mihomo calls as it
// sends a datagram on, in the order they were handed over). handed -
// released is at least how many wait in the queue, unless mihomo lost a
// datagram without releasing it (which it can at a session's close);
// handed - read is too, unless mihomo dropped some (those stay counted
// until a later one is read). The smaller of the two is the estimate: at
// senderQueueCap the relay's reader waits for the sender, as queueUDP
// waits for the worker, up to udpQueueWait.
//
// It waits only for a session that is being sent on: one read within
// senderActive, and no wait timed out since its last read (stalled). So a
// session whose outbound is still being set up, or that mihomo drops
// everything of (no address, closing), or whose sender is stuck, holds up
// the reader once for udpQueueWait at most, not once per datagram; its
// datagrams are then dropped by mihomo as before.
//
// A session that is sent on, but more slowly than its datagrams come (a
// QUIC upload through an outbound that carries a quarter of it), reads
// before each wait times out, so it never stalls: waiting for it at each
// datagram would tie the reader, and every other source's datagrams, to its
// pace. So a gate holds the reader for a part in senderHoldShare of the
// time, and for at most the wait at once: each wait is charged at
// senderHoldShare times its length (holdPaid), and a datagram waits only
// for what is left of the wait after the charge not yet paid off. A sender
// that catches up after a pause is waited for as before; one that does not
// has its datagrams dropped by mihomo, and holds the reader briefly at
// each of its reads.
//
// Sources share a gate by the hash mihomo picks their worker by (senderGates
// of them), and their datagrams count in one sequence. While each of them is
// sent on, the highest number read is one of the last handed over, so a
// shared gate sees no more waiting than there is; while one of them is
// stuck, its datagrams can make the gate see a full queue for another whose
// queue has room, and the reader then waits once, for udpQueueWait, as for
// the stuck one.
const (
	senderQueueCap = 128
	senderGates    = 4096
	senderActive   = 2 * udpQueueWait
	// senderHoldShare: a gate holds the reader for at most a part in this
	// of the time, over longer than a wait.
	senderHoldShare = 10
)

// senderGate is the count of one or more sessions' datagrams (see above).
type senderGate struct {
	handed   atomic.Uint64 // datagrams handed to mihomo
	released atomic.Uint64 // of those, released by mihomo
	read     atomic.Uint64 // the highest number mihomo has read
	readAt   atomic.Int64  // when, in UnixNano
	stalled  atomic.Bool   // a wait timed out; no other until the next read
	holdPaid atomic.Int64  // when the waits so far are paid off, in UnixNano
	waiters  atomic.Int32
	wake     chan struct{} // a read while waiters > 0
	_        [64]byte      // keeps two gates' counters off one cache line
}

func newSenderGates() []senderGate {
	gs := make([]senderGate, senderGates)
	for i := range gs {
		gs[i].wake = make(chan struct{}, 1)
	}
	return gs
}

// noteRead records that mihomo read datagram seq, the gate's seq-th
// (udpPacket.Data, which mihomo may call more than once).
func (g *senderGate) noteRead(seq uint64) {
	for {
		r := g.read.Load()
		if seq <= r || g.read.CompareAndSwap(r, seq) {
			break
		}
	}
	g.readAt.Store(time.Now().UnixNano())
	if g.stalled.Load() {
		g.stalled.Store(false)
	}
	g.wakeWaiter()
}

// noteReleased records that mihomo released one of the gate's datagrams
// (udpPacket.Drop, once a datagram).
func (g *senderGate) noteReleased() {
	g.released.Add(1)
	g.wakeWaiter()
}

func (g *senderGate) wakeWaiter() {
	if g.waiters.Load() > 0 {
		select {
		case g.wake <- struct{}{}:
		default:
		}
	}
}

// room says whether the seq-th datagram finds room in the sender's queue,
// by the smaller estimate (see above).
func (g *senderGate) room(seq uint64) bool {
	return seq <= g.read.Load()+senderQueueCap || seq <= g.released.Load()+senderQueueCap
}

// admit waits until the gate's seq-th datagram finds room in its sender's
// queue, up to wait less the gate's unpaid waits, and says whether it
// waited and whether it then had room. It does not wait for a session that
// is not being sent on, nor for one that has held the reader for its share
// (see above), and reports no wait then.
func (g *senderGate) admit(seq uint64, wait time.Duration) (waited, room bool) {
	if g.read.Load() == 0 || g.room(seq) || g.stalled.Load() {
		return false, true
	}
	now := time.Now()
	if now.Sub(time.Unix(0, g.readAt.Load())) > senderActive {
		return false, true
	}
	if unpaid := time.Unix(0, g.holdPaid.Load()).Sub(now); unpaid > 0 {
		wait -= unpaid / senderHoldShare
	}
	if wait <= 0 {
		return false, true
	}
	g.waiters.Add(1)
	defer g.waiters.Add(-1)
	defer g.chargeHold(now)
	t := time.NewTimer(wait)
	defer t.Stop()
	for {
		if g.room(seq) {
			return true, true
		}
		select {
		case <-g.wake:
		case <-t.C:
			g.stalled.Store(true)
			return true, false
		}
	}
}

// chargeHold charges the gate for a wait that began at start and ends now.
func (g *senderGate) chargeHold(start time.Time) {
	now := time.Now()
	charge := senderHoldShare * now.Sub(start).Nanoseconds()
	for {
		paid := g.holdPaid.Load()
		if g.holdPaid.CompareAndSwap(paid, max(paid, now.UnixNano())+charge) {
			return
		}
	}
}
