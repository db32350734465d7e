package engine

import (
	"context"
	"io"
	"net"
	"os"
	"reflect"
	"sync"
	"syscall"
	"unsafe"

	"github.com/metacubex/mihomo/adapter/outbound"
	"github.com/metacubex/mihomo/component/resource"
	"github.com/metacubex/mihomo/config"
	C "github.com/metacubex/mihomo/constant"
	P "github.com/metacubex/mihomo/constant/provider"
	"github.com/metacubex/sing/common/buf"
	E "github.com/metacubex/sing/common/exceptions"
	SN "github.com/metacubex/sing/common/network"
	"golang.org/x/sys/unix"
)

// Raw socket I/O for relays that are not spliced (an encrypting outbound
// such as shadowsocks): reads and writes of the sockets on both sides are
// raw system calls on their non-blocking descriptors, waiting in Go's poller
// when the socket is empty or full, like tpgw's own DIRECT relay
// (splice.go).
//
// Why: Go's read and write enter the scheduler around the system call
// (entersyscall). On veths and loopback a write carries the receiver's whole
// receive path in the writer's context, so a write often lasts longer than
// the 20 µs after which Go's monitor thread (sysmon) takes the P of a busy
// process away from a thread in a system call and hands it to another
// thread; every such hand-off keeps sysmon waking every 20 µs. During the
// bench's shadowsocks rows sysmon alone took 11.5% of tpgw's CPU (perf),
// 0.35% with raw calls. A raw call holds its P for the call's length (the
// other P takes the goroutines waiting meanwhile): what runs then is the
// relay's own work.

// rawTCPConn is a TCP connection whose Read and Write are raw system calls.
// One goroutine may read while another writes; concurrent reads (or
// concurrent writes) are serialized.
type rawTCPConn struct {
	*net.TCPConn
	raw syscall.RawConn

	rmu    sync.Mutex
	rbuf   []byte
	rn     int
	rerr   error
	readFn func(fd uintptr) bool

	wmu     sync.Mutex
	wbuf    []byte
	wn      int
	werr    error
	writeFn func(fd uintptr) bool
}

// newRawTCPConn wraps c, a connection (SyscallConn fails only for a nil
// *net.TCPConn).
func newRawTCPConn(c *net.TCPConn) *rawTCPConn {
	raw, _ := c.SyscallConn()
	r := &rawTCPConn{TCPConn: c, raw: raw}
	r.readFn = r.readOnce
	r.writeFn = r.writeSome
	return r
}

func (c *rawTCPConn) Read(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	c.rmu.Lock()
	defer c.rmu.Unlock()
	c.rbuf, c.rn, c.rerr = b, 0, nil
	err := c.raw.Read(c.readFn)
	c.rbuf = nil
	if err != nil {
		return 0, c.opError("read", err)
	}
	if c.rerr != nil {
		return 0, c.opError("read", os.NewSyscallError("read", c.rerr))
	}
	if c.rn == 0 {
		return 0, io.EOF
	}
	return c.rn, nil
}

func (c *rawTCPConn) readOnce(fd uintptr) bool {
	c.rn, c.rerr = rawRead(int(fd), c.rbuf)
	return c.rerr != unix.EAGAIN
}

func (c *rawTCPConn) Write(b []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.wbuf, c.wn, c.werr = b, 0, nil
	err := c.raw.Write(c.writeFn)
	n := c.wn
	c.wbuf = nil
	if err == nil && c.werr != nil {
		err = os.NewSyscallError("write", c.werr)
	}
	if err != nil {
		return n, c.opError("write", err)
	}
	return n, nil
}

// writeSome writes what is left of wbuf: false (wait) when the socket's
// send buffer is full before all of it went.
func (c *rawTCPConn) writeSome(fd uintptr) bool {
	n, err := rawWriteAll(int(fd), c.wbuf[c.wn:])
	c.wn += n
	if err == unix.EAGAIN {
		return false
	}
	c.werr = err
	return true
}

func (c *rawTCPConn) opError(op string, err error) error {
	if _, ok := err.(*net.OpError); ok {
		return err
	}
	return &net.OpError{Op: op, Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: err}
}

// CreateReadWaiter gives sing's copy loop a read waiter that reads with raw
// calls; without it sing reaches the descriptor through syscall.Conn and
// reads with Go's syscall.Read.
func (c *rawTCPConn) CreateReadWaiter() (SN.ReadWaiter, bool) {
	return newRawReadWaiter(c.raw), true
}

// rawReadWaiter is sing's read waiter (a buffer taken only once the socket
// is readable) with a raw read.
type rawReadWaiter struct {
	raw    syscall.RawConn
	opts   SN.ReadWaitOptions
	buffer *buf.Buffer
	err    error
	fn     func(fd uintptr) bool
}

func newRawReadWaiter(raw syscall.RawConn) *rawReadWaiter {
	w := &rawReadWaiter{raw: raw}
	w.fn = w.readOnce
	return w
}

func (w *rawReadWaiter) InitializeReadWaiter(opts SN.ReadWaitOptions) (needCopy bool) {
	w.opts = opts
	return false
}

func (w *rawReadWaiter) readOnce(fd uintptr) bool {
	b := w.opts.NewBuffer()
	n, err := rawRead(int(fd), b.FreeBytes())
	if err == unix.EAGAIN {
		b.Release()
		return false
	}
	switch {
	case err != nil:
		b.Release()
		w.err = err
	case n == 0:
		b.Release()
		w.err = io.EOF
	default:
		b.Truncate(n)
		w.opts.PostReturn(b)
		w.buffer = b
	}
	return true
}

func (w *rawReadWaiter) WaitReadBuffer() (*buf.Buffer, error) {
	w.buffer, w.err = nil, nil
	if err := w.raw.Read(w.fn); err != nil {
		return nil, err
	}
	if w.err != nil {
		if w.err == io.EOF {
			return nil, io.EOF
		}
		return nil, E.Cause(w.err, "raw read")
	}
	b := w.buffer
	w.buffer = nil
	return b, nil
}

// rawDialer wraps an outbound's dialer: the TCP connections it makes are
// rawTCPConns.
type rawDialer struct{ C.Dialer }

func (d rawDialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	c, err := d.Dialer.DialContext(ctx, network, address)
	if err != nil {
		return nil, err
	}
	if tc, ok := c.(*net.TCPConn); ok {
		return newRawTCPConn(tc), nil
	}
	return c, nil
}

// rawOutboundSockets gives the outbounds among proxies whose TCP
// connection carries a stream tpgw's relay reads and writes through them
// (shadowsocks, vmess, trojan, socks5, http) a rawDialer, and returns how
// many it changed. Other outbounds keep their dialers: some look for the
// *net.TCPConn under their connection (vless's vision splice), others run
// over UDP. mihomo keeps an outbound's dialer in an unexported field of its
// Base; if this mihomo version has no field of that type there, the
// outbound is left as it is.
func rawOutboundSockets(proxies []C.Proxy) int {
	n := 0
	for _, p := range proxies {
		base := rawCapableBase(p.Adapter())
		if base == nil {
			continue
		}
		f := reflect.ValueOf(base).Elem().FieldByName("dialer")
		if !f.IsValid() || f.Type() != reflect.TypeFor[C.Dialer]() {
			continue
		}
		d := (*C.Dialer)(unsafe.Pointer(f.UnsafeAddr()))
		if *d == nil {
			continue
		}
		if _, done := (*d).(rawDialer); done {
			continue
		}
		*d = rawDialer{*d}
		n++
	}
	return n
}

// rawCapableBase returns the Base of a shadowsocks, vmess, trojan, socks5 or
// http outbound.
func rawCapableBase(a C.ProxyAdapter) *outbound.Base {
	switch o := unwrapAdapter(a).(type) {
	case *outbound.ShadowSocks:
		return o.Base
	case *outbound.Vmess:
		return o.Base
	case *outbound.Trojan:
		return o.Base
	case *outbound.Socks5:
		return o.Base
	case *outbound.Http:
		return o.Base
	}
	return nil
}

// configProxies lists cfg's proxies and those its providers hold before
// mihomo applies the config (inline ones, a provider's fallback payload).
// Those a provider loads later, from a file or a subscription, get theirs in
// the provider's parser (rawProviderSockets): their dialers are in use as
// soon as the provider publishes them, and changing one then would race
// with its readers.
func configProxies(cfg *config.Config) []C.Proxy {
	var ps []C.Proxy
	for _, p := range cfg.Proxies {
		ps = append(ps, p)
	}
	for _, pv := range cfg.Providers {
		ps = append(ps, pv.Proxies()...)
	}
	return ps
}

// unwrapAdapter returns the outbound under mihomo's wrappers of it (the
// adapter that closes the outbound once it is unused): structs whose
// embedded ProxyAdapter holds it.
func unwrapAdapter(a C.ProxyAdapter) C.ProxyAdapter {
	for range 4 {
		v := reflect.ValueOf(a)
		if v.Kind() != reflect.Pointer || v.Elem().Kind() != reflect.Struct {
			return a
		}
		f := v.Elem().FieldByName("ProxyAdapter")
		if !f.IsValid() || f.Kind() != reflect.Interface || f.IsNil() || !f.CanInterface() {
			return a
		}
		inner, ok := f.Interface().(C.ProxyAdapter)
		if !ok {
			return a
		}
		a = inner
	}
	return a
}

// rawProviderSockets wraps the parser of each proxy provider (mihomo's
// resource.Fetcher keeps it in an unexported field), so that the outbounds
// the provider loads from a file or a subscription, now or on a later
// update, get raw sockets before the provider publishes them. It returns how
// many providers it changed; one of another shape is left as it is.
func rawProviderSockets(providers map[string]P.ProxyProvider) int {
	n := 0
	for _, pv := range providers {
		v := reflect.ValueOf(pv)
		if v.Kind() != reflect.Pointer || v.IsNil() || v.Elem().Kind() != reflect.Struct {
			continue
		}
		fv, ok := fieldByName(v.Elem(), "Fetcher")
		if !ok || fv.Type() != reflect.TypeFor[*resource.Fetcher[[]C.Proxy]]() || fv.IsNil() {
			continue
		}
		pf := reflect.ValueOf((*resource.Fetcher[[]C.Proxy])(unsafe.Pointer(fv.Pointer()))).Elem().FieldByName("parser")
		if !pf.IsValid() || pf.Type() != reflect.TypeFor[resource.Parser[[]C.Proxy]]() {
			continue
		}
		parser := (*resource.Parser[[]C.Proxy])(unsafe.Pointer(pf.UnsafeAddr()))
		inner := *parser
		if inner == nil {
			continue
		}
		*parser = func(b []byte) ([]C.Proxy, error) {
			ps, err := inner(b)
			if err == nil {
				rawOutboundSockets(ps)
			}
			return ps, err
		}
		n++
	}
	return n
}

// fieldByName is v.FieldByName without its panic on a nil embedded pointer.
func fieldByName(v reflect.Value, name string) (f reflect.Value, ok bool) {
	defer func() {
		if recover() != nil {
			f, ok = reflect.Value{}, false
		}
	}()
	f = v.FieldByName(name)
	return f, f.IsValid()
}
