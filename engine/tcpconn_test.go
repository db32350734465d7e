package engine

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/metacubex/mihomo/tunnel/statistic"
)

// pipeFDs counts this process's open pipe descriptors.
func pipeFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		if l, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && strings.HasPrefix(l, "pipe:") {
			n++
		}
	}
	return n
}

// basePipes is the pipe descriptors open before a test's flow (the test
// binary's stdout and stderr among them), once earlier tests' pipes are
// gone. Go's own splice (io.Copy between two TCPConns, as an echo server in
// a test makes) keeps its pipes in a pool that only the GC empties, closing
// them through finalizers; counted before that, they vanished in the middle
// of the next test's count. It waits, bounded, until the count has held
// still for 100 ms after the pool was emptied.
func basePipes(t *testing.T) int {
	t.Helper()
	runtime.GC()
	runtime.GC() // a pooled pipe survives one GC in the pool's victim cache
	n, since := pipeFDs(t), time.Now()
	for deadline := time.Now().Add(3 * time.Second); time.Since(since) < 100*time.Millisecond && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
		if m := pipeFDs(t); m != n {
			n, since = m, time.Now()
		}
	}
	return n
}

// waitPipes waits (bounded) until the process holds want pipe descriptors
// and returns the last count.
func waitPipes(t *testing.T, want int) int {
	t.Helper()
	n := pipeFDs(t)
	for deadline := time.Now().Add(3 * time.Second); n != want && time.Now().Before(deadline); n = pipeFDs(t) {
		time.Sleep(20 * time.Millisecond)
	}
	return n
}

const bulkSize = 8 << 20

// TestLazySplice relays a DIRECT flow that is first idle, then exchanges a
// few small messages, then downloads in bulk, then uploads many small
// messages. It checks the flow holds no pipe until it is bulk, that the
// bulk download is spliced (a pipe pair appears), that many uploads splice
// the other direction, and that mihomo's statistics count every byte.
func TestLazySplice(t *testing.T) {
	dst := serveOne(t, func(c net.Conn) {
		r := bufio.NewReader(c)
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				return
			}
			switch strings.TrimSpace(line) {
			case "bulk":
				c.Write(make([]byte, bulkSize))
			default:
				c.Write([]byte("ok\n"))
			}
		}
	})

	base := basePipes(t)
	client, inbound := tcpPair(t)
	done := relayAsync(inbound, client, dst)
	client.SetDeadline(time.Now().Add(20 * time.Second))
	br := bufio.NewReader(client)
	exchange := func(n int) {
		t.Helper()
		for range n {
			if _, err := client.Write([]byte("small\n")); err != nil {
				t.Fatal(err)
			}
			if line, err := br.ReadString('\n'); err != nil || line != "ok\n" {
				t.Fatalf("reply %q, %v", line, err)
			}
		}
	}

	time.Sleep(300 * time.Millisecond) // idle: mihomo has dialed and waits for data
	if n := waitPipes(t, base); n != base {
		t.Fatalf("idle flow holds %d pipe descriptors, want 0", n-base)
	}
	exchange(3)
	if n := waitPipes(t, base); n != base {
		t.Fatalf("after 3 small exchanges the flow holds %d pipe descriptors, want 0", n-base)
	}

	if _, err := client.Write([]byte("bulk\n")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.CopyN(io.Discard, br, bulkSize); err != nil {
		t.Fatal(err)
	}
	// The download pipe (2 descriptors) stays for the life of the copy.
	if n := waitPipes(t, base+2); n != base+2 {
		t.Fatalf("after a bulk download the flow holds %d pipe descriptors, want 2 (download spliced)", n-base)
	}

	exchange(12) // small uploads stay chunked
	if n := waitPipes(t, base+2); n != base+2 {
		t.Fatalf("after 15 small uploads the flow holds %d pipe descriptors, want 2 (upload not spliced)", n-base)
	}
	// A bulk upload: one line of bulkSize bytes (the server answers "ok").
	if _, err := client.Write(append(bytes.Repeat([]byte("x"), bulkSize), '\n')); err != nil {
		t.Fatal(err)
	}
	if line, err := br.ReadString('\n'); err != nil || line != "ok\n" {
		t.Fatalf("reply to the bulk upload %q, %v", line, err)
	}
	if n := waitPipes(t, base+4); n != base+4 {
		t.Fatalf("after a bulk upload the flow holds %d pipe descriptors, want 4 (both directions spliced)", n-base)
	}
	exchange(2) // still relays both ways when spliced

	var up, down int64
	statistic.DefaultManager.Range(func(c statistic.Tracker) bool {
		if info := c.Info(); info.Metadata.DstPort == dst.Port() && info.Metadata.DstIP == dst.Addr() {
			up, down = info.UploadTotal.Load(), info.DownloadTotal.Load()
		}
		return true
	})
	wantUp := int64(len("small\n")*17 + len("bulk\n") + bulkSize + 1)
	wantDown := int64(len("ok\n")*18 + bulkSize)
	if up != wantUp || down != wantDown {
		t.Errorf("mihomo statistics: upload %d, download %d; want %d, %d", up, down, wantUp, wantDown)
	}

	client.Close()
	waitDone(t, done)
	if n := waitPipes(t, base); n != base {
		t.Errorf("after the flow ended %d pipe descriptors are left", n-base)
	}
}

// TestPeekedBytesThenRelay: the client's first bytes are there before
// mihomo looks (its peek reads them into the BufferedConn's reader, which
// the relay then drains and drops); the flow must still relay every byte
// both ways, and the wrapper must not touch the dropped reader.
func TestPeekedBytesThenRelay(t *testing.T) {
	dst := serveOne(t, func(c net.Conn) { io.Copy(c, c) }) // echo until the client's FIN
	client, inbound := tcpPair(t)
	first := strings.Repeat("first bytes, sent before the relay starts; ", 20)
	if _, err := client.Write([]byte(first)); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond) // in inbound's receive queue before mihomo peeks
	done := relayAsync(inbound, client, dst)
	client.SetDeadline(time.Now().Add(10 * time.Second))
	more := strings.Repeat("x", 64<<10)
	if _, err := client.Write([]byte(more)); err != nil {
		t.Fatal(err)
	}
	client.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(client)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != first+more {
		t.Fatalf("echo: got %d bytes, want %d", len(got), len(first)+len(more))
	}
	waitDone(t, done)
}
