package netcfg

import (
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"os/exec"
	"slices"
	"strconv"
	"strings"

	"github.com/coreos/go-iptables/iptables"
)

// The translation of a Plan into iptables/ip6tables rules. Each chain of the
// plan becomes a user chain named TPGW* (see iptChainName); each base chain
// is reached by one jump rule, commented "tpgw", inserted first in the
// built-in chain of its hook. Sets become one rule per CIDR, and a rule
// matching several protocols one rule per protocol (TPROXY and --dport need
// -p). The same plan, the same behaviour as nftables, with one exception:
// the TPROXY target drops a packet when nothing listens (see doc.go).

// iptPrefix starts the name of every chain we own; Cleanup deletes chains
// with this prefix in the mangle and filter tables.
const iptPrefix = "TPGW"

// ErrDNSBypassIPTables: the iptables backend has no form of the dns-bypass
// sets (they would need ipsets with timeouts and connlabel matches).
var ErrDNSBypassIPTables = errors.New("netcfg: dns-bypass needs the nftables backend; the iptables backend does not support it")

// iptJumpComment marks our jump rules in the built-in chains.
const iptJumpComment = "tpgw"

// iptTables are the tables our chains live in.
var iptTables = []string{"mangle", "filter"}

// iptBuiltins are the built-in chains that may hold a jump of ours.
var iptBuiltins = map[string][]string{
	"mangle": {"PREROUTING", "INPUT", "OUTPUT"},
	"filter": {"INPUT", "OUTPUT"},
}

// iptChainName is the iptables name of a plan chain.
func iptChainName(name string) string {
	switch name {
	case ChainName:
		return iptPrefix
	case ChainInput:
		return iptPrefix + "_IN"
	case ChainOutput:
		return iptPrefix + "_OUT"
	}
	return iptPrefix + "_" + strings.ToUpper(name)
}

// iptChain is one user chain of ours in one table, with its rules as argument
// lists for `iptables -t Table -A Name ...`.
type iptChain struct {
	Table   string
	Name    string
	Builtin string // the built-in chain that jumps here; "" for a chain reached from our own chains
	Rules   [][]string
}

func iptBuiltin(h Hook) string {
	switch h {
	case HookPrerouting:
		return "PREROUTING"
	case HookInput:
		return "INPUT"
	case HookOutput:
		return "OUTPUT"
	}
	return ""
}

// iptJumpSpec is the rule, in a built-in chain, that jumps to our chain.
func iptJumpSpec(chain string) []string {
	return []string{"-m", "comment", "--comment", iptJumpComment, "-j", chain}
}

// iptablesChains translates the plan for one family. suffix is appended to
// every chain name (Update builds the new chains beside the old ones). It has
// no side effects.
func iptablesChains(p *Plan, f Family, suffix string) ([]iptChain, error) {
	if p.Options.DNSBypass {
		return nil, ErrDNSBypassIPTables
	}
	name := func(chain string) string { return iptChainName(chain) + suffix }
	// Regular chains live in the table of the base chain that jumps to them.
	tableOf := map[string]string{}
	for _, c := range p.Chains {
		if !c.IsBase() {
			continue
		}
		t := "mangle"
		if c.Priority == "filter" {
			t = "filter"
		}
		tableOf[c.Name] = t
		for _, r := range c.Rules {
			if r.Action.Verdict == VerdictJump {
				tableOf[r.Action.Chain] = t
			}
		}
	}
	out := make([]iptChain, 0, len(p.Chains))
	guardOnly := f == IPv6 && !p.Options.IPv6 // see iptInstallFamilies
	for _, c := range p.Chains {
		if guardOnly && c.Hook != HookInput {
			continue
		}
		t, ok := tableOf[c.Name]
		if !ok {
			return nil, fmt.Errorf("netcfg: iptables: chain %s is not reached from a base chain", c.Name)
		}
		ic := iptChain{Table: t, Name: name(c.Name), Builtin: iptBuiltin(c.Hook)}
		for _, r := range c.Rules {
			specs, err := iptRuleSpecs(p, r, f, name)
			if err != nil {
				return nil, fmt.Errorf("netcfg: iptables rule %q: %w", r.String(), err)
			}
			ic.Rules = append(ic.Rules, specs...)
		}
		out = append(out, ic)
	}
	return out, nil
}

// matchFamily is the family a match restricts the rule to, or 0.
func matchFamily(m Match) Family {
	switch m := m.(type) {
	case MatchFamily:
		return m.Family
	case MatchAddr:
		return m.Family()
	case MatchAddrSet:
		return m.Family
	case MatchICMPType:
		return m.Family
	}
	return 0
}

// iptAlt is one of the iptables rules a plan rule expands to.
type iptAlt struct {
	args  []string
	proto string // "-p" value once set: --dport needs it
}

// iptRuleSpecs expands one plan rule into the iptables rules that do the
// same for family f; none when the rule is for the other family.
func iptRuleSpecs(p *Plan, r Rule, f Family, chainName func(string) string) ([][]string, error) {
	for _, m := range r.Matches {
		if mf := matchFamily(m); mf != 0 && mf != f {
			return nil, nil
		}
	}
	a := r.Action
	if a.TProxy != nil && a.TProxy.Family != f {
		return nil, nil
	}
	alts := []iptAlt{{}}
	// each appends args to every alternative; fork multiplies them by choices.
	each := func(args ...string) {
		for i := range alts {
			alts[i].args = append(slices.Clip(alts[i].args), args...)
		}
	}
	fork := func(choices [][]string, protos []string) {
		var next []iptAlt
		for _, alt := range alts {
			for i, c := range choices {
				n := iptAlt{args: append(slices.Clip(alt.args), c...), proto: alt.proto}
				if protos != nil {
					n.proto = protos[i]
				}
				next = append(next, n)
			}
		}
		alts = next
	}
	for _, m := range r.Matches {
		switch m := m.(type) {
		case MatchFamily:
		case MatchIIfName:
			if m.Negate {
				each("!", "-i", m.Name)
			} else {
				each("-i", m.Name)
			}
		case MatchIIfNameSet:
			if m.Negate {
				return nil, fmt.Errorf("a negated interface set has no iptables equivalent")
			}
			s, err := planSet(p, m.Set)
			if err != nil {
				return nil, err
			}
			var choices [][]string
			for _, n := range s.Names {
				choices = append(choices, []string{"-i", n})
			}
			fork(choices, nil)
		case MatchMark:
			if m.Negate {
				each("-m", "mark", "!", "--mark", fmt.Sprintf("%#x", m.Mark))
			} else {
				each("-m", "mark", "--mark", fmt.Sprintf("%#x", m.Mark))
			}
		case MatchCTReply:
			each("-m", "conntrack", "--ctdir", "REPLY")
		case MatchL4Proto:
			var choices [][]string
			var protos []string
			for _, pr := range m.Protos {
				choices = append(choices, []string{"-p", protoName(pr)})
				protos = append(protos, protoName(pr))
			}
			fork(choices, protos)
		case MatchDstPort:
			for i := range alts {
				if alts[i].proto != "tcp" && alts[i].proto != "udp" {
					return nil, fmt.Errorf("th dport needs tcp or udp before it")
				}
				alts[i].args = append(slices.Clip(alts[i].args), "-m", alts[i].proto, "--dport", strconv.Itoa(int(m.Port)))
			}
		case MatchICMPType:
			if m.Family == IPv6 {
				each("-m", "icmp6", "--icmpv6-type", strconv.Itoa(int(m.Type)))
			} else {
				each("-m", "icmp", "--icmp-type", strconv.Itoa(int(m.Type)))
			}
		case MatchAddr:
			each(iptAddrFlag(m.Src), m.Prefix.String())
		case MatchAddrSet:
			s, err := planSet(p, m.Set)
			if err != nil {
				return nil, err
			}
			var choices [][]string
			for _, e := range s.Elements {
				for _, pfx := range rangePrefixes(e) {
					choices = append(choices, []string{iptAddrFlag(m.Src), pfx.String()})
				}
			}
			fork(choices, nil)
		case MatchSocketTransparent:
			each("-m", "socket", "--transparent")
		case MatchLocalDst:
			each("-m", "addrtype", "--dst-type", "LOCAL")
		case MatchForeignSrc:
			each("-m", "addrtype", "!", "--src-type", "LOCAL")
		default:
			return nil, fmt.Errorf("match %T not supported by the iptables backend", m)
		}
	}
	if r.Comment != "" {
		each("-m", "comment", "--comment", r.Comment)
	}
	mark := func(m uint32) string { return fmt.Sprintf("%#x/0xffffffff", m) }
	var verdict []string
	switch a.Verdict {
	case VerdictAccept:
		verdict = []string{"-j", "ACCEPT"}
	case VerdictDrop:
		verdict = []string{"-j", "DROP"}
	case VerdictJump:
		verdict = []string{"-j", chainName(a.Chain)}
	default:
		verdict = []string{"-j", "RETURN"}
	}
	var out [][]string
	for _, alt := range alts {
		switch {
		case a.TProxy != nil:
			// TPROXY is terminal (it accepts, or drops when no socket listens).
			if alt.proto != "tcp" && alt.proto != "udp" {
				return nil, fmt.Errorf("TPROXY needs -p tcp or -p udp")
			}
			if a.SetMark == 0 || a.Verdict != VerdictAccept {
				return nil, fmt.Errorf("TPROXY always sets a mark and accepts")
			}
			target := []string{"-j", "TPROXY", "--on-port", strconv.Itoa(int(a.TProxy.Port))}
			if a.TProxy.Addr.IsValid() {
				target = append(target, "--on-ip", a.TProxy.Addr.String())
			}
			out = append(out, append(append(slices.Clip(alt.args), target...), "--tproxy-mark", mark(a.SetMark)))
		case a.SetMark != 0:
			// MARK does not end the rule list: a second rule with the same
			// matches gives the verdict.
			out = append(out,
				append(slices.Clip(alt.args), "-j", "MARK", "--set-xmark", mark(a.SetMark)),
				append(slices.Clip(alt.args), verdict...))
		default:
			out = append(out, append(slices.Clip(alt.args), verdict...))
		}
	}
	return out, nil
}

func iptAddrFlag(src bool) string {
	if src {
		return "-s"
	}
	return "-d"
}

func planSet(p *Plan, name string) (*Set, error) {
	for i := range p.Sets {
		if p.Sets[i].Name == name {
			return &p.Sets[i], nil
		}
	}
	return nil, fmt.Errorf("unknown set %q", name)
}

// rangePrefixes splits a range into the fewest prefixes that cover it exactly.
func rangePrefixes(r AddrRange) []netip.Prefix {
	var out []netip.Prefix
	from := r.From
	for from.IsValid() && from.Compare(r.To) <= 0 {
		// The largest prefix starting at from that stays within the range.
		bits := from.BitLen()
		for bits > 0 {
			p := netip.PrefixFrom(from, bits-1)
			if p.Masked().Addr() != from || rangeOf(p).To.Compare(r.To) > 0 {
				break
			}
			bits--
		}
		p := netip.PrefixFrom(from, bits)
		out = append(out, p)
		from = rangeOf(p).To.Next() // invalid past the family's last address
	}
	return out
}

// iptFamilies are the families the plan installs with iptables: IPv4, and
// IPv6 when the plan intercepts it.
func iptFamilies(p *Plan) []Family {
	if p.Options.IPv6 {
		return []Family{IPv4, IPv6}
	}
	return []Family{IPv4}
}

// iptInstallFamilies are the families the iptables backend installs p
// for: those it intercepts (iptFamilies), and IPv6 for the input guard alone
// when p does not intercept IPv6. tpgw's listeners take IPv6 too (a
// wildcard listen is dual-stack), so without the guard any IPv6 host could
// use the TPROXY and DNS ports (an open resolver), where nftables' inet
// input chain guards both families. here leaves IPv6 out on a host whose
// kernel or ip6tables lacks it.
func iptInstallFamilies(p *Plan, here bool) []Family {
	fs := iptFamilies(p)
	if slices.Contains(fs, IPv6) {
		return fs
	}
	if here && !slices.Contains(iptFamiliesHere(), IPv6) {
		return fs
	}
	return append(fs, IPv6)
}

func iptCommand(f Family) string {
	if f == IPv6 {
		return "ip6tables"
	}
	return "iptables"
}

// newIPT opens the iptables (or ip6tables) command of the system, nft or legacy.
func newIPT(f Family) (*iptables.IPTables, error) {
	proto := iptables.ProtocolIPv4
	if f == IPv6 {
		proto = iptables.ProtocolIPv6
	}
	// Wait at most 10 s for the xtables lock rather than forever.
	ipt, err := iptables.New(iptables.IPFamily(proto), iptables.Timeout(10))
	if err != nil {
		return nil, fmt.Errorf("netcfg: %s: %w", iptCommand(f), err)
	}
	return ipt, nil
}

// iptFirewall installs the plan's chains with iptables and ip6tables.
type iptFirewall struct {
	log *slog.Logger
	ipt map[Family]*iptables.IPTables
}

func (w *iptFirewall) name() string { return "iptables" }

func (w *iptFirewall) handle(f Family) (*iptables.IPTables, error) {
	if ipt := w.ipt[f]; ipt != nil {
		return ipt, nil
	}
	ipt, err := newIPT(f)
	if err != nil {
		return nil, err
	}
	w.ipt[f] = ipt
	return ipt, nil
}

// install creates every chain with its rules, then inserts the jumps from
// the built-in chains, so no packet sees a half-built chain. On error it
// removes all it added.
func (w *iptFirewall) install(p *Plan) (err error) {
	chains, err := w.translate(p, "")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			if rerr := w.remove(); rerr != nil {
				err = errors.Join(err, fmt.Errorf("netcfg: undo: %w", rerr))
			}
		}
	}()
	families := slices.Sorted(maps.Keys(chains)) // IPv4 before IPv6
	for _, f := range families {
		if err := w.build(f, chains[f]); err != nil {
			return err
		}
	}
	for _, f := range families {
		if err := w.insertJumps(f, chains[f]); err != nil {
			return err
		}
	}
	return nil
}

// translate computes the chains of every family, before anything changes.
func (w *iptFirewall) translate(p *Plan, suffix string) (map[Family][]iptChain, error) {
	out := map[Family][]iptChain{}
	for _, f := range iptInstallFamilies(p, true) {
		if _, err := w.handle(f); err != nil {
			return nil, err
		}
		cs, err := iptablesChains(p, f, suffix)
		if err != nil {
			return nil, err
		}
		out[f] = cs
	}
	return out, nil
}

// build creates the chains and fills them; nothing jumps to them yet.
func (w *iptFirewall) build(f Family, chains []iptChain) error {
	ipt := w.ipt[f]
	for _, c := range chains {
		// ClearChain creates the chain, or empties a leftover of an interrupted run.
		if err := ipt.ClearChain(c.Table, c.Name); err != nil {
			return fmt.Errorf("netcfg: %s -t %s -N %s: %w", iptCommand(f), c.Table, c.Name, err)
		}
	}
	for _, c := range chains {
		for _, spec := range c.Rules {
			if err := ipt.Append(c.Table, c.Name, spec...); err != nil {
				return fmt.Errorf("netcfg: %s -t %s -A %s %s: %w", iptCommand(f), c.Table, c.Name, shellJoin(spec), err)
			}
		}
	}
	return nil
}

// insertJumps puts the jumps into the built-in chains, prerouting last: the
// input guard is in place before anything is diverted.
func (w *iptFirewall) insertJumps(f Family, chains []iptChain) error {
	ipt := w.ipt[f]
	for i := len(chains) - 1; i >= 0; i-- {
		c := chains[i]
		if c.Builtin == "" {
			continue
		}
		if err := ipt.Insert(c.Table, c.Builtin, 1, iptJumpSpec(c.Name)...); err != nil {
			return fmt.Errorf("netcfg: %s -t %s -I %s -j %s: %w", iptCommand(f), c.Table, c.Builtin, c.Name, err)
		}
	}
	return nil
}

// iptNewSuffix marks the chains update builds beside the old ones.
const iptNewSuffix = "_NEW"

// update replaces the chains: the new ones are built beside the old under a
// _NEW suffix, the jumps are switched (new jump first, then the old one
// deleted, so no packet passes unchecked), the old chains deleted and the new
// ones renamed. Families the new plan drops are removed.
func (w *iptFirewall) update(old, p *Plan) error {
	const suffix = iptNewSuffix
	chains, err := w.translate(p, suffix)
	if err != nil {
		return err
	}
	for _, f := range []Family{IPv4, IPv6} {
		cs, want := chains[f]
		if !want {
			if slices.Contains(iptInstallFamilies(old, true), f) {
				if err := cleanupIPTablesFamily(w.log, w.ipt[f], f); err != nil {
					return err
				}
			}
			continue
		}
		ipt := w.ipt[f]
		if err := w.build(f, cs); err != nil {
			w.deleteChains(f, func(name string) bool { return strings.HasSuffix(name, suffix) })
			return err
		}
		if err := w.insertJumps(f, cs); err != nil {
			w.deleteJumps(f, func(target string) bool { return strings.HasSuffix(target, suffix) })
			w.deleteChains(f, func(name string) bool { return strings.HasSuffix(name, suffix) })
			return err
		}
		isOld := func(name string) bool { return !strings.HasSuffix(name, suffix) }
		if err := w.deleteJumps(f, isOld); err != nil {
			return err
		}
		if err := w.deleteChains(f, isOld); err != nil {
			return err
		}
		for _, c := range cs {
			if err := ipt.RenameChain(c.Table, c.Name, strings.TrimSuffix(c.Name, suffix)); err != nil {
				return fmt.Errorf("netcfg: %s -t %s -E %s: %w", iptCommand(f), c.Table, c.Name, err)
			}
		}
	}
	return nil
}

func (w *iptFirewall) deleteJumps(f Family, which func(target string) bool) error {
	_, err := deleteIPTJumps(w.log, w.ipt[f], f, which)
	return err
}

func (w *iptFirewall) deleteChains(f Family, which func(name string) bool) error {
	_, err := deleteIPTChains(w.ipt[f], f, which)
	return err
}

// remove deletes our jumps and chains, found in the kernel, for every family.
func (w *iptFirewall) remove() error {
	var errs []error
	for _, f := range []Family{IPv4, IPv6} {
		if ipt := w.ipt[f]; ipt != nil {
			errs = append(errs, cleanupIPTablesFamily(w.log, ipt, f))
		}
	}
	return errors.Join(errs...)
}

// notExist reports whether err is iptables saying the table or chain does
// not exist.
func notExist(err error) bool {
	var ie *iptables.Error
	return errors.As(err, &ie) && ie.IsNotExist()
}

// ruleTarget is the -j target of a rule as `iptables -S` prints it.
func ruleTarget(rule string) string {
	f := strings.Fields(rule)
	for i := len(f) - 2; i >= 0; i-- {
		if f[i] == "-j" || f[i] == "-g" {
			return f[i+1]
		}
	}
	return ""
}

// afterIPTList, when set by a test, runs between a chain's -S and the
// deletes that follow it.
var afterIPTList func(table, chain string)

// splitIPTRule splits a line of `iptables -S` into its arguments. iptables
// quotes a value that holds anything but letters, digits, '-' and '_' in
// double quotes, and escapes a double quote, a single quote or a backslash in it
// with a backslash.
func splitIPTRule(line string) ([]string, error) {
	var args []string
	var cur strings.Builder
	inArg, quoted := false, false
	for i := 0; i < len(line); i++ {
		c := line[i]
		switch {
		case quoted && c == '\\':
			if i+1 == len(line) {
				return nil, errors.New("a backslash ends the line")
			}
			i++
			cur.WriteByte(line[i])
		case quoted && c == '"':
			quoted = false
		case quoted:
			cur.WriteByte(c)
		case c == '"':
			quoted, inArg = true, true
		case c == ' ' || c == '\t' || c == '\n':
			if inArg {
				args = append(args, cur.String())
				cur.Reset()
				inArg = false
			}
		default:
			cur.WriteByte(c)
			inArg = true
		}
	}
	if quoted {
		return nil, errors.New("a quote is not closed")
	}
	if inArg {
		args = append(args, cur.String())
	}
	return args, nil
}

// ourChains lists the chains named TPGW* of a table. A table that does not
// exist (iptables-legacy without its kernel module, say on a router that
// uses nftables) holds none.
func ourChains(ipt *iptables.IPTables, table string) ([]string, error) {
	all, err := ipt.ListChains(table)
	if notExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []string
	for _, c := range all {
		if strings.HasPrefix(c, iptPrefix) {
			out = append(out, c)
		}
	}
	return out, nil
}

// deleteIPTJumps deletes, from every chain that may hold one (built-in chains
// and ours), the rules that jump to a chain of ours accepted by which. It
// returns how many it deleted.
func deleteIPTJumps(log *slog.Logger, ipt *iptables.IPTables, f Family, which func(target string) bool) (int, error) {
	n := 0
	var errs []error
	for _, table := range iptTables {
		chains := slices.Clone(iptBuiltins[table])
		own, err := ourChains(ipt, table)
		if err != nil {
			errs = append(errs, fmt.Errorf("netcfg: %s -t %s -S: %w", iptCommand(f), table, err))
			continue
		}
		chains = append(chains, own...)
		for _, chain := range chains {
			rules, err := ipt.List(table, chain)
			if notExist(err) {
				continue
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("netcfg: %s -t %s -S %s: %w", iptCommand(f), table, chain, err))
				continue
			}
			if afterIPTList != nil {
				afterIPTList(table, chain)
			}
			// Deleted by their spec, not their number: another tool may
			// insert or delete rules in a built-in chain between the -S
			// and the -D, and a number would then name its rule.
			deleted := 0
			for _, r := range rules {
				if !strings.HasPrefix(r, "-A ") {
					continue
				}
				if t := ruleTarget(r); !strings.HasPrefix(t, iptPrefix) || !which(t) {
					continue
				}
				args, err := splitIPTRule(r)
				if err != nil || len(args) < 2 {
					errs = append(errs, fmt.Errorf("netcfg: %s -t %s -S %s: cannot read %q: %v", iptCommand(f), table, chain, r, err))
					continue
				}
				err = ipt.Delete(table, chain, args[2:]...)
				if notExist(err) {
					continue // gone since the -S
				}
				if err != nil {
					errs = append(errs, fmt.Errorf("netcfg: %s -t %s -D %s: %w", iptCommand(f), table, strings.TrimPrefix(r, "-A "), err))
					continue
				}
				deleted++
			}
			n += deleted
			if deleted > 0 {
				log.Debug("netcfg: iptables jumps deleted", "cmd", iptCommand(f), "table", table, "chain", chain, "count", deleted)
			}
		}
	}
	return n, errors.Join(errs...)
}

// deleteIPTChains flushes, then deletes, the chains of ours accepted by
// which: all are flushed first, so that jumps between them do not block a delete.
func deleteIPTChains(ipt *iptables.IPTables, f Family, which func(name string) bool) (int, error) {
	var errs []error
	found := map[string][]string{}
	for _, table := range iptTables {
		own, err := ourChains(ipt, table)
		if err != nil {
			errs = append(errs, fmt.Errorf("netcfg: %s -t %s -S: %w", iptCommand(f), table, err))
			continue
		}
		for _, c := range own {
			if which(c) {
				found[table] = append(found[table], c)
			}
		}
	}
	for table, cs := range found {
		for _, c := range cs {
			if err := ipt.ClearChain(table, c); err != nil {
				errs = append(errs, fmt.Errorf("netcfg: %s -t %s -F %s: %w", iptCommand(f), table, c, err))
			}
		}
	}
	n := 0
	for table, cs := range found {
		for _, c := range cs {
			if err := ipt.DeleteChain(table, c); err != nil {
				errs = append(errs, fmt.Errorf("netcfg: %s -t %s -X %s: %w", iptCommand(f), table, c, err))
				continue
			}
			n++
		}
	}
	return n, errors.Join(errs...)
}

// cleanupIPTablesFamily removes every jump to and every chain named TPGW*.
func cleanupIPTablesFamily(log *slog.Logger, ipt *iptables.IPTables, f Family) error {
	all := func(string) bool { return true }
	jumps, jerr := deleteIPTJumps(log, ipt, f, all)
	chains, cerr := deleteIPTChains(ipt, f, all)
	if jumps > 0 || chains > 0 {
		log.Info("netcfg: iptables rules removed", "cmd", iptCommand(f), "jumps", jumps, "chains", chains)
	}
	return errors.Join(jerr, cerr)
}

// iptFamiliesHere are the families whose iptables may hold rules of ours: a
// missing binary has none, and neither has IPv6 on a kernel without it
// (ipv6.disable=1), where iptables-legacy's ip6tables fails on every table
// ("Address family not supported by protocol").
func iptFamiliesHere() []Family {
	var out []Family
	for _, f := range []Family{IPv4, IPv6} {
		if _, err := exec.LookPath(iptCommand(f)); err != nil {
			continue
		}
		if f == IPv6 {
			if h, err := ProbeIPv6(); err == nil && !h.Kernel {
				continue
			}
		}
		out = append(out, f)
	}
	return out
}

// cleanupIPTables removes our iptables and ip6tables leftovers. A missing
// binary means there is nothing to remove, not an error.
func cleanupIPTables(log *slog.Logger) error {
	var errs []error
	for _, f := range iptFamiliesHere() {
		ipt, err := newIPT(f)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		errs = append(errs, cleanupIPTablesFamily(log, ipt, f))
	}
	return errors.Join(errs...)
}

// removeIPTablesDivert deletes the jumps into the divert chains, for both families.
func removeIPTablesDivert(log *slog.Logger) (int, error) {
	// A crash in the middle of update can leave the jumps to the new
	// chains, which still carry their suffix.
	divert := func(target string) bool {
		target = strings.TrimSuffix(target, iptNewSuffix)
		return target == iptChainName(ChainDivert) || target == iptChainName(ChainDivertOut)
	}
	n := 0
	var errs []error
	for _, f := range iptFamiliesHere() {
		ipt, err := newIPT(f)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		k, err := deleteIPTJumps(log, ipt, f, divert)
		n += k
		errs = append(errs, err)
	}
	return n, errors.Join(errs...)
}

// iptProbe checks that iptables works and that the TPROXY target loads, with
// a throwaway chain of ours (removed right away; Cleanup would find it too).
func iptProbe(f Family) error {
	ipt, err := newIPT(f)
	if err != nil {
		return err
	}
	const chain = iptPrefix + "_PROBE"
	if err := ipt.ClearChain("mangle", chain); err != nil {
		return fmt.Errorf("netcfg: %s -t mangle -N %s: %w", iptCommand(f), chain, err)
	}
	aerr := ipt.Append("mangle", chain, "-p", "tcp", "-j", "TPROXY", "--on-port", "1", "--tproxy-mark", "0x1/0x1")
	derr := ipt.ClearAndDeleteChain("mangle", chain)
	if aerr != nil {
		return fmt.Errorf("netcfg: %s: TPROXY target unusable: %w", iptCommand(f), aerr)
	}
	if derr != nil {
		return fmt.Errorf("netcfg: %s -t mangle -X %s: %w", iptCommand(f), chain, derr)
	}
	return nil
}

// shellJoin quotes args for a POSIX shell where needed.
func shellJoin(args []string) string {
	out := make([]string, len(args))
	for i, a := range args {
		if a == "" || strings.ContainsAny(a, " \t\n'\"\\$`!*?()[]{};&|<>#~") && a != "!" {
			a = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		out[i] = a
	}
	return strings.Join(out, " ")
}

// IPTablesScript is the iptables part of the plan as shell commands, in the
// order the iptables backend runs them: chains created and filled, then the
// jumps from the built-in chains.
func (p *Plan) IPTablesScript() string { return p.iptScript(iptInstallFamilies(p, false)) }

// iptScript is IPTablesScript for the given families.
func (p *Plan) iptScript(families []Family) string {
	var b strings.Builder
	for i, f := range families {
		if i > 0 {
			b.WriteString("\n")
		}
		cmd := iptCommand(f)
		chains, err := iptablesChains(p, f, "")
		if err != nil {
			fmt.Fprintf(&b, "# %s: %v\n", cmd, err)
			continue
		}
		fmt.Fprintf(&b, "# %s: chains %s* (jumps from the built-in chains last)\n", cmd, iptPrefix)
		for _, c := range chains {
			fmt.Fprintf(&b, "%s -t %s -N %s\n", cmd, c.Table, c.Name)
		}
		for _, c := range chains {
			for _, spec := range c.Rules {
				fmt.Fprintf(&b, "%s -t %s -A %s %s\n", cmd, c.Table, c.Name, shellJoin(spec))
			}
		}
		for k := len(chains) - 1; k >= 0; k-- {
			if c := chains[k]; c.Builtin != "" {
				fmt.Fprintf(&b, "%s -t %s -I %s 1 %s\n", cmd, c.Table, c.Builtin, shellJoin(iptJumpSpec(c.Name)))
			}
		}
	}
	return b.String()
}
