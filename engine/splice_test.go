package engine

import (
	"bytes"
	"errors"
	"io"
	"net"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/metacubex/mihomo/tunnel/statistic"
	N "github.com/metacubex/sing/common/network"
)

// rawOf is c's syscall.RawConn.
func rawOf(t *testing.T, c net.Conn) syscall.RawConn {
	t.Helper()
	raw, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

// TestSpliceAll moves a stream between two socket pairs as a spliced
// direction does (writer → in, spliceAll(in → out), out → reader): every
// byte arrives in order, the counters see them all, the writer's EOF ends
// it with no error, and the pipe is closed afterwards.
func TestSpliceAll(t *testing.T) {
	writer, in := tcpPair(t)
	out, reader := tcpPair(t)
	for _, c := range []net.Conn{writer, in, out, reader} {
		defer c.Close()
		c.SetDeadline(time.Now().Add(20 * time.Second))
	}
	data := make([]byte, 24<<20)
	for i := range data {
		data[i] = byte(i * 7 / 5)
	}
	base := basePipes(t)
	var counted atomic.Int64
	count := func(n int64) { counted.Add(n) }
	done := make(chan error, 1)
	go func() { done <- spliceAll(rawOf(t, in), rawOf(t, out), []N.CountFunc{count, count}) }()
	go func() {
		// Small writes and pauses first, then bulk, as a real stream goes.
		for i := range 5 {
			writer.Write(data[i*100 : (i+1)*100])
			time.Sleep(10 * time.Millisecond)
		}
		writer.Write(data[500:])
		writer.(*net.TCPConn).CloseWrite()
	}()
	got := make([]byte, 0, len(data))
	buf := make([]byte, 64<<10)
	for len(got) < len(data) {
		n, err := reader.Read(buf)
		got = append(got, buf[:n]...)
		if err != nil {
			t.Fatalf("read after %d bytes: %v", len(got), err)
		}
	}
	if !bytes.Equal(got, data) {
		t.Fatal("the bytes spliced differ from the bytes written")
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("spliceAll after EOF: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("spliceAll did not return after the writer's EOF")
	}
	if c := counted.Load(); c != 2*int64(len(data)) {
		t.Errorf("counters saw %d bytes each, want %d", c/2, len(data))
	}
	if n := pipeFDs(t); n != base {
		t.Errorf("%d pipe descriptors left after spliceAll returned", n-base)
	}
}

// TestSpliceAllWriteFails: when the destination's peer is gone, spliceAll
// returns the error instead of waiting or spinning, though the source stays
// open and keeps sending.
func TestSpliceAllWriteFails(t *testing.T) {
	writer, in := tcpPair(t)
	out, reader := tcpPair(t)
	for _, c := range []net.Conn{writer, in, out} {
		defer c.Close()
	}
	reader.(*net.TCPConn).SetLinger(0)
	reader.Close() // a reset: writes to out fail
	done := make(chan error, 1)
	go func() { done <- spliceAll(rawOf(t, in), rawOf(t, out), nil) }()
	stop := make(chan struct{})
	defer close(stop)
	go writeUntil(writer, stop)
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("spliceAll to a reset peer returned no error")
		}
		t.Logf("spliceAll: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("spliceAll to a reset peer did not return")
	}
}

// TestDashboardClosesSplicedFlow: a DIRECT flow in the middle of a spliced
// download ends when its connection is closed in mihomo's statistics (the
// dashboard's close button): the client's reads stop, the flow leaves the
// statistics and its pipe is closed.
func TestDashboardClosesSplicedFlow(t *testing.T) {
	stop := make(chan struct{})
	defer close(stop)
	dst := serveOne(t, func(c net.Conn) { writeUntil(c, stop) })
	base := basePipes(t)
	client, inbound := tcpPair(t)
	defer client.Close()
	done := relayAsync(inbound, client, dst)
	client.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.CopyN(io.Discard, client, 4<<20); err != nil {
		t.Fatal(err)
	}
	if n := waitPipes(t, base+2); n != base+2 {
		t.Fatalf("during a bulk download the flow holds %d pipe descriptors, want 2 (spliced)", n-base)
	}
	src := client.LocalAddr().(*net.TCPAddr).AddrPort()
	statistic.DefaultManager.Range(func(c statistic.Tracker) bool {
		if c.Info().Metadata.SrcPort == src.Port() {
			c.Close()
		}
		return true
	})
	// The client drains what was in flight, then sees the end.
	if _, err := io.Copy(io.Discard, client); err != nil && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("client after the dashboard's close: %v; want EOF or a reset", err)
	}
	waitDone(t, done)
	if n := waitPipes(t, base); n != base {
		t.Errorf("after the close %d pipe descriptors are left", n-base)
	}
}

// writeUntil writes to c without pause until stop is closed or a write
// fails for another reason than its 1 s deadline (a peer that stopped
// reading only pauses it).
func writeUntil(c net.Conn, stop <-chan struct{}) {
	chunk := make([]byte, 256<<10)
	for {
		select {
		case <-stop:
			return
		default:
		}
		c.SetWriteDeadline(time.Now().Add(time.Second))
		if _, err := c.Write(chunk); err != nil {
			var ne net.Error
			if !errors.As(err, &ne) || !ne.Timeout() {
				return
			}
		}
	}
}

// TestDirectionWriteWaits: a chunk written to a destination whose peer reads
// slowly is written whole: the raw write waits in the poller while the send
// buffer is full, and resumes where it stopped.
func TestDirectionWriteWaits(t *testing.T) {
	out, reader := tcpPair(t)
	defer out.Close()
	defer reader.Close()
	// More than the socket buffers hold (tcp_wmem and tcp_rmem grow to
	// 4 and 6 MiB by default). Tiny buffers instead would test the
	// loopback's zero-window probing, which can stall for seconds.
	data := make([]byte, 32<<20)
	for i := range data {
		data[i] = byte(i * 13 / 7)
	}
	d := &direction{dstRaw: rawOf(t, out)}
	d.writeFn = d.writeAll
	done := make(chan error, 1)
	go func() { done <- d.write(data) }()
	time.Sleep(100 * time.Millisecond) // the send buffer fills; write waits
	select {
	case err := <-done:
		t.Fatalf("write of %d bytes returned before the peer read anything: %v", len(data), err)
	default:
	}
	reader.SetReadDeadline(time.Now().Add(10 * time.Second))
	got := make([]byte, len(data))
	if _, err := io.ReadFull(reader, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("the bytes read differ from the bytes written")
	}
	if err := <-done; err != nil {
		t.Fatalf("write: %v", err)
	}
}

// TestRawCloseWrite: the raw shutdown passes a FIN (the peer reads EOF)
// and leaves the socket readable, as CloseWrite does; on a closed socket
// it fails.
func TestRawCloseWrite(t *testing.T) {
	a, b := tcpPair(t)
	defer a.Close()
	defer b.Close()
	rc, err := a.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	if err := rawCloseWrite(rc); err != nil {
		t.Fatal(err)
	}
	_ = b.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := b.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("the peer read %d, %v after the raw shutdown; want EOF", n, err)
	}
	if _, err := b.Write([]byte("still open")); err != nil {
		t.Fatal(err)
	}
	_ = a.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 16)
	if n, err := io.ReadAtLeast(a, buf, len("still open")); err != nil || string(buf[:n]) != "still open" {
		t.Fatalf("the shut-down side read %q, %v", buf[:n], err)
	}
	a.Close()
	if err := rawCloseWrite(rc); err == nil {
		t.Error("a raw shutdown of a closed socket succeeded")
	}
}
