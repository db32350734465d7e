package netcfg

import (
	"bytes"
	"encoding/binary"
	"net"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
)

// A host firewall chain that drops by default may still accept what tpgw
// diverts: OpenWrt's fw4 (policy drop) accepts everything that comes in on a
// LAN zone whose input is ACCEPT, firewalld everything on an interface in its
// trusted zone. acceptsFrom walks such a chain, as the kernel would, for a
// new connection that tpgw diverted and that came in on a LAN interface, so
// that the warning is kept for the chains that would drop it.
//
// The walk is conservative: it knows the input interface (by name and
// index), the packet mark, that the connection is new, and that rate limits
// pass; any other match (addresses, ports, sets) may hold or not, and both
// ways are followed. Only a chain in which every way ends in accept is
// reported as accepting.

// Possible outcomes of a walk, as a bit set.
const (
	fwAccept = 1 << iota
	fwDrop
	fwReturn // the chain returned or ran out of rules: its caller goes on
	fwNext   // the rule did not decide: the next rule of the chain goes on
)

// maxFwDepth bounds jumps (the kernel's own limit is 16).
const maxFwDepth = 16

// ctStateNew is the ct state bit of a new connection (NF_CT_STATE_BIT(IP_CT_NEW)).
const ctStateNew = 1 << 3

type fwWalk struct {
	conn   *nftables.Conn
	table  *nftables.Table
	chains map[string]*nftables.Chain
	iface  string
	index  int
	mark   uint32
}

// acceptsFrom reports whether base chain c certainly accepts a new diverted
// connection (carrying mark) that came in on iface.
func acceptsFrom(conn *nftables.Conn, c *nftables.Chain, iface string, mark uint32) bool {
	chains, err := conn.ListChains()
	if err != nil {
		return false
	}
	w := &fwWalk{conn: conn, table: c.Table, chains: map[string]*nftables.Chain{}, iface: iface, mark: mark}
	for _, ch := range chains {
		if ch.Table != nil && ch.Table.Name == c.Table.Name && ch.Table.Family == c.Table.Family {
			w.chains[ch.Name] = ch
		}
	}
	if ifc, err := net.InterfaceByName(iface); err == nil {
		w.index = ifc.Index
	}
	return w.chain(c, 0) == fwAccept
}

// chain walks c and returns the outcomes that are possible: accept, drop,
// or return (never for a base chain, whose policy then decides).
func (w *fwWalk) chain(c *nftables.Chain, depth int) int {
	all := fwAccept | fwDrop | fwReturn
	if depth > maxFwDepth {
		return all
	}
	rules, err := w.conn.GetRules(w.table, c)
	if err != nil {
		return all
	}
	possible := 0
	decided := false
	for _, r := range rules {
		match, outs := w.rule(r.Exprs, depth)
		if match == matchNo {
			continue
		}
		possible |= outs &^ fwNext
		if match == matchYes && outs&fwNext == 0 {
			decided = true // this rule decides every packet that gets here
			break
		}
	}
	if !decided {
		possible |= fwReturn
	}
	if c.Hooknum != nil && possible&fwReturn != 0 { // a base chain returns to its policy
		possible &^= fwReturn
		if c.Policy != nil && *c.Policy == nftables.ChainPolicyDrop {
			possible |= fwDrop
		} else {
			possible |= fwAccept
		}
	}
	return possible
}

type matchResult int

const (
	matchNo matchResult = iota
	matchYes
	matchMaybe
)

// reg is a register's content: known bytes, or nil when unknown.
type regs map[uint32][]byte

// rule evaluates one rule: whether its matches hold, and the outcomes of
// its verdict (fwNext when it has none, or when it jumps to a chain that
// may return).
func (w *fwWalk) rule(exprs []expr.Any, depth int) (matchResult, int) {
	r := regs{}
	match := matchYes
	for _, e := range exprs {
		switch e := e.(type) {
		case *expr.Meta:
			if e.SourceRegister { // meta mark set ...: later matches may see another packet
				clear(r)
				match = matchMaybe
				continue
			}
			r[e.Register] = w.meta(e.Key)
		case *expr.Ct:
			if e.SourceRegister {
				clear(r)
				match = matchMaybe
				continue
			}
			r[e.Register] = nil
			if e.Key == expr.CtKeySTATE {
				r[e.Register] = binary.NativeEndian.AppendUint32(nil, ctStateNew)
			}
		case *expr.Bitwise:
			v := r[e.SourceRegister]
			if v == nil || len(e.Mask) != len(e.Xor) || len(v) < len(e.Mask) {
				r[e.DestRegister] = nil
				continue
			}
			out := make([]byte, len(e.Mask))
			for i := range out {
				out[i] = v[i]&e.Mask[i] ^ e.Xor[i]
			}
			r[e.DestRegister] = out
		case *expr.Immediate:
			if e.Register != 0 { // a value, not a verdict
				r[e.Register] = e.Data
			}
		case *expr.Cmp:
			v := r[e.Register]
			if v == nil || len(v) < len(e.Data) || (e.Op != expr.CmpOpEq && e.Op != expr.CmpOpNeq) {
				match = matchMaybe
				continue
			}
			eq := bytes.Equal(v[:len(e.Data)], e.Data)
			if eq != (e.Op == expr.CmpOpEq) {
				return matchNo, 0
			}
		case *expr.Lookup:
			if !e.IsDestRegSet {
				match = matchMaybe // set membership: not known here
				continue
			}
			return w.vmap(e, r[e.SourceRegister], match, depth)
		case *expr.Counter, *expr.Log, *expr.Limit:
			// A rate limit passes unless the host is flooded.
		case *expr.Payload:
			r[e.DestRegister] = nil
		case *expr.Reject:
			return match, fwDrop
		case *expr.Verdict:
			return match, w.verdict(e, depth)
		default:
			// fib, socket, quota, ...: whatever it loads or decides is unknown.
			clear(r)
			match = matchMaybe
		}
	}
	return match, fwNext
}

// meta is what a meta key holds for the walked packet, or nil.
func (w *fwWalk) meta(k expr.MetaKey) []byte {
	switch k {
	case expr.MetaKeyIIFNAME:
		b := make([]byte, 16) // IFNAMSIZ, NUL-padded
		copy(b, w.iface)
		return b
	case expr.MetaKeyIIF:
		if w.index == 0 {
			return nil
		}
		return binary.NativeEndian.AppendUint32(nil, uint32(w.index))
	case expr.MetaKeyMARK:
		return binary.NativeEndian.AppendUint32(nil, w.mark)
	case expr.MetaKeyPKTTYPE:
		return []byte{0} // PACKET_HOST
	}
	return nil
}

// verdict is the outcomes of a verdict statement for the rule's chain.
func (w *fwWalk) verdict(v *expr.Verdict, depth int) int {
	all := fwAccept | fwDrop | fwReturn | fwNext
	switch v.Kind {
	case expr.VerdictAccept:
		return fwAccept
	case expr.VerdictDrop:
		return fwDrop
	case expr.VerdictReturn:
		return fwReturn
	case expr.VerdictContinue:
		return fwNext
	case expr.VerdictJump, expr.VerdictGoto:
		c := w.chains[v.Chain]
		if c == nil || c.Hooknum != nil {
			return all
		}
		outs := w.chain(c, depth+1)
		if v.Kind == expr.VerdictJump && outs&fwReturn != 0 {
			outs = outs&^fwReturn | fwNext // back from a jump: the next rule
		}
		return outs // back from a goto: return from this chain too
	}
	return all // queue, stolen, ...: anything
}

// vmap is the outcome of a verdict map lookup: the element's verdict when
// the key is known, else any of them or none.
func (w *fwWalk) vmap(e *expr.Lookup, key []byte, match matchResult, depth int) (matchResult, int) {
	set := &nftables.Set{Table: w.table, Name: e.SetName, ID: e.SetID, IsMap: true}
	elems, err := w.conn.GetSetElements(set)
	if err != nil {
		return matchMaybe, fwAccept | fwDrop | fwReturn | fwNext
	}
	outs := 0
	for _, el := range elems {
		if el.VerdictData == nil {
			continue
		}
		if key != nil {
			if len(el.Key) <= len(key) && bytes.Equal(el.Key, key[:len(el.Key)]) {
				return match, w.verdict(el.VerdictData, depth)
			}
			continue
		}
		outs |= w.verdict(el.VerdictData, depth)
	}
	if key != nil {
		return match, fwNext // no element: the rule does not decide
	}
	return matchMaybe, outs | fwNext
}
