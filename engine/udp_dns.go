package engine

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"

	D "github.com/miekg/dns"

	"github.com/metacubex/mihomo/component/resolver"
)

// ErrNoDNS is returned by ServeDNS when the mihomo config has no dns block enabled.
var ErrNoDNS = errors.New("engine: dns is not enabled in the mihomo config")

// ServeDNS answers a DNS query the way mihomo's own DNS listener would: with
// a fake IP from mihomo's pool in fake-ip mode (so later connections to it map
// back to the name), real answers for fake-ip-filter names and other types
// through mihomo's resolver (nameserver, policies, cache). A new fake IP of a
// persisted pool is in cache.db or its journal before ServeDNS returns its
// answer.
func (e *Engine) ServeDNS(ctx context.Context, q *D.Msg) (*D.Msg, error) {
	s := resolver.DefaultService
	if s == nil {
		return nil, ErrNoDNS
	}
	r, err := s.ServeMsg(ctx, q)
	if err == nil {
		if err := e.persistAnswer(q, r); err != nil {
			// The answer still goes out, as mihomo's own store would
			// send it; only a restart may forget the mapping.
			e.log.Warn("fake-ip mapping not saved", "err", err)
		}
	}
	return r, err
}

// NewInstant returns serve and settle for a caller that answers DNS queries
// a burst at a time (the DNS server's UDP reader and its settler,
// dns.InstantEngine).
//
// serve answers q as ServeDNS does when mihomo's answer takes nothing but
// memory: an A or AAAA query in fake-ip mode for a name fake-ip-filter
// does not skip (a fake IP, or a hosts entry). Everything else, ok false,
// goes to ServeDNS. mihomo gets a context that is already canceled: were
// its handler to ask upstream after all (a config swapped by a reload
// between the check and the call), it gives up at once, and serve says no
// instead of holding the reader up.
//
// serve says an answer is unsettled when it carries a mapping cache.db and
// its journal do not have yet. settle writes the new fake-ip mappings of the
// answers serve returned before it was called, in one journal write (shared
// with ServeDNS's callers), and returns once they are written. serve and
// settle may run concurrently.
func (e *Engine) NewInstant() (serve func(*D.Msg) (*D.Msg, bool, bool), settle func()) {
	b := &instantBatch{e: e}
	return b.serve, b.settle
}

// instantBatch is the state of one caller of NewInstant.
type instantBatch struct {
	e       *Engine
	mu      sync.Mutex
	pending []pendingMapping // serve's, for the next settle
	writing []pendingMapping // settle's (settle only)
	run     []mapping        // settle's (settle only)
}

// pendingMapping is a mapping and the writer it goes to: a reload may
// replace the writer between serve and settle.
type pendingMapping struct {
	w *mappingWriter
	m mapping
}

// canceled is an already canceled context (NewInstant).
var canceled = func() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}()

func (b *instantBatch) serve(q *D.Msg) (*D.Msg, bool, bool) {
	s := resolver.DefaultService
	if s == nil || len(q.Question) != 1 {
		return nil, false, false
	}
	if qt := q.Question[0].Qtype; qt != D.TypeA && qt != D.TypeAAAA {
		return nil, false, false
	}
	v := b.e.dnsView.Load()
	if v == nil || !v.fakeIP {
		return nil, false, false
	}
	// The name as mihomo's fake-ip handler asks its skipper.
	if v.skipper != nil && v.skipper.ShouldSkipped(strings.TrimRight(q.Question[0].Name, ".")) {
		return nil, false, false
	}
	r, err := s.ServeMsg(canceled, q)
	if err != nil || r == nil {
		return nil, false, false
	}
	w := liveMappings.Load()
	if w == nil {
		return r, true, false
	}
	var buf [2]mapping
	unsettled := false
	for _, m := range b.e.appendMappings(buf[:0], q, r) {
		if w.has(m) {
			continue
		}
		b.mu.Lock()
		b.pending = append(b.pending, pendingMapping{w, m})
		b.mu.Unlock()
		unsettled = true
	}
	return r, true, unsettled
}

func (b *instantBatch) settle() {
	b.mu.Lock()
	b.writing, b.pending = b.pending, b.writing[:0]
	b.mu.Unlock()
	// In order, a write per writer (one, but across a reload).
	for rest := b.writing; len(rest) > 0; {
		w := rest[0].w
		b.run = b.run[:0]
		for len(rest) > 0 && rest[0].w == w {
			b.run = append(b.run, rest[0].m)
			rest = rest[1:]
		}
		if err := w.writeAll(b.run); err != nil {
			// The answers still go out, as ServeDNS's do.
			b.e.log.Warn("fake-ip mappings not saved", "mappings", len(b.run), "err", err)
		}
	}
	clear(b.writing)
	clear(b.run)
}

// LookupFakeIP returns the name a fake IP stands for, if ip is in the fake-ip
// range and mapped.
func (e *Engine) LookupFakeIP(ip netip.Addr) (string, bool) {
	if !resolver.IsFakeIP(ip) {
		return "", false
	}
	return resolver.FindHostByIP(ip)
}

// HandleUDP hands one TPROXYed datagram to mihomo. It blocks only while
// mihomo's queues for the datagram's source are full, up to udpQueueWait
// for each (udpqueue.go, udpgate.go): mihomo queues it per source, matches rules for a new
// session, and sends replies through reply. reply's from is the address
// the reply must appear to come from; when it is invalid the reply comes
// from the flow's original destination. release is called once mihomo no
// longer needs data (the relay may recycle the buffer then).
func (e *Engine) HandleUDP(src, dst netip.AddrPort, data []byte, reply func(b []byte, from netip.AddrPort) (int, error), release func()) {
	e.queueUDP(&udpPacket{src: src, data: data, reply: reply, release: release, unsent: &e.udpDrops.unsent}, src, dst)
}

// udpPacket adapts a relay datagram to mihomo's C.UDPPacket.
type udpPacket struct {
	src     netip.AddrPort
	data    []byte
	reply   func(b []byte, from netip.AddrPort) (int, error)
	release func()
	// unsent counts the datagrams mihomo drops without reading them (nil:
	// this one is counted elsewhere); read says it has been read, dropped
	// that Drop ran.
	unsent  *atomic.Uint64
	read    atomic.Bool
	dropped atomic.Bool
	// gate counts the datagrams of the session's sender queue; this one is
	// its seq-th (udpgate.go). nil: none.
	gate *senderGate
	seq  uint64
}

func (p *udpPacket) Data() []byte {
	p.read.Store(true)
	if p.gate != nil {
		p.gate.noteRead(p.seq)
	}
	return p.data
}

func (p *udpPacket) WriteBack(b []byte, addr net.Addr) (int, error) {
	var from netip.AddrPort
	switch a := addr.(type) {
	case *net.UDPAddr:
		from = a.AddrPort()
	case nil:
	default:
		if ap, err := netip.ParseAddrPort(a.String()); err == nil {
			from = ap
		}
	}
	if from.IsValid() {
		from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
	}
	return p.reply(b, from)
}

// Drop is mihomo's release of the datagram, once it is sent on or dropped.
// mihomo reads every datagram it sends on (Data); one it releases unread
// was dropped: its session's sender queue (128 datagrams) was full, the
// session was closing, or the destination had no address. (With sniffing
// on, mihomo reads a new session's first datagrams before that queue, so
// such a drop of one of them is not counted.)
func (p *udpPacket) Drop() {
	if !p.dropped.CompareAndSwap(false, true) {
		return
	}
	if p.unsent != nil && !p.read.Load() {
		p.unsent.Add(1)
	}
	if p.gate != nil {
		p.gate.noteReleased()
	}
	if p.release != nil {
		p.release()
		p.release = nil
	}
	p.data = nil
}

func (p *udpPacket) LocalAddr() net.Addr { return net.UDPAddrFromAddrPort(p.src) }

// InHosts reports whether mihomo's hosts (the config's hosts, and the
// system's with use-system-hosts) has name, which mihomo's DNS then answers.
func (e *Engine) InHosts(name string) bool {
	_, ok := resolver.DefaultHosts.Search(name, false)
	return ok
}
