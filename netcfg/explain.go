package netcfg

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
)

// Flow is one new flow as it reaches the gateway's prerouting hook: the first
// packet of a connection (TCP) or session (UDP), before tpgw has seen it.
type Flow struct {
	Proto   string // "tcp" or "udp"
	Src     netip.AddrPort
	Dst     netip.AddrPort
	InIface string // input interface name
	Mark    uint32 // packet mark on arrival: 0 for a LAN flow
}

// Outcome is what the kernel does with a Flow at our prerouting hook.
type Outcome uint8

// Outcomes of Plan.Explain.
const (
	// OutcomeNotIntercepted: our chains leave the packet alone and the kernel
	// routes it as usual (forwarded, or delivered to the gateway itself).
	OutcomeNotIntercepted Outcome = iota
	// OutcomeTProxy: the packet goes to tpgw's transparent socket on Explanation.Port.
	OutcomeTProxy
	// OutcomeDrop: a rule drops the packet.
	OutcomeDrop
	// OutcomeAccept: a rule accepts the packet without tproxy (it is routed as usual, maybe marked).
	OutcomeAccept
	// OutcomeUnknown: a match could not be evaluated offline; see Explanation.Unknown.
	OutcomeUnknown
)

// Step is one rule on the path of a flow: Index is 1-based within Chain, as a
// person counts the lines of `tpgw rules`.
type Step struct {
	Chain string
	Index int
	Rule  Rule
}

func (s Step) where() string { return fmt.Sprintf("rule %d of chain %s", s.Index, s.Chain) }

// Explanation is the result of walking the plan's prerouting chain for a Flow.
type Explanation struct {
	Outcome Outcome
	// Rule decides the outcome; nil when the base chain ran out of rules.
	Rule *Step
	// Path is every rule that matched, in order: the jumps, then Rule.
	Path []Step
	// Port is the TPROXY port (OutcomeTProxy).
	Port uint16
	// Unknown is the match that could not be evaluated (OutcomeUnknown).
	Unknown Match
	// LocalDst: the destination is an address of the gateway itself, so a
	// packet that is not intercepted is delivered locally rather than forwarded.
	LocalDst bool
	// IfDown is what happens instead when nothing listens on Port (tpgw is not
	// running but its rules are in place): nft's tproxy then falls through to
	// the next rule, which is where the on-failure policy is decided. Set only
	// for OutcomeTProxy.
	IfDown *Explanation
}

func (e Explanation) String() string {
	switch e.Outcome {
	case OutcomeTProxy:
		return fmt.Sprintf("intercepted — TPROXY to :%d (rule %q, chain %s)", e.Port, e.Rule.Rule.Comment, e.Rule.Chain)
	case OutcomeDrop:
		return fmt.Sprintf("dropped: %s (%s)", e.Rule.Rule.Comment, e.Rule.where())
	case OutcomeAccept:
		return fmt.Sprintf("accepted: %s (%s) — the kernel routes it as usual", e.Rule.Rule.Comment, e.Rule.where())
	case OutcomeUnknown:
		return fmt.Sprintf("cannot evaluate %s (%s)", e.Unknown, e.Rule.where())
	}
	usual := "the kernel forwards it as usual"
	if e.LocalDst {
		usual = "the kernel delivers it to the gateway itself"
	}
	if e.Rule == nil {
		return "not intercepted: no rule of chain " + ChainName + " sends it to tpgw — " + usual
	}
	return fmt.Sprintf("not intercepted: %s (%s) — %s", e.Rule.Rule.Comment, e.Rule.where(), usual)
}

// Explain says what the plan's prerouting chain does with f, as the kernel
// would: rules in order, jumps followed, the first terminal verdict wins.
// local lists the gateway's own addresses (fib daddr type local); loopback
// addresses are always local. It has no side effects and needs no root.
func (p *Plan) Explain(f Flow, local []netip.Addr) Explanation {
	w := walker{p: p, f: f, local: local}
	w.f.Src = netip.AddrPortFrom(f.Src.Addr().Unmap(), f.Src.Port())
	w.f.Dst = netip.AddrPortFrom(f.Dst.Addr().Unmap(), f.Dst.Port())
	c := p.Chain(ChainName)
	if c == nil {
		return w.finish(Explanation{Outcome: OutcomeNotIntercepted})
	}
	return w.walk([]frame{{chain: c}}, nil, f.Mark)
}

type walker struct {
	p     *Plan
	f     Flow
	local []netip.Addr
}

// frame is a position in a chain the walk will come back to after a jump.
type frame struct {
	chain *Chain
	next  int // 0-based index of the next rule to evaluate
}

func (w *walker) finish(e Explanation) Explanation {
	e.LocalDst = w.isLocal(w.f.Dst.Addr())
	return e
}

// walk evaluates rules from the top of stack on; path holds the rules matched
// so far and mark the packet mark at this point.
func (w *walker) walk(stack []frame, path []Step, mark uint32) Explanation {
	// A return from a regular chain goes back to the caller, which goes on
	// with its next rule; when nothing after it decides, that return is why
	// the packet was left alone.
	var returned *Step
	for len(stack) > 0 {
		top := &stack[len(stack)-1]
		if top.next >= len(top.chain.Rules) {
			// End of a regular chain: back to the caller. End of the base
			// chain: its policy (accept) applies and the packet goes on.
			stack = stack[:len(stack)-1]
			continue
		}
		i := top.next
		top.next++
		r := top.chain.Rules[i]
		step := Step{Chain: top.chain.Name, Index: i + 1, Rule: r}
		ok, unknown := w.matches(r, mark)
		if unknown != nil {
			return w.finish(Explanation{Outcome: OutcomeUnknown, Rule: &step, Path: append(path, step), Unknown: unknown})
		}
		if !ok {
			continue
		}
		path = append(path, step)
		a := r.Action
		if a.TProxy != nil {
			e := Explanation{Outcome: OutcomeTProxy, Rule: &step, Path: slices.Clone(path), Port: a.TProxy.Port}
			// With no socket on the port, nft's tproxy breaks out of the rule
			// (no mark, no verdict) and evaluation goes on with the next one.
			down := w.walk(slices.Clone(stack), slices.Clone(path[:len(path)-1]), mark)
			e.IfDown = &down
			return w.finish(e)
		}
		if a.SetMark != 0 {
			mark = a.SetMark
		}
		switch a.Verdict {
		case VerdictAccept:
			return w.finish(Explanation{Outcome: OutcomeAccept, Rule: &step, Path: path})
		case VerdictDrop:
			return w.finish(Explanation{Outcome: OutcomeDrop, Rule: &step, Path: path})
		case VerdictJump:
			target := w.p.Chain(a.Chain)
			if target == nil || len(stack) > 16 {
				// A plan from BuildPlan never does this; say so rather than guess.
				return w.finish(Explanation{Outcome: OutcomeUnknown, Rule: &step, Path: path, Unknown: badJump(a.Chain)})
			}
			stack = append(stack, frame{chain: target})
		default: // return
			stack = stack[:len(stack)-1]
			if len(stack) == 0 {
				return w.finish(Explanation{Outcome: OutcomeNotIntercepted, Rule: &step, Path: path})
			}
			returned = &step
		}
	}
	return w.finish(Explanation{Outcome: OutcomeNotIntercepted, Rule: returned, Path: path})
}

// badJump stands for a jump the walk cannot follow.
type badJump string

func (b badJump) String() string {
	return "jump " + strconv.Quote(string(b)) + " (no such chain, or jumps nested too deep)"
}
func (badJump) isMatch() {}

// matches evaluates every match of r; unknown is the first match it cannot evaluate.
func (w *walker) matches(r Rule, mark uint32) (ok bool, unknown Match) {
	for _, m := range r.Matches {
		ok, known := w.match(m, mark)
		if !known {
			return false, m
		}
		if !ok {
			return false, nil
		}
	}
	return true, nil
}

func (w *walker) family() Family {
	if w.f.Dst.Addr().Is6() {
		return IPv6
	}
	return IPv4
}

func (w *walker) proto() (uint8, bool) {
	switch w.f.Proto {
	case "tcp":
		return ProtoTCP, true
	case "udp":
		return ProtoUDP, true
	}
	return 0, false
}

// match evaluates one match; known is false for a match it has no rule for.
func (w *walker) match(m Match, mark uint32) (ok, known bool) {
	addr := func(src bool) netip.Addr {
		if src {
			return w.f.Src.Addr()
		}
		return w.f.Dst.Addr()
	}
	switch m := m.(type) {
	case MatchFamily:
		return w.family() == m.Family, true
	case MatchIIfName:
		return (w.f.InIface == m.Name) != m.Negate, true
	case MatchIIfNameSet:
		s := w.set(m.Set)
		if s == nil || !s.IsIfNames() {
			return false, false
		}
		return slices.Contains(s.Names, w.f.InIface) != m.Negate, true
	case MatchMark:
		return (mark == m.Mark) != m.Negate, true
	case MatchCTReply:
		return false, true // the first packet of a flow is in the original direction
	case MatchCTStateNew:
		return true, true // the explanation follows a flow's first packet
	case MatchL4Proto:
		p, ok := w.proto()
		if !ok {
			return false, false
		}
		return slices.Contains(m.Protos, p), true
	case MatchICMPType:
		return false, true // a flow is TCP or UDP
	case MatchDstPort:
		if _, ok := w.proto(); !ok {
			return false, false
		}
		return w.f.Dst.Port() == m.Port, true
	case MatchAddr:
		return m.Prefix.Contains(addr(m.Src)), true
	case MatchAddrSet:
		s := w.set(m.Set)
		if s == nil || s.IsIfNames() {
			return false, false
		}
		a := addr(m.Src)
		// ip/ip6 payload matches imply the family: a v4 packet never matches an ip6 set.
		if w.family() != m.Family || s.Family != m.Family {
			return false, true
		}
		if s.Timeout {
			// A dns-bypass set is filled by the running tpgw; the
			// explanation assumes the address is not in it (see Plan.DNSBypassNote).
			return false, true
		}
		return inRanges(s.Elements, a), true
	case MatchSocketTransparent:
		return false, true // no transparent socket owns a flow tpgw has not accepted yet
	case MatchCTLabel:
		return false, true // a new flow's connection has no label yet
	case MatchLocalDst:
		return w.isLocal(w.f.Dst.Addr()), true
	case MatchForeignSrc:
		return !w.isLocal(w.f.Src.Addr()), true
	}
	return false, false
}

func (w *walker) set(name string) *Set {
	for i := range w.p.Sets {
		if w.p.Sets[i].Name == name {
			return &w.p.Sets[i]
		}
	}
	return nil
}

// isLocal is "fib daddr type local": the gateway's addresses, and all of
// 127.0.0.0/8 and ::1, which the local table routes to lo.
func (w *walker) isLocal(a netip.Addr) bool {
	if a.IsLoopback() {
		return true
	}
	for _, l := range w.local {
		if l.Unmap() == a {
			return true
		}
	}
	return false
}

func inRanges(rs []AddrRange, a netip.Addr) bool {
	for _, r := range rs {
		if r.From.Compare(a) <= 0 && a.Compare(r.To) <= 0 {
			return true
		}
	}
	return false
}
