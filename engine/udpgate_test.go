package engine

import (
	"testing"
	"time"
)

// fakeSender is mihomo's per-session sender (tunnel/connection.go,
// v1.19.24) as far as the gate sees it: a queue of senderQueueCap
// datagrams that drops a datagram when full, and a goroutine that reads
// them in order, here one that pauses every so often, as a sender the
// scheduler does not run for a while.
type fakeSender struct {
	ch      chan *udpPacket
	dropped int
}

func (s *fakeSender) send(p *udpPacket) {
	select {
	case s.ch <- p:
	default:
		s.dropped++
		p.Drop()
	}
}

// run reads the queue until it is closed, pausing for pause after every
// every datagrams, and stops reading for good after stopAfter of them (0:
// never).
func (s *fakeSender) run(every, stopAfter int, pause time.Duration, done chan<- struct{}) {
	defer close(done)
	i := 0
	for p := range s.ch {
		i++
		p.Data()
		p.Drop()
		if i == stopAfter {
			return
		}
		if i%every == 0 {
			time.Sleep(pause)
		}
	}
}

// hand hands n datagrams to s through g the way queueUDP does, each
// allowed wait; it returns how many the gate held and how many of those
// found no room within wait.
func hand(g *senderGate, s *fakeSender, n int, gate bool, wait time.Duration) (held, gaveUp int) {
	for range n {
		p := &udpPacket{gate: g, seq: g.handed.Add(1)}
		if gate {
			if waited, room := g.admit(p.seq, wait); waited {
				held++
				if !room {
					gaveUp++
				}
			}
		}
		s.send(p)
	}
	return held, gaveUp
}

// TestSenderGateHoldsForABusySender: a stream faster than a sender that
// pauses for 5 ms every 200 datagrams overflows the sender's queue without
// the gate, and loses nothing with it: the datagrams wait for room.
func TestSenderGateHoldsForABusySender(t *testing.T) {
	const n = 3000
	for _, gate := range []bool{false, true} {
		g := &newSenderGates()[0]
		s := &fakeSender{ch: make(chan *udpPacket, senderQueueCap)}
		done := make(chan struct{})
		go s.run(200, 0, 5*time.Millisecond, done)
		// The first datagram read marks the session as sent on.
		held, gaveUp := hand(g, s, 1, gate, 0)
		for deadline := time.Now().Add(5 * time.Second); g.read.Load() == 0; time.Sleep(time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatal("the sender read nothing within 5s")
			}
		}
		// 10 s rather than udpQueueWait: a loaded test host must not turn
		// a pause of 5 ms into a timeout.
		h, gu := hand(g, s, n-1, gate, 10*time.Second)
		held, gaveUp = held+h, gaveUp+gu
		close(s.ch)
		if !gate {
			<-done
			if s.dropped == 0 {
				t.Fatal("without the gate the sender's queue never overflowed: the test shows nothing")
			}
			t.Logf("without the gate: %d of %d dropped", s.dropped, n)
			continue
		}
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Fatal("the sender did not read every datagram within 30s")
		}
		if s.dropped != 0 || gaveUp != 0 {
			t.Errorf("with the gate: %d dropped, %d found no room, want none", s.dropped, gaveUp)
		}
		if held == 0 {
			t.Error("with the gate no datagram was held, though the sender paused")
		}
		if got := g.read.Load(); got != n {
			t.Errorf("the gate saw %d read, want %d", got, n)
		}
	}
}

// TestSenderGateBounded: the gate holds datagrams only for a session
// being sent on, and for a sender that stopped reading only once, for the
// wait; after a read it holds again.
func TestSenderGateBounded(t *testing.T) {
	const wait = 50 * time.Millisecond

	// Never read (its outbound being set up, or everything dropped): no hold.
	g := &newSenderGates()[0]
	s := &fakeSender{ch: make(chan *udpPacket, senderQueueCap)}
	if held, _ := hand(g, s, 1000, true, wait); held != 0 {
		t.Errorf("a session never read: %d datagrams held, want 0", held)
	}
	if s.dropped != 1000-senderQueueCap {
		t.Errorf("a session never read: %d dropped, want %d", s.dropped, 1000-senderQueueCap)
	}

	// Read, then stuck: one hold, which gives up after wait.
	g = &newSenderGates()[0]
	s = &fakeSender{ch: make(chan *udpPacket, senderQueueCap)}
	done := make(chan struct{})
	go s.run(1000, 10, 0, done)
	hand(g, s, 10, true, wait)
	<-done
	start := time.Now()
	held, gaveUp := hand(g, s, 1000, true, wait)
	took := time.Since(start)
	if held != 1 || gaveUp != 1 {
		t.Errorf("a stuck sender: %d held, %d gave up, want 1 and 1", held, gaveUp)
	}
	if took < wait || took > 5*time.Second {
		t.Errorf("a stuck sender held the stream for %v, want one wait of %v", took, wait)
	}

	// It reads again: the gate holds again.
	p := <-s.ch
	p.Data()
	p.Drop()
	if g.stalled.Load() {
		t.Error("a read did not end the stall")
	}
	// That read made room for one, which takes it.
	if held, _ := hand(g, s, 1, true, wait); held != 0 || s.dropped != 1000-senderQueueCap {
		t.Errorf("after a read made room: %d held, %d dropped in all, want 0 and %d", held, s.dropped, 1000-senderQueueCap)
	}
	seq := g.handed.Add(1)
	go func() {
		time.Sleep(10 * time.Millisecond)
		p := <-s.ch
		p.Data()
		p.Drop()
	}()
	if waited, room := g.admit(seq, 5*time.Second); !waited || !room {
		t.Errorf("after the sender read again: admit = %v, %v, want a hold that found room", waited, room)
	}

	// Not read for longer than senderActive: no hold.
	g = &newSenderGates()[0]
	g.read.Store(1)
	g.readAt.Store(time.Now().Add(-time.Second).UnixNano())
	g.handed.Store(1 + 2*senderQueueCap)
	if waited, _ := g.admit(g.handed.Add(1), wait); waited {
		t.Error("a session last read 1s ago held a datagram")
	}

	// Read past the datagram (sources sharing a gate, or a sniffer that
	// reads ahead): no hold.
	g.read.Store(500)
	g.readAt.Store(time.Now().UnixNano())
	if waited, _ := g.admit(100, wait); waited {
		t.Error("a datagram numbered below the gate's last read was held")
	}
}

// TestSenderGateSlowSenderDoesNotHoldTheReader: a sender that reads on, but
// more slowly than its datagrams come (one every 2 ms, as a QUIC upload
// through an outbound that carries a quarter of it), is not waited for at
// every datagram: the reader, which also serves another sender, is held
// for a small part of the time, and the other sender loses nothing.
func TestSenderGateSlowSenderDoesNotHoldTheReader(t *testing.T) {
	const n = 1000 // datagrams to each sender
	gs := newSenderGates()
	slowGate, fastGate := &gs[0], &gs[1]
	slow := &fakeSender{ch: make(chan *udpPacket, senderQueueCap)}
	fast := &fakeSender{ch: make(chan *udpPacket, senderQueueCap)}
	slowDone, fastDone := make(chan struct{}), make(chan struct{})
	go slow.run(1, 0, 2*time.Millisecond, slowDone)
	go fast.run(n+1, 0, 0, fastDone)
	// The first datagram read marks each session as sent on.
	hand(slowGate, slow, 1, true, 0)
	hand(fastGate, fast, 1, true, 0)
	for deadline := time.Now().Add(5 * time.Second); slowGate.read.Load() == 0 || fastGate.read.Load() == 0; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the senders read nothing within 5s")
		}
	}

	var slowHeld, fastGaveUp int
	start := time.Now()
	for range n - 1 {
		h, _ := hand(slowGate, slow, 1, true, udpQueueWait)
		slowHeld += h
		// 10 s rather than udpQueueWait for the sender that keeps up: a
		// loaded test host must not turn a moment unscheduled into a drop.
		_, gu := hand(fastGate, fast, 1, true, 10*time.Second)
		fastGaveUp += gu
	}
	took := time.Since(start)
	close(slow.ch)
	close(fast.ch)
	for _, done := range []chan struct{}{slowDone, fastDone} {
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Fatal("a sender did not read its queue within 30s")
		}
	}

	// Waiting for the slow sender at each datagram past its queue's takes
	// (n-senderQueueCap) * 2ms, over 1.7s.
	t.Logf("%d datagrams to each sender in %v: the slow sender held %d and dropped %d", n, took, slowHeld, slow.dropped)
	if took > 400*time.Millisecond {
		t.Errorf("the slow sender held the reader for %v (%d datagrams held), want well under the %v of waiting for each",
			took, slowHeld, time.Duration(n-senderQueueCap)*2*time.Millisecond)
	}
	if slowHeld == 0 {
		t.Error("the slow sender was never waited for: the test shows nothing")
	}
	if fast.dropped != 0 || fastGaveUp != 0 {
		t.Errorf("the sender that keeps up: %d dropped, %d found no room, want none", fast.dropped, fastGaveUp)
	}
	if got := fastGate.read.Load(); got != n {
		t.Errorf("the sender that keeps up read %d, want %d", got, n)
	}
}
