package netcfg

import (
	"fmt"
	"net/netip"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"
)

// The translation of a Plan into nftables netlink messages. Every rule uses
// register 1 only; the expressions are what `nft -f` generates for the same
// text (see TestNftMatchesPlanText).

const reg1 = 1

func nftTable() *nftables.Table {
	return &nftables.Table{Name: TableName, Family: nftables.TableFamilyINet}
}

// queueNftPlan adds the table, its sets, chain and rules to conn's batch.
// Nothing reaches the kernel until conn.Flush, which applies all or nothing.
func queueNftPlan(conn *nftables.Conn, p *Plan) error {
	table := conn.AddTable(&nftables.Table{Name: p.Table, Family: nftables.TableFamilyINet})
	sets := make(map[string]*nftables.Set, len(p.Sets))
	for _, s := range p.Sets {
		set := &nftables.Set{Table: table, Name: s.Name, Interval: true, KeyType: nftables.TypeIPAddr}
		els := intervalElements(s.Elements)
		switch {
		case s.IsIfNames():
			// Host byte order, as nft declares string keys; with the big-endian
			// default nft would list the names as "".
			set = &nftables.Set{Table: table, Name: s.Name, KeyType: nftables.TypeIFName, KeyByteOrder: binaryutil.NativeEndian}
			els = make([]nftables.SetElement, len(s.Names))
			for i, n := range s.Names {
				els[i] = nftables.SetElement{Key: ifname(n)}
			}
		case s.Family == IPv6:
			set.KeyType = nftables.TypeIP6Addr
		}
		if err := conn.AddSet(set, els); err != nil {
			return fmt.Errorf("netcfg: add nft set %s: %w", s.Name, err)
		}
		sets[s.Name] = set
	}
	policy := nftables.ChainPolicyAccept
	chain := conn.AddChain(&nftables.Chain{
		Name:     p.Chain,
		Table:    table,
		Type:     nftables.ChainTypeFilter,
		Hooknum:  nftables.ChainHookPrerouting,
		Priority: nftables.ChainPriorityMangle,
		Policy:   &policy,
	})
	for _, r := range p.Rules {
		exprs, err := ruleExprs(conn, table, sets, r)
		if err != nil {
			return fmt.Errorf("netcfg: nft rule %q: %w", r.String(), err)
		}
		rule := &nftables.Rule{Table: table, Chain: chain, Exprs: exprs}
		if r.Comment != "" {
			rule.UserData = userdata.AppendString(nil, userdata.TypeComment, r.Comment)
		}
		conn.AddRule(rule)
	}
	return nil
}

// intervalElements encodes ranges the way the kernel's interval sets want
// them: a start element and an IntervalEnd element one past the last address.
// A range ending at the family's highest address has no end element.
func intervalElements(rs []AddrRange) []nftables.SetElement {
	els := make([]nftables.SetElement, 0, 2*len(rs))
	for _, r := range rs {
		els = append(els, nftables.SetElement{Key: r.From.AsSlice()})
		if end := r.To.Next(); end.IsValid() {
			els = append(els, nftables.SetElement{Key: end.AsSlice(), IntervalEnd: true})
		}
	}
	return els
}

func cmpEq(data []byte) *expr.Cmp { return &expr.Cmp{Op: expr.CmpOpEq, Register: reg1, Data: data} }

func nfprotoOf(f Family) byte {
	if f == IPv6 {
		return unix.NFPROTO_IPV6
	}
	return unix.NFPROTO_IPV4
}

func ifname(n string) []byte {
	b := make([]byte, ifNameSize)
	copy(b, n)
	return b
}

// anonSet adds a constant anonymous set to the batch and returns a lookup of reg 1 in it.
func anonSet(conn *nftables.Conn, table *nftables.Table, keyType nftables.SetDatatype, keys [][]byte) (*expr.Lookup, error) {
	set := &nftables.Set{Table: table, Anonymous: true, Constant: true, KeyType: keyType}
	els := make([]nftables.SetElement, len(keys))
	for i, k := range keys {
		els[i] = nftables.SetElement{Key: k}
	}
	if err := conn.AddSet(set, els); err != nil {
		return nil, err
	}
	return &expr.Lookup{SourceRegister: reg1, SetName: set.Name, SetID: set.ID}, nil
}

func addrPayload(f Family, src bool) *expr.Payload {
	// IPv4: saddr at 12, daddr at 16; IPv6: saddr at 8, daddr at 24.
	off, n := uint32(16), uint32(4)
	if src {
		off = 12
	}
	if f == IPv6 {
		off, n = 24, 16
		if src {
			off = 8
		}
	}
	return &expr.Payload{DestRegister: reg1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: n}
}

func ruleExprs(conn *nftables.Conn, table *nftables.Table, sets map[string]*nftables.Set, r Rule) ([]expr.Any, error) {
	var es []expr.Any
	family := func(f Family) {
		es = append(es, &expr.Meta{Key: expr.MetaKeyNFPROTO, Register: reg1}, cmpEq([]byte{nfprotoOf(f)}))
	}
	for _, m := range r.Matches {
		switch m := m.(type) {
		case MatchFamily:
			family(m.Family)
		case MatchIIfName:
			op := expr.CmpOpEq
			if m.Negate {
				op = expr.CmpOpNeq
			}
			es = append(es, &expr.Meta{Key: expr.MetaKeyIIFNAME, Register: reg1},
				&expr.Cmp{Op: op, Register: reg1, Data: ifname(m.Name)})
		case MatchIIfNameSet:
			set, ok := sets[m.Set]
			if !ok {
				return nil, fmt.Errorf("unknown set %q", m.Set)
			}
			es = append(es, &expr.Meta{Key: expr.MetaKeyIIFNAME, Register: reg1},
				&expr.Lookup{SourceRegister: reg1, SetName: set.Name, SetID: set.ID, Invert: m.Negate})
		case MatchMark:
			op := expr.CmpOpEq
			if m.Negate {
				op = expr.CmpOpNeq
			}
			es = append(es, &expr.Meta{Key: expr.MetaKeyMARK, Register: reg1},
				&expr.Cmp{Op: op, Register: reg1, Data: binaryutil.NativeEndian.PutUint32(m.Mark)})
		case MatchCTReply:
			es = append(es, &expr.Ct{Key: expr.CtKeyDIRECTION, Register: reg1}, cmpEq([]byte{1})) // IP_CT_DIR_REPLY
		case MatchL4Proto:
			es = append(es, &expr.Meta{Key: expr.MetaKeyL4PROTO, Register: reg1})
			if len(m.Protos) == 1 {
				es = append(es, cmpEq([]byte{m.Protos[0]}))
				continue
			}
			keys := make([][]byte, len(m.Protos))
			for i, p := range m.Protos {
				keys[i] = []byte{p}
			}
			lookup, err := anonSet(conn, table, nftables.TypeInetProto, keys)
			if err != nil {
				return nil, err
			}
			es = append(es, lookup)
		case MatchDstPort:
			es = append(es,
				&expr.Payload{DestRegister: reg1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
				cmpEq(binaryutil.BigEndian.PutUint16(m.Port)))
		case MatchAddr:
			f := m.Family()
			family(f)
			es = append(es, addrPayload(f, m.Src))
			if n := m.Prefix.Addr().BitLen() / 8; m.Prefix.Bits() < 8*n {
				es = append(es, &expr.Bitwise{
					SourceRegister: reg1, DestRegister: reg1,
					Len: uint32(n), Mask: prefixMask(m.Prefix), Xor: make([]byte, n),
				})
			}
			es = append(es, cmpEq(m.Prefix.Masked().Addr().AsSlice()))
		case MatchAddrSet:
			set, ok := sets[m.Set]
			if !ok {
				return nil, fmt.Errorf("unknown set %q", m.Set)
			}
			family(m.Family)
			es = append(es, addrPayload(m.Family, m.Src),
				&expr.Lookup{SourceRegister: reg1, SetName: set.Name, SetID: set.ID})
		case MatchLocalDst:
			es = append(es,
				&expr.Fib{Register: reg1, FlagDADDR: true, ResultADDRTYPE: true},
				cmpEq(binaryutil.NativeEndian.PutUint32(unix.RTN_LOCAL)))
		case MatchSocketTransparent:
			es = append(es, &expr.Socket{Key: expr.SocketKeyTransparent, Register: reg1}, cmpEq([]byte{1}))
		default:
			return nil, fmt.Errorf("match %T not supported by the nftables backend", m)
		}
	}
	a := r.Action
	if a.TProxy != nil {
		// tproxy assigns the packet to a local socket, or breaks out of the rule
		// when none listens (the fall-through behind on-failure: open).
		es = append(es,
			&expr.Immediate{Register: reg1, Data: binaryutil.BigEndian.PutUint16(a.TProxy.Port)},
			&expr.TProxy{Family: nfprotoOf(a.TProxy.Family), TableFamily: unix.NFPROTO_INET, RegPort: reg1})
	}
	if a.SetMark != 0 {
		es = append(es,
			&expr.Immediate{Register: reg1, Data: binaryutil.NativeEndian.PutUint32(a.SetMark)},
			&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: reg1})
	}
	kind := expr.VerdictReturn
	if a.Verdict == VerdictAccept {
		kind = expr.VerdictAccept
	}
	es = append(es, &expr.Verdict{Kind: kind})
	return es, nil
}

func prefixMask(p netip.Prefix) []byte {
	b := make([]byte, p.Addr().BitLen()/8)
	for i := 0; i < p.Bits(); i++ {
		b[i/8] |= 1 << (7 - i%8)
	}
	return b
}

// ourNftTableExists reports whether the table named TableName (inet) is in the kernel.
func ourNftTableExists(conn *nftables.Conn) (bool, error) {
	tables, err := conn.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return false, fmt.Errorf("netcfg: list nft tables: %w", err)
	}
	for _, t := range tables {
		if t.Name == TableName {
			return true, nil
		}
	}
	return false, nil
}

// deleteNftTable deletes our table, with everything in it, if it exists.
func deleteNftTable() (bool, error) {
	conn, err := nftables.New()
	if err != nil {
		return false, fmt.Errorf("netcfg: open nftables netlink: %w", err)
	}
	exists, err := ourNftTableExists(conn)
	if err != nil || !exists {
		return false, err
	}
	conn.DelTable(nftTable())
	if err := conn.Flush(); err != nil {
		if gone(err) {
			return false, nil
		}
		return false, fmt.Errorf("netcfg: delete nft table inet %s: %w", TableName, err)
	}
	return true, nil
}
