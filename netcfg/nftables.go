package netcfg

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"

	"github.com/coreos/go-iptables/iptables"
	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"
)

// The translation of a Plan into nftables netlink messages. Every rule uses
// register 1 only (tproxy to an address also register 2); the expressions are what `nft -f` generates for the same
// text (see TestNftMatchesPlanText).

const (
	reg1 = 1
	reg2 = 2 // only for tproxy to an address and port
)

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
		case s.Timeout:
			// Single addresses, each with its own timeout; empty until tpgw adds some.
			set = &nftables.Set{Table: table, Name: s.Name, KeyType: nftables.TypeIPAddr, HasTimeout: true}
			els = nil
		}
		if s.Family == IPv6 {
			set.KeyType = nftables.TypeIP6Addr
		}
		if err := conn.AddSet(set, els); err != nil {
			return fmt.Errorf("netcfg: add nft set %s: %w", s.Name, err)
		}
		sets[s.Name] = set
	}
	// Every chain first: a jump must find its target in the batch.
	chains := make([]*nftables.Chain, len(p.Chains))
	for i, c := range p.Chains {
		nc, err := nftChain(table, c)
		if err != nil {
			return err
		}
		chains[i] = conn.AddChain(nc)
	}
	for i, c := range p.Chains {
		for _, r := range c.Rules {
			exprs, err := ruleExprs(conn, table, sets, r)
			if err != nil {
				return fmt.Errorf("netcfg: nft rule %q: %w", r.String(), err)
			}
			rule := &nftables.Rule{Table: table, Chain: chains[i], Exprs: exprs}
			if r.Comment != "" {
				rule.UserData = userdata.AppendString(nil, userdata.TypeComment, r.Comment)
			}
			conn.AddRule(rule)
		}
	}
	return nil
}

func nftChain(table *nftables.Table, c Chain) (*nftables.Chain, error) {
	nc := &nftables.Chain{Name: c.Name, Table: table}
	if !c.IsBase() {
		return nc, nil
	}
	switch c.Hook {
	case HookPrerouting:
		nc.Hooknum = nftables.ChainHookPrerouting
	case HookInput:
		nc.Hooknum = nftables.ChainHookInput
	case HookOutput:
		nc.Hooknum = nftables.ChainHookOutput
	default:
		return nil, fmt.Errorf("netcfg: nft chain %s: unknown hook %q", c.Name, c.Hook)
	}
	switch c.Type {
	case "filter":
		nc.Type = nftables.ChainTypeFilter
	case "route":
		nc.Type = nftables.ChainTypeRoute
	default:
		return nil, fmt.Errorf("netcfg: nft chain %s: unknown type %q", c.Name, c.Type)
	}
	switch c.Priority {
	case "mangle":
		nc.Priority = nftables.ChainPriorityMangle
	case "filter":
		nc.Priority = nftables.ChainPriorityFilter
	default:
		return nil, fmt.Errorf("netcfg: nft chain %s: unknown priority %q", c.Name, c.Priority)
	}
	policy := nftables.ChainPolicyAccept
	nc.Policy = &policy
	return nc, nil
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

func cmpEq(data []byte) *expr.Cmp  { return &expr.Cmp{Op: expr.CmpOpEq, Register: reg1, Data: data} }
func cmpNeq(data []byte) *expr.Cmp { return &expr.Cmp{Op: expr.CmpOpNeq, Register: reg1, Data: data} }

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
		case MatchCTStateNew:
			es = append(es, ctBits(expr.CtKeySTATE, binaryutil.NativeEndian.PutUint32(ctStateNew))...)
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
		case MatchICMPType:
			es = append(es,
				&expr.Payload{DestRegister: reg1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 1},
				cmpEq([]byte{m.Type}))
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
			// Not a wildcard-bound listener (tpgw's DNS server's TCP one is
			// transparent on [::]:1053): only sockets of relayed
			// connections, as iptables' --transparent without --nowildcard.
			es = append(es, &expr.Socket{Key: expr.SocketKeyTransparent, Register: reg1}, cmpEq([]byte{1}),
				&expr.Socket{Key: expr.SocketKeyWildcard, Register: reg1}, cmpEq([]byte{0}))
		case MatchForeignSrc:
			es = append(es,
				&expr.Fib{Register: reg1, FlagSADDR: true, ResultADDRTYPE: true},
				cmpNeq(binaryutil.NativeEndian.PutUint32(unix.RTN_LOCAL)))
		case MatchCTLabel:
			es = append(es, ctBits(expr.CtKeyLABELS, ctLabelBit(m.Bit))...)
		default:
			return nil, fmt.Errorf("match %T not supported by the nftables backend", m)
		}
	}
	a := r.Action
	if a.TProxy != nil {
		// tproxy assigns the packet to a local socket, or breaks out of the rule
		// when none listens (the fall-through behind on-failure: open).
		// With an address: the address in register 1, the port in
		// register 2, as nft does.
		tp := &expr.TProxy{Family: nfprotoOf(a.TProxy.Family), TableFamily: unix.NFPROTO_INET, RegPort: reg1}
		if ad := a.TProxy.Addr; ad.IsValid() {
			es = append(es, &expr.Immediate{Register: reg1, Data: ad.AsSlice()})
			tp.RegAddr, tp.RegPort = reg1, reg2
		}
		es = append(es, &expr.Immediate{Register: tp.RegPort, Data: binaryutil.BigEndian.PutUint16(a.TProxy.Port)}, tp)
	}
	if a.SetMark != 0 {
		es = append(es,
			&expr.Immediate{Register: reg1, Data: binaryutil.NativeEndian.PutUint32(a.SetMark)},
			&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: reg1})
	}
	if a.SetCTLabel {
		es = append(es,
			&expr.Immediate{Register: reg1, Data: ctLabelBit(ConnLabelDNSBypass)},
			&expr.Ct{Key: expr.CtKeyLABELS, SourceRegister: true, Register: reg1})
	}
	switch a.Verdict {
	case VerdictAccept:
		es = append(es, &expr.Verdict{Kind: expr.VerdictAccept})
	case VerdictDrop:
		es = append(es, &expr.Verdict{Kind: expr.VerdictDrop})
	case VerdictJump:
		es = append(es, &expr.Verdict{Kind: expr.VerdictJump, Chain: a.Chain})
	default:
		es = append(es, &expr.Verdict{Kind: expr.VerdictReturn})
	}
	return es, nil
}

// ctBits is what nft generates for "ct state new" or "ct label N": the
// conntrack bitmap key masked to the bits of mask, not zero.
func ctBits(key expr.CtKey, mask []byte) []expr.Any {
	zero := make([]byte, len(mask))
	return []expr.Any{
		&expr.Ct{Key: key, Register: reg1},
		&expr.Bitwise{SourceRegister: reg1, DestRegister: reg1, Len: uint32(len(mask)), Mask: mask, Xor: zero},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: reg1, Data: zero},
	}
}

// ctLabelSize is the size of the conntrack label bitmap (128 bits).
const ctLabelSize = 16

// ctLabelBit is the label bitmap with only bit set, as the kernel stores it.
func ctLabelBit(bit uint8) []byte {
	b := make([]byte, ctLabelSize)
	b[int(bit)/8%ctLabelSize] = 1 << (bit % 8)
	return b
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

// nftFirewall installs the plan as the table inet tpgw, and the opening in
// the host's iptables INPUT chain where one is needed (hostinput.go).
type nftFirewall struct {
	log     *slog.Logger
	hostIPT map[Family]*iptables.IPTables
	opened  map[Family][]string // the openings made, with their lines as installed
}

func (*nftFirewall) name() string { return "nftables" }

func (w *nftFirewall) install(p *Plan) error {
	conn, err := nftables.New()
	if err != nil {
		return fmt.Errorf("netcfg: open nftables netlink: %w", err)
	}
	if err := queueNftPlan(conn, p); err != nil {
		return err
	}
	if err := conn.Flush(); err != nil {
		return fmt.Errorf("netcfg: add nft table inet %s: %w", p.Table, err)
	}
	if err := w.syncHostInput(p); err != nil {
		// install leaves nothing on error: the caller undoes only what
		// installed.
		return errors.Join(err, w.remove())
	}
	return nil
}

// update deletes the old table and adds the new one in one batch: the kernel
// swaps them in one transaction, so every packet sees one ruleset or the other.
func (w *nftFirewall) update(_, p *Plan) error {
	conn, err := nftables.New()
	if err != nil {
		return fmt.Errorf("netcfg: open nftables netlink: %w", err)
	}
	exists, err := ourNftTableExists(conn)
	if err != nil {
		return err
	}
	if exists {
		conn.DelTable(nftTable())
	}
	if err := queueNftPlan(conn, p); err != nil {
		return err
	}
	if err := conn.Flush(); err != nil {
		return fmt.Errorf("netcfg: replace nft table inet %s: %w", p.Table, err)
	}
	return w.syncHostInput(p)
}

func (w *nftFirewall) remove() error {
	_, err := deleteNftTable()
	return errors.Join(err, w.closeHostInput())
}

// removeNftDivert deletes the rules of our table that jump to a divert chain.
func removeNftDivert() (int, error) {
	conn, err := nftables.New()
	if err != nil {
		return 0, fmt.Errorf("netcfg: open nftables netlink: %w", err)
	}
	exists, err := ourNftTableExists(conn)
	if err != nil || !exists {
		return 0, err
	}
	chains, err := conn.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return 0, fmt.Errorf("netcfg: list nft chains: %w", err)
	}
	n := 0
	for _, c := range chains {
		if c.Table.Name != TableName {
			continue
		}
		rules, err := conn.GetRules(nftTable(), c)
		if err != nil {
			return 0, fmt.Errorf("netcfg: list nft chain %s: %w", c.Name, err)
		}
		for _, r := range rules {
			for _, e := range r.Exprs {
				if v, ok := e.(*expr.Verdict); ok && v.Kind == expr.VerdictJump && (v.Chain == ChainDivert || v.Chain == ChainDivertOut) {
					if err := conn.DelRule(r); err != nil {
						return 0, fmt.Errorf("netcfg: delete nft rule in %s: %w", c.Name, err)
					}
					n++
				}
			}
		}
	}
	if n == 0 {
		return 0, nil
	}
	if err := conn.Flush(); err != nil {
		return 0, fmt.Errorf("netcfg: delete nft divert jumps: %w", err)
	}
	return n, nil
}

// probeNftables checks that nftables works here, tproxy included: one batch
// adds a throwaway table with a tproxy rule and deletes it again, so the
// kernel loads and checks nft_tproxy and nothing stays, even after a crash.
func probeNftables() error {
	conn, err := nftables.New()
	if err != nil {
		return fmt.Errorf("open netlink: %w", err)
	}
	if _, err := conn.ListTablesOfFamily(nftables.TableFamilyINet); err != nil {
		return fmt.Errorf("list tables: %w", err)
	}
	table := conn.AddTable(&nftables.Table{Name: TableName + "_probe", Family: nftables.TableFamilyINet})
	policy := nftables.ChainPolicyAccept
	chain := conn.AddChain(&nftables.Chain{
		Name: "probe", Table: table, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityMangle, Policy: &policy,
	})
	conn.AddRule(&nftables.Rule{Table: table, Chain: chain, Exprs: []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: reg1}, cmpEq([]byte{ProtoTCP}),
		&expr.Immediate{Register: reg1, Data: binaryutil.BigEndian.PutUint16(1)},
		&expr.TProxy{Family: unix.NFPROTO_IPV4, TableFamily: unix.NFPROTO_INET, RegPort: reg1},
	}})
	conn.DelTable(table)
	if err := conn.Flush(); err != nil {
		return fmt.Errorf("tproxy rule: %w", err)
	}
	return nil
}
