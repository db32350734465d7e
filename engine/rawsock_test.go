package engine

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"
	"unsafe"

	"github.com/metacubex/mihomo/adapter"
	"github.com/metacubex/mihomo/adapter/outbound"
	"github.com/metacubex/mihomo/config"
	C "github.com/metacubex/mihomo/constant"
	"github.com/metacubex/mihomo/transport/socks5"
	"github.com/metacubex/mihomo/tunnel"
	"github.com/metacubex/sing/common/bufio"
	SN "github.com/metacubex/sing/common/network"
)

// rawPair returns a loopback connection whose first end is a rawTCPConn.
func rawPair(t *testing.T) (*rawTCPConn, net.Conn) {
	t.Helper()
	a, b := tcpPair(t)
	return newRawTCPConn(a.(*net.TCPConn)), b
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	r := rand.NewChaCha8([32]byte{1})
	r.Read(b)
	return b
}

// TestRawConnMovesBytes writes and reads more than the socket buffers hold
// through a rawTCPConn, so that its writes wait for room and its reads for
// data, and checks every byte and the EOF after the peer's FIN.
func TestRawConnMovesBytes(t *testing.T) {
	rc, peer := rawPair(t)
	rc.SetDeadline(time.Now().Add(20 * time.Second))
	peer.SetDeadline(time.Now().Add(20 * time.Second))
	up, down := randomBytes(16<<20), randomBytes(16<<20)

	got := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(peer) // until rc's CloseWrite
		got <- b
	}()
	go func() {
		peer.Write(down)
		peer.(*net.TCPConn).CloseWrite()
	}()
	errc := make(chan error, 1)
	go func() {
		n, err := rc.Write(up)
		if err == nil && n != len(up) {
			err = io.ErrShortWrite
		}
		if err == nil {
			err = rc.CloseWrite()
		}
		errc <- err
	}()
	var in bytes.Buffer
	buf := make([]byte, 20000) // not a multiple of anything the kernel uses
	for {
		n, err := rc.Read(buf)
		in.Write(buf[:n])
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("read after %d bytes: %v", in.Len(), err)
		}
	}
	if err := <-errc; err != nil {
		t.Fatalf("write: %v", err)
	}
	if !bytes.Equal(in.Bytes(), down) {
		t.Fatalf("read %d bytes, not the %d the peer sent", in.Len(), len(down))
	}
	if b := <-got; !bytes.Equal(b, up) {
		t.Fatalf("peer read %d bytes, not the %d written", len(b), len(up))
	}
	if n, err := rc.Read(nil); n != 0 || err != nil {
		t.Fatalf("empty read: %d, %v", n, err)
	}
}

// TestRawConnDeadlineAndClose: a read past its deadline fails as Go's does
// (os.ErrDeadlineExceeded, a timeout), and Close ends a waiting read with
// net.ErrClosed.
func TestRawConnDeadlineAndClose(t *testing.T) {
	rc, _ := rawPair(t)
	rc.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	_, err := rc.Read(make([]byte, 10))
	var ne net.Error
	if !errors.Is(err, os.ErrDeadlineExceeded) || !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("read past the deadline: %v", err)
	}
	rc.SetReadDeadline(time.Time{})
	errc := make(chan error, 1)
	go func() {
		_, err := rc.Read(make([]byte, 10))
		errc <- err
	}()
	time.Sleep(50 * time.Millisecond)
	rc.Close()
	select {
	case err := <-errc:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("read ended by Close: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not end the waiting read")
	}
	if _, err := rc.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("write after Close: %v", err)
	}
}

// TestRawReadWaiter: sing's copy loop reads a rawTCPConn, and the client's
// side of a flow (lazySpliceConn under mihomo's BufferedConn), with tpgw's
// raw read waiter, and copies every byte.
func TestRawReadWaiter(t *testing.T) {
	rc, peer := rawPair(t)
	if w, ok := bufio.CreateReadWaiter(rc); !ok || reflect.TypeOf(w) != reflect.TypeFor[*rawReadWaiter]() {
		t.Fatalf("read waiter of a rawTCPConn: %T", w)
	}
	_, inbound := tcpPair(t)
	if w, ok := bufio.CreateReadWaiter(lazySplice(inbound.(*net.TCPConn))); !ok || reflect.TypeOf(w) != reflect.TypeFor[*rawReadWaiter]() {
		t.Fatalf("read waiter of a flow's client side: %T", w)
	}

	data := randomBytes(8 << 20)
	go func() {
		peer.Write(data)
		peer.Close()
	}()
	var out bytes.Buffer
	rc.SetDeadline(time.Now().Add(20 * time.Second))
	n, err := bufio.Copy(&out, rc)
	if err != nil || n != int64(len(data)) || !bytes.Equal(out.Bytes(), data) {
		t.Fatalf("copy: %d of %d bytes, %v", n, len(data), err)
	}
}

// dialerOf reads an outbound's dialer as rawOutboundSockets finds it.
func dialerOf(t *testing.T, p C.Proxy) C.Dialer {
	t.Helper()
	base := rawCapableBase(p.Adapter())
	if base == nil {
		return nil
	}
	f := reflect.ValueOf(base).Elem().FieldByName("dialer")
	return *(*C.Dialer)(unsafe.Pointer(f.UnsafeAddr()))
}

// TestRawOutboundSockets: shadowsocks, socks5, http, vmess and trojan
// outbounds get raw sockets, once; vless (its vision flow splices the
// *net.TCPConn underneath) and DIRECT keep theirs. The running engine's socks5
// outbound (testConfig) got one when it started.
func TestRawOutboundSockets(t *testing.T) {
	var ps []C.Proxy
	for _, m := range []map[string]any{
		{"name": "ss", "type": "ss", "server": "127.0.0.1", "port": 8388, "cipher": "chacha20-ietf-poly1305", "password": "x"},
		{"name": "s5", "type": "socks5", "server": "127.0.0.1", "port": 1080},
		{"name": "h", "type": "http", "server": "127.0.0.1", "port": 3128},
		{"name": "vm", "type": "vmess", "server": "127.0.0.1", "port": 10086, "uuid": "b831381d-6324-4d53-ad4f-8cda48b30811", "alterId": 0, "cipher": "auto"},
		{"name": "tj", "type": "trojan", "server": "127.0.0.1", "port": 443, "password": "x"},
		{"name": "vl", "type": "vless", "server": "127.0.0.1", "port": 443, "uuid": "b831381d-6324-4d53-ad4f-8cda48b30811", "flow": "xtls-rprx-vision", "tls": true},
	} {
		p, err := adapter.ParseProxy(m)
		if err != nil {
			t.Fatal(err)
		}
		ps = append(ps, p)
	}
	ps = append(ps, adapter.NewProxy(outbound.NewDirect()))
	if n := rawOutboundSockets(ps); n != 5 {
		t.Fatalf("%d outbounds changed, want 5 (ss, socks5, http, vmess, trojan)", n)
	}
	for _, p := range ps[:5] {
		if _, ok := dialerOf(t, p).(rawDialer); !ok {
			t.Errorf("%s: dialer %T, want rawDialer", p.Name(), dialerOf(t, p))
		}
	}
	if n := rawOutboundSockets(ps); n != 0 {
		t.Fatalf("second pass changed %d outbounds", n)
	}
	if _, ok := dialerOf(t, tunnel.Proxies()["nowhere"]).(rawDialer); !ok {
		t.Fatalf("the engine's socks5 outbound: dialer %T, want rawDialer", dialerOf(t, tunnel.Proxies()["nowhere"]))
	}
}

// TestRawSocks5Outbound relays through mihomo's socks5 outbound with a raw
// socket to a socks5 server in this process: bytes both ways, more than the
// socket buffers hold, and the half-close.
func TestRawSocks5Outbound(t *testing.T) {
	dst := serveOne(t, func(c net.Conn) {
		c.SetDeadline(time.Now().Add(20 * time.Second))
		b, _ := io.ReadAll(c) // until the client's FIN
		c.Write(b)            // echoed after it
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	served := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		served <- c
		defer c.Close()
		addr, _, _, err := socks5.ServerHandshake(c, nil)
		if err != nil {
			return
		}
		up, err := net.Dial("tcp", addr.String())
		if err != nil {
			return
		}
		defer up.Close()
		// Plain copies: io.Copy between two TCPConns would splice through
		// Go's pool of pipes, which outlive the test and move the pipe
		// counts of the splice tests.
		go func() {
			copyPlain(up, c)
			up.(*net.TCPConn).CloseWrite()
		}()
		copyPlain(c, up)
	}()

	port := ln.Addr().(*net.TCPAddr).Port
	p, err := adapter.ParseProxy(map[string]any{"name": "s5", "type": "socks5", "server": "127.0.0.1", "port": port})
	if err != nil {
		t.Fatal(err)
	}
	if n := rawOutboundSockets([]C.Proxy{p}); n != 1 {
		t.Fatalf("socks5 outbound not changed")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	md := &C.Metadata{NetWork: C.TCP, DstIP: dst.Addr(), DstPort: dst.Port()}
	c, err := p.DialContext(ctx, md)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	data := randomBytes(8 << 20)
	go func() {
		c.Write(data)
		SN.CloseWrite(c) // as sing's relay does: down to the socket
	}()
	got, err := io.ReadAll(c)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("echo through socks5: %d of %d bytes, %v", len(got), len(data), err)
	}
	select {
	case <-served:
	default:
		t.Fatal("the socks5 server saw no connection")
	}
}

func copyPlain(dst io.Writer, src io.Reader) {
	io.CopyBuffer(struct{ io.Writer }{dst}, struct{ io.Reader }{src}, make([]byte, 32<<10))
}

// TestRawProviderSockets: the outbounds a proxy provider loads from its file
// (as from a subscription) get raw sockets, also those of a later update.
func TestRawProviderSockets(t *testing.T) {
	// mihomo takes provider files only from under its home directory
	// (process-wide; other tests move it too).
	home := C.Path.HomeDir()
	C.SetHomeDir(t.TempDir())
	t.Cleanup(func() { C.SetHomeDir(home) })
	path := filepath.Join(C.Path.HomeDir(), "sub.yaml")
	write := func(port int) {
		t.Helper()
		body := fmt.Sprintf("proxies:\n  - {name: sub-ss, type: ss, server: 127.0.0.1, port: %d, cipher: chacha20-ietf-poly1305, password: x}\n", port)
		if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(8388)
	raw, err := config.UnmarshalRawConfig([]byte(fmt.Sprintf(`
proxy-providers:
  sub:
    type: file
    path: %s
    health-check: {enable: false}
rules:
  - MATCH,DIRECT
`, path)))
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := config.ParseRawConfig(raw)
	if err != nil {
		t.Fatal(err)
	}
	pv := cfg.Providers["sub"]
	if n := rawProviderSockets(cfg.Providers); n != 1 {
		t.Fatalf("%d providers changed, want 1", n)
	}
	if err := pv.Initial(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if c, ok := pv.(io.Closer); ok {
			c.Close() // its file watcher
		}
	})
	check := func(when string) {
		t.Helper()
		ps := pv.Proxies()
		if len(ps) != 1 {
			t.Fatalf("%s: provider holds %d proxies", when, len(ps))
		}
		if _, ok := dialerOf(t, ps[0]).(rawDialer); !ok {
			t.Fatalf("%s: the provider's ss outbound has dialer %T, want rawDialer", when, dialerOf(t, ps[0]))
		}
	}
	check("loaded")
	// mihomo watches a file provider's file and loads it again when it
	// changes, as it does a subscription on its interval.
	write(8389)
	for deadline := time.Now().Add(10 * time.Second); pv.Proxies()[0].Addr() != "127.0.0.1:8389"; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the provider did not load its changed file: proxy %s", pv.Proxies()[0].Addr())
		}
	}
	check("updated")
}
