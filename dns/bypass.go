package dns

import (
	"context"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"time"

	D "github.com/miekg/dns"
)

// DirectResolver finds the real addresses of a name whose flows, and flows
// to each of those addresses, mihomo's rules send to the literal DIRECT
// adapter for certain. engine.Engine satisfies it. ok false (with why) means
// "answer as usual"; ok with no addresses means the name has none of qtype.
type DirectResolver interface {
	ResolveDirect(ctx context.Context, name string, qtype uint16) (addrs []netip.Addr, ttl uint32, ok bool, why string)
}

// BypassSet is the kernel's set of destinations forwarded without tpgw, each
// with its own timeout. netcfg.DNSBypassSet satisfies it.
type BypassSet interface {
	Add(addrs []netip.Addr, timeout time.Duration) error
	Flush() error
}

// How long an address stays in the bypass set: the answer's TTL clamped to
// [BypassMinTTL, BypassMaxTTL], plus BypassGrace, so that a client that
// connects at the very end of the TTL (or whose clock runs a little behind)
// still goes past tpgw. Clients get at most BypassMaxTTL as TTL. A connection
// that started while its address was in the set stays in the kernel after
// the address expires (netcfg labels it).
const (
	BypassMinTTL = time.Minute
	BypassMaxTTL = time.Hour
	BypassGrace  = 5 * time.Minute
)

// Bypass is the DNS-driven kernel bypass (tpgw.dns-bypass). It is an Engine
// in front of the engine: A and AAAA queries for names that are DIRECT for
// certain get their real addresses, which are first put into the kernel's
// bypass set; every other query, and any of these when something fails, goes
// to the engine as before (a fake IP). See doc.go.
type Bypass struct {
	eng    Engine
	direct DirectResolver
	set    BypassSet
	log    *slog.Logger
	now    func() time.Time

	mu sync.Mutex
	// gen counts Flushes: an answer decided under the rules before a
	// reload must not put its addresses into the set after it.
	gen uint64
	// until is when each address leaves the kernel set, as this process
	// last put it there: an address with enough time left is not re-added,
	// so a name asked often costs no netlink message per query.
	until     map[netip.Addr]time.Time
	pruneSize int
}

// NewBypass puts the bypass in front of eng.
func NewBypass(eng Engine, direct DirectResolver, set BypassSet, log *slog.Logger) *Bypass {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Bypass{eng: eng, direct: direct, set: set, log: log.With("part", "dns-bypass"), now: time.Now,
		until: map[netip.Addr]time.Time{}, pruneSize: 1024}
}

// ServeDNS answers q with real addresses when the name may bypass tpgw, or
// hands it to the engine.
func (b *Bypass) ServeDNS(ctx context.Context, q *D.Msg) (*D.Msg, error) {
	if len(q.Question) != 1 {
		return b.eng.ServeDNS(ctx, q)
	}
	qq := q.Question[0]
	if qq.Qclass != D.ClassINET || (qq.Qtype != D.TypeA && qq.Qtype != D.TypeAAAA) {
		return b.eng.ServeDNS(ctx, q)
	}
	b.mu.Lock()
	gen := b.gen
	b.mu.Unlock()
	addrs, ttl, ok, why := b.direct.ResolveDirect(ctx, qq.Name, qq.Qtype)
	if !ok {
		b.log.Debug("fake-ip answer", "name", qq.Name, "type", D.TypeToString[qq.Qtype], "why", why)
		return b.eng.ServeDNS(ctx, q)
	}
	// Only what the answer holds goes into the set: an IPv4 address
	// (unmapped from an AAAA record of ::ffff:a.b.c.d) has no place in
	// an AAAA answer.
	addrs = slices.DeleteFunc(slices.Clone(addrs), func(a netip.Addr) bool { return a.Is4() != (qq.Qtype == D.TypeA) })
	if err := b.add(gen, addrs, ttl); err != nil {
		b.log.Warn("bypass set not updated; fake-ip answer", "name", qq.Name, "addrs", addrs, "err", err)
		return b.eng.ServeDNS(ctx, q)
	}
	b.log.Debug("real answer, kernel bypass", "name", qq.Name, "type", D.TypeToString[qq.Qtype], "addrs", addrs, "ttl", ttl)
	return realAnswer(q, addrs, min(ttl, uint32(BypassMaxTTL/time.Second))), nil
}

// BypassChecker is a DirectResolver that can tell, without the network, a
// name ResolveDirect would certainly not answer with real addresses.
// engine.Engine satisfies it.
type BypassChecker interface {
	MayBypass(name string, qtype uint16) bool
}

// NewInstant makes the bypass an InstantEngine when its engine is one and
// its DirectResolver a BypassChecker: a query that may bypass tpgw waits for
// a worker (ResolveDirect asks a nameserver); any other goes to the engine's
// instant answers. Without those, serve answers nothing at once.
func (b *Bypass) NewInstant() (serve func(*D.Msg) (*D.Msg, bool, bool), settle func()) {
	ie, ok := b.eng.(InstantEngine)
	bc, ok2 := b.direct.(BypassChecker)
	if !ok || !ok2 {
		return func(*D.Msg) (*D.Msg, bool, bool) { return nil, false, false }, func() {}
	}
	inner, settle := ie.NewInstant()
	serve = func(q *D.Msg) (*D.Msg, bool, bool) {
		if len(q.Question) != 1 {
			return nil, false, false
		}
		qq := q.Question[0]
		if qq.Qclass == D.ClassINET && (qq.Qtype == D.TypeA || qq.Qtype == D.TypeAAAA) && bc.MayBypass(qq.Name, qq.Qtype) {
			return nil, false, false
		}
		return inner(q)
	}
	return serve, settle
}

// errReloaded: the rules changed while the answer was being decided.
type errReloaded struct{}

func (errReloaded) Error() string { return "rules reloaded while deciding" }

// add puts addrs into the set for ttl (clamped) plus the grace, unless they
// are there for long enough already.
func (b *Bypass) add(gen uint64, addrs []netip.Addr, ttl uint32) error {
	d := time.Duration(ttl) * time.Second
	timeout := min(max(d, BypassMinTTL), BypassMaxTTL) + BypassGrace
	b.mu.Lock()
	defer b.mu.Unlock()
	if gen != b.gen {
		return errReloaded{}
	}
	now := b.now()
	// Enough left: the client's TTL (at most timeout-grace) ends before
	// the address leaves the set, with half the grace to spare.
	enough := now.Add(timeout - BypassGrace/2)
	var need []netip.Addr
	for _, a := range addrs {
		if b.until[a].Before(enough) {
			need = append(need, a)
		}
	}
	if len(need) == 0 {
		return nil
	}
	if err := b.set.Add(need, timeout); err != nil {
		return err
	}
	for _, a := range need {
		b.until[a] = now.Add(timeout)
	}
	if len(b.until) > b.pruneSize {
		for a, t := range b.until {
			if t.Before(now) {
				delete(b.until, a)
			}
		}
		b.pruneSize = max(1024, 2*len(b.until))
	}
	return nil
}

// Flush empties the kernel set, for a reload: the rules that let the
// addresses in may have changed. Call it after the engine has the new rules.
func (b *Bypass) Flush() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.gen++
	clear(b.until)
	return b.set.Flush()
}

// realAnswer is the reply to q with addrs as A or AAAA records.
func realAnswer(q *D.Msg, addrs []netip.Addr, ttl uint32) *D.Msg {
	r := new(D.Msg)
	r.SetReply(q)
	r.RecursionAvailable = true
	qq := q.Question[0]
	for _, a := range addrs {
		hdr := D.RR_Header{Name: qq.Name, Rrtype: qq.Qtype, Class: D.ClassINET, Ttl: ttl}
		if qq.Qtype == D.TypeA && a.Is4() {
			r.Answer = append(r.Answer, &D.A{Hdr: hdr, A: a.AsSlice()})
		} else if qq.Qtype == D.TypeAAAA && a.Is6() {
			r.Answer = append(r.Answer, &D.AAAA{Hdr: hdr, AAAA: a.AsSlice()})
		}
	}
	return r
}
