package engine

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/metacubex/sing/common/bufio"

	"github.com/tpgw/tpgw/internal/testsrv"
)

// queuedSize is a message the loopback sockets' buffers hold whole while its
// reader waits, about half of it in the send queue of tpgw's socket: a
// reset at the wrong moment discards that half.
const queuedSize = 256 << 10

// TestParkedFlowEndsGracefully: a client and a server each send a bulk
// message and half-close without reading what the other sent. Both
// directions end with EOF, so the flow ends with much of both messages still
// queued in its sockets; they were armed to reset while the flow ran and are
// disarmed before they close: each end then reads every byte and EOF, not a
// reset that would drop what was queued.
func TestParkedFlowEndsGracefully(t *testing.T) {
	up := bytes.Repeat([]byte("client->server.."), queuedSize/16)
	down := bytes.Repeat([]byte("server->client.."), queuedSize/16)
	ended := make(chan struct{})
	serverGot := make(chan error, 1)
	dst := serveOne(t, func(c net.Conn) {
		c.SetDeadline(time.Now().Add(10 * time.Second))
		c.Write(down)
		c.(*net.TCPConn).CloseWrite()
		<-ended
		got, err := io.ReadAll(c)
		if err == nil && !bytes.Equal(got, up) {
			err = fmt.Errorf("read %d of %d bytes, then EOF", len(got), len(up))
		}
		serverGot <- err
	})
	client, inbound := tcpPair(t)
	done := relayAsync(inbound, client, dst)
	client.SetDeadline(time.Now().Add(10 * time.Second))
	client.Write(up)
	client.(*net.TCPConn).CloseWrite()
	waitDone(t, done) // the flow ended, with both messages still queued
	close(ended)
	got, err := io.ReadAll(client)
	if err != nil || !bytes.Equal(got, down) {
		t.Errorf("client read %d of %d bytes, then %v; want all of them and EOF", len(got), len(down), err)
	}
	if err := <-serverGot; err != nil {
		t.Errorf("server: %v; want all of the client's bytes and EOF", err)
	}
}

// TestCutFlowPassesResetOn: one end resets its connection right after a
// bulk message that the other end reads only later. tpgw passes the reset
// on as a router would, behind the bytes: the other end reads every byte,
// then ECONNRESET; not a FIN, which would make the cut stream look complete,
// and not a reset at once, which would discard the bytes still queued in
// tpgw's socket.
func TestCutFlowPassesResetOn(t *testing.T) {
	msg := bytes.Repeat([]byte("before the cut.."), queuedSize/16)
	// readLater reads c after a pause (tpgw's socket towards it fills
	// meanwhile) and reports what it read and how the stream ended.
	readLater := func(c net.Conn) <-chan error {
		got := make(chan error, 1)
		go func() {
			time.Sleep(200 * time.Millisecond)
			b, err := io.ReadAll(c)
			if !bytes.Equal(b, msg) {
				err = fmt.Errorf("read %d of %d bytes, then %v", len(b), len(msg), err)
			}
			got <- err
		}()
		return got
	}
	// sendAndReset writes msg to c, waits until c's peer (tpgw) has taken
	// every byte (a reset discards what c itself still holds), and resets.
	sendAndReset := func(c net.Conn) {
		c.Write(msg)
		if err := testsrv.WaitSent(c.(*net.TCPConn), 5*time.Second); err != nil {
			t.Error(err)
		}
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
	}
	t.Run("server resets", func(t *testing.T) {
		dst := serveOne(t, func(c net.Conn) {
			c.SetDeadline(time.Now().Add(10 * time.Second))
			sendAndReset(c)
		})
		client, inbound := tcpPair(t)
		client.SetDeadline(time.Now().Add(10 * time.Second))
		got := readLater(client)
		done := relayAsync(inbound, client, dst)
		if err := <-got; !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("client: %v; want every byte, then a reset (ECONNRESET)", err)
		}
		waitDone(t, done)
	})
	t.Run("client resets", func(t *testing.T) {
		serverGot := make(chan error, 1)
		dst := serveOne(t, func(c net.Conn) {
			c.SetDeadline(time.Now().Add(10 * time.Second))
			serverGot <- <-readLater(c)
		})
		client, inbound := tcpPair(t)
		client.SetDeadline(time.Now().Add(10 * time.Second))
		done := relayAsync(inbound, client, dst)
		sendAndReset(client)
		if err := <-serverGot; !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("server: %v; want every byte, then a reset (ECONNRESET)", err)
		}
		waitDone(t, done)
	})
}

// TestParkedFlowArmedToReset: while a DIRECT flow runs, both of its sockets
// are armed to reset, so closing them as the kernel does for a process that
// died (the descriptors closed, nothing else) resets the client and the
// server; neither takes the cut for the end of the stream.
func TestParkedFlowArmedToReset(t *testing.T) {
	serverErr := make(chan error, 1)
	dst := serveOne(t, func(c net.Conn) {
		c.SetDeadline(time.Now().Add(10 * time.Second))
		_, err := io.Copy(io.Discard, c)
		serverErr <- err
	})
	client, inbound := tcpPair(t)
	done := relayAsync(inbound, client, dst)
	client.SetDeadline(time.Now().Add(10 * time.Second))
	client.Write([]byte("hello"))
	var flows []*flow
	for deadline := time.Now().Add(5 * time.Second); len(flows) == 0 && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		testEngine.parker.mu.Lock()
		for _, f := range testEngine.parker.flows {
			flows = append(flows, f)
		}
		testEngine.parker.mu.Unlock()
	}
	if len(flows) != 1 {
		t.Fatalf("the parker holds %d flows, want 1", len(flows))
	}
	waitParked(t)
	// What the process's death does to the sockets.
	flows[0].client.Close()
	flows[0].remote.Close()
	if _, err := io.ReadAll(client); !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("client after its flow's sockets closed unarmed: %v; want a reset (ECONNRESET)", err)
	}
	if err := <-serverErr; !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("server after its flow's sockets closed unarmed: %v; want a reset (ECONNRESET)", err)
	}
	flows[0].shutdown() // leaves the parker and the statistics
	waitDone(t, done)
}

// TestLazySpliceConnClose: the client side of a flow mihomo relays is armed
// to reset when the process dies; its Close is graceful once both FINs have
// passed and otherwise resets behind the queued bytes.
func TestLazySpliceConnClose(t *testing.T) {
	payload := bytes.Repeat([]byte("x"), queuedSize)
	t.Run("death", func(t *testing.T) {
		client, inbound := tcpPair(t)
		lc := newLazySplice(inbound.(*net.TCPConn))
		lc.arm()
		lc.TCPConn.Close() // the descriptor closed, as by the kernel
		client.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := client.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("peer of an armed connection whose descriptor closed: %v, want ECONNRESET", err)
		}
	})
	t.Run("finished", func(t *testing.T) {
		client, inbound := tcpPair(t)
		lc := newLazySplice(inbound.(*net.TCPConn))
		lc.arm()
		client.(*net.TCPConn).CloseWrite()
		inbound.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadAll(lc.buffered); err != nil {
			t.Fatal(err)
		}
		go func() { lc.Write(payload); lc.CloseWrite(); lc.Close() }()
		client.SetReadDeadline(time.Now().Add(10 * time.Second))
		time.Sleep(100 * time.Millisecond) // Close comes while most of it is queued
		got, err := io.ReadAll(client)
		if err != nil || len(got) != len(payload) {
			t.Fatalf("peer read %d of %d bytes, then %v; want all and EOF", len(got), len(payload), err)
		}
	})
	t.Run("cut", func(t *testing.T) {
		client, inbound := tcpPair(t)
		lc := newLazySplice(inbound.(*net.TCPConn))
		lc.arm()
		go func() { lc.Write(payload); lc.Close() }() // no FIN either way
		client.SetReadDeadline(time.Now().Add(10 * time.Second))
		time.Sleep(100 * time.Millisecond)
		got, err := io.ReadAll(client)
		if len(got) != len(payload) || !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("peer read %d of %d bytes, then %v; want all, then a reset (ECONNRESET)", len(got), len(payload), err)
		}
	})
}

// TestLazySpliceArmedByAnswer: the client's side of a flow mihomo's tunnel
// relays (the sniffer is on) is armed before the remote's first byte reaches
// the client, also while the client → remote copy has not asked yet (it
// writes the sniffer's peeked bytes first, and on a loaded host it can be
// that late): a process that dies right after the answer resets the
// client instead of ending its stream with a FIN.
func TestLazySpliceArmedByAnswer(t *testing.T) {
	client, inbound := tcpPair(t)
	remote, remotePeer := tcpPair(t)
	lc := newLazySplice(inbound.(*net.TCPConn))
	copied := make(chan error, 1)
	// Only the remote → client copy, as sing's relay runs it.
	go func() { _, err := bufio.Copy(lc.buffered, remote); copied <- err }()
	defer func() {
		remotePeer.Close()
		select {
		case <-copied:
		case <-time.After(5 * time.Second):
			t.Error("the remote → client copy did not end within 5s of the remote's close")
		}
	}()
	if _, err := remotePeer.Write([]byte("answer")); err != nil {
		t.Fatal(err)
	}
	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(client, make([]byte, len("answer"))); err != nil {
		t.Fatalf("the answer through the copy: %v", err)
	}
	lc.TCPConn.Close() // the descriptor closed, as by the kernel when the process dies
	if n, err := client.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("client after the answer and its socket's close: read %d bytes, %v; want a reset (ECONNRESET)", n, err)
	}
}

// TestDrainSendsBounded: a cut flow waits for its queued bytes only while
// its peer takes them; one that stopped reading holds it for drainStall.
func TestDrainSendsBounded(t *testing.T) {
	client, inbound := tcpPair(t)
	defer client.Close()
	defer inbound.Close()
	inbound.SetWriteDeadline(time.Now().Add(200 * time.Millisecond))
	for { // fill the send queue: the peer does not read
		if _, err := inbound.Write(make([]byte, 64<<10)); err != nil {
			break
		}
	}
	if sendQueued(inbound.(*net.TCPConn)) == 0 {
		t.Fatal("nothing queued")
	}
	start := time.Now()
	drainSends(inbound.(*net.TCPConn))
	if took := time.Since(start); took < drainStall || took > drainStall+time.Second {
		t.Errorf("drainSends with a peer that does not read took %v, want about %v", took, drainStall)
	}

	go io.Copy(io.Discard, client) // now it reads
	start = time.Now()
	drainSends(inbound.(*net.TCPConn))
	if took := time.Since(start); took > drainStall/2 {
		t.Errorf("drainSends with a reading peer took %v", took)
	}
	if n := sendQueued(inbound.(*net.TCPConn)); n != 0 {
		t.Errorf("%d bytes still queued after drainSends with a reading peer", n)
	}
}
