package engine

import (
	"context"
	"errors"
	"net"
	"net/netip"

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

// LookupFakeIP returns the name a fake IP stands for, if ip is in the fake-ip
// range and mapped.
func (e *Engine) LookupFakeIP(ip netip.Addr) (string, bool) {
	if !resolver.IsFakeIP(ip) {
		return "", false
	}
	return resolver.FindHostByIP(ip)
}

// HandleUDP hands one TPROXYed datagram to mihomo. It blocks only while
// mihomo's queue for the datagram's source is full, up to udpQueueWait
// (udpqueue.go): mihomo queues it per source, matches rules for a new
// session, and sends replies through reply. reply's from is the address
// the reply must appear to come from; when it is invalid the reply comes
// from the flow's original destination. release is called once mihomo no
// longer needs data (the relay may recycle the buffer then).
func (e *Engine) HandleUDP(src, dst netip.AddrPort, data []byte, reply func(b []byte, from netip.AddrPort) (int, error), release func()) {
	e.queueUDP(&udpPacket{src: src, data: data, reply: reply, release: release}, src, dst)
}

// udpPacket adapts a relay datagram to mihomo's C.UDPPacket.
type udpPacket struct {
	src     netip.AddrPort
	data    []byte
	reply   func(b []byte, from netip.AddrPort) (int, error)
	release func()
}

func (p *udpPacket) Data() []byte { return p.data }

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

func (p *udpPacket) Drop() {
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
