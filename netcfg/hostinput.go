package netcfg

import (
	"errors"
	"fmt"
	"log/slog"
	"os/exec"
	"slices"
	"strings"

	"github.com/coreos/go-iptables/iptables"
	"github.com/google/nftables"
	"github.com/google/nftables/expr"
)

// divertedComment is the comment of the input rule that accepts the packets
// tpgw diverted to itself.
const divertedComment = "diverted by tpgw"

// A diverted packet is addressed to a host beyond the gateway but delivered
// locally, so it passes the input hook, as a new connection. A host firewall
// that denies incoming packets there would drop every flow tpgw was told to
// take, and the LAN would reach nothing while tpgw runs.
//
// With the iptables backend tpgw's input chain is jumped to from the first
// rule of the filter table's INPUT and accepts the diverted packets, which
// is final for that table (ufw, firewalld's iptables backend and hand-made
// rules live there).
//
// With nftables, tpgw's table cannot overrule another: a packet accepted in
// one base chain still meets every other base chain on the hook, and a drop
// in any of them is final. So where the iptables filter INPUT chain filters
// (a policy other than ACCEPT, or any rule: iptables-nft keeps it in table
// ip filter, beside ours), tpgw also puts the iptables backend's input chain
// there, reduced to its accept rule: chain TPGW_IN, `-m mark --mark MARK -j
// ACCEPT`, jumped to from INPUT's first rule. Only packets that tpgw's
// prerouting rules marked for its listeners carry the mark. Remove and
// Cleanup take it out with the iptables backend's chains; Verify puts it
// back, and opens the chain when it starts to filter after the start
// (watchHost, below). A firewall written in nftables itself (firewalld's
// nftables backend, an /etc/nftables.conf with policy drop) cannot be
// opened from another table: it must accept `meta mark MARK` itself
// (doc.go).

// hostInputPlan is the opening as a plan of its own: p's input chain with
// its accept rule alone.
func hostInputPlan(p *Plan) *Plan {
	o := p.Options
	o.DNSBypass = false // its sets stay in nftables
	op := &Plan{Table: p.Table, Options: o}
	for _, c := range p.Chains {
		if c.Name != ChainInput {
			continue
		}
		in := Chain{Name: c.Name, Hook: c.Hook, Type: c.Type, Priority: c.Priority}
		for _, r := range c.Rules {
			if r.Comment == divertedComment {
				in.Rules = append(in.Rules, r)
			}
		}
		op.Chains = append(op.Chains, in)
	}
	return op
}

// hostInputFilters says how the filter table's INPUT chain would stop the
// diverted packets ("" when it would not): its policy, and how many rules it
// has besides a jump to ours.
func hostInputFilters(ipt *iptables.IPTables) (string, error) {
	lines, err := ipt.List("filter", "INPUT")
	if err != nil {
		return "", err
	}
	policy, rules := "ACCEPT", 0
	for _, l := range lines {
		if p, ok := strings.CutPrefix(l, "-P INPUT "); ok {
			policy = strings.TrimSpace(p)
		} else if strings.HasPrefix(l, "-A INPUT") && !strings.HasPrefix(ruleTarget(l), iptPrefix) {
			rules++
		}
	}
	if policy == "ACCEPT" && rules == 0 {
		return "", nil
	}
	return fmt.Sprintf("policy %s, %d rules", policy, rules), nil
}

// syncHostInput opens the host's iptables INPUT chain for the diverted
// packets of each family p intercepts where that chain filters, and closes
// openings no longer needed. Without an iptables command there is no such
// chain to open.
func (w *nftFirewall) syncHostInput(p *Plan) error {
	op := hostInputPlan(p)
	var errs []error
	for _, f := range []Family{IPv4, IPv6} {
		if _, err := exec.LookPath(iptCommand(f)); err != nil {
			continue
		}
		// The opening is for a firewall that is there: an iptables that does
		// not run here (no xtables modules, say) has none, and is no reason
		// to fail.
		ipt := w.hostIPT[f]
		if ipt == nil {
			var err error
			if ipt, err = newIPT(f); err != nil {
				w.log.Debug("netcfg: no iptables INPUT chain to check", "err", err)
				continue
			}
			if w.hostIPT == nil {
				w.hostIPT = map[Family]*iptables.IPTables{}
			}
			w.hostIPT[f] = ipt
		}
		why := ""
		if slices.Contains(iptFamilies(p), f) {
			var err error
			if why, err = hostInputFilters(ipt); err != nil {
				w.log.Debug("netcfg: no iptables INPUT chain to check", "cmd", iptCommand(f), "err", err)
				continue
			}
		}
		had := w.opened[f]
		if why == "" {
			if had != nil {
				errs = append(errs, cleanupIPTablesFamily(w.log, ipt, f))
				delete(w.opened, f)
			}
			continue
		}
		if had != nil {
			if now, err := hostInputLines(f); err == nil && slices.Equal(now, had) {
				continue // in place, as installed
			}
		}
		chains, err := iptablesChains(op, f, "")
		if err != nil {
			errs = append(errs, err)
			continue
		}
		// A partial leftover goes first; with nftables nothing else of
		// ours is in iptables.
		if err := cleanupIPTablesFamily(w.log, ipt, f); err != nil {
			errs = append(errs, err)
			continue
		}
		delete(w.opened, f)
		// An opening that fails half-way is taken out at once: closeHostInput
		// knows only the ones made whole.
		failed := func(err error) {
			errs = append(errs, err, cleanupIPTablesFamily(w.log, ipt, f))
		}
		fw := &iptFirewall{log: w.log, ipt: map[Family]*iptables.IPTables{f: ipt}}
		if err := fw.build(f, chains); err != nil {
			failed(err)
			continue
		}
		if err := fw.insertJumps(f, chains); err != nil {
			failed(err)
			continue
		}
		lines, err := hostInputLines(f)
		if err != nil {
			failed(err)
			continue
		}
		if w.opened == nil {
			w.opened = map[Family][]string{}
		}
		w.opened[f] = lines
		if had == nil {
			w.log.Info("netcfg: the host's iptables INPUT chain filters incoming packets; the packets tpgw diverts are accepted there first",
				"cmd", iptCommand(f), "input", why, "chain", chains[0].Name)
		}
	}
	return errors.Join(errs...)
}

// closeHostInput removes the openings.
func (w *nftFirewall) closeHostInput() error {
	var errs []error
	for f := range w.opened {
		if ipt := w.hostIPT[f]; ipt != nil {
			errs = append(errs, cleanupIPTablesFamily(w.log, ipt, f))
		}
	}
	w.opened = nil
	return errors.Join(errs...)
}

// hostInputLines are the lines of the filter table that are ours
// (`iptables -t filter -S`: the chain, its rule, the jump).
func hostInputLines(f Family) ([]string, error) {
	out, err := exec.Command(iptCommand(f), "-w", "10", "-t", "filter", "-S").Output()
	if err != nil {
		return nil, fmt.Errorf("netcfg: %s -t filter -S: %w", iptCommand(f), err)
	}
	var lines []string
	for _, l := range strings.Split(string(out), "\n") {
		if strings.Contains(l, iptPrefix) {
			lines = append(lines, l)
		}
	}
	return lines, nil
}

// hostInputState is the part of the nftables fingerprint (state) that
// covers the openings: one line per family opened, telling whether it is as
// installed.
func (w *nftFirewall) hostInputState() []string {
	var out []string
	for _, f := range []Family{IPv4, IPv6} {
		had := w.opened[f]
		if had == nil {
			continue
		}
		now, err := hostInputLines(f)
		out = append(out, fmt.Sprintf("%s INPUT opening intact: %v", iptCommand(f), err == nil && slices.Equal(now, had)))
	}
	return out
}

// warnInputDrop warns about each nftables base chain on the input hook,
// outside tpgw's table and iptables' own INPUT, that drops or rejects what
// it did not accept (droppingChains): a firewall written in nftables (an
// /etc/nftables.conf with policy drop, firewalld's nftables backend, whose
// chain ends with a reject) that tpgw cannot open from its own table. If
// that chain does not accept the diverted packets some other way, the LAN
// reaches nothing; the warning says what to add, and for firewalld which
// zone to put the LAN in. lan is tpgw.interfaces.
//
// seen holds the chains warned about before (it may be nil); the chains
// warned about now are added to it.
func warnInputDrop(log *slog.Logger, mark uint32, lan []string, seen map[string]bool) {
	for _, d := range droppingChains(nftables.ChainHookInput) {
		c := d.chain
		family := nftFamilyName(c.Table.Family)
		if (family == "ip" || family == "ip6") && c.Table.Name == "filter" && c.Name == "INPUT" {
			continue // iptables-nft's: opened by a rule of ours (syncHostInput, or the iptables backend's input chain)
		}
		name := fmt.Sprintf("%s %s %s", family, c.Table.Name, c.Name)
		if seen != nil {
			if seen[name] {
				continue
			}
			seen[name] = true
		}
		if acceptsLAN(c, mark, lan) {
			// OpenWrt's fw4 with the LAN zone's input ACCEPT, firewalld
			// with the LAN in its trusted zone.
			log.Debug("netcfg: a host firewall chain drops by default but accepts what tpgw diverts from the LAN", "chain", name, "drops_by", d.how)
			continue
		}
		args := []any{"chain", name, "drops_by", d.how,
			"add_to_it", fmt.Sprintf("meta mark %#x accept", mark)}
		if c.Table.Name == firewalldTable {
			// firewalld's table cannot take rules of others (it may own
			// it); its zones say what reaches the host.
			iface := "<LAN interface>"
			if len(lan) > 0 {
				iface = strings.Join(lan, ",")
			}
			args = append(args, "firewalld", fmt.Sprintf("firewall-cmd --permanent --zone=trusted --add-interface=%s && firewall-cmd --reload", iface))
		}
		log.Warn("netcfg: a firewall chain of the host drops or rejects incoming packets by default; unless it accepts the packets tpgw diverts, the LAN reaches nothing while tpgw runs", args...)
	}
}

// acceptsLAN reports whether chain c accepts, for certain, the new
// connections tpgw diverts from each LAN interface (acceptsFrom). With no
// interfaces configured the LAN is known by its addresses, and no chain is
// taken to accept it.
func acceptsLAN(c *nftables.Chain, mark uint32, lan []string) bool {
	if len(lan) == 0 {
		return false
	}
	conn, err := nftables.New()
	if err != nil {
		return false
	}
	for _, iface := range lan {
		if !acceptsFrom(conn, c, iface, mark) {
			return false
		}
	}
	return true
}

// WarnHostFirewall gives the warnings a start gives about the host's
// firewall (warnInputDrop, warnForwardDrop) for plan p, changing nothing:
// for `tpgw check`, and for Apply, which passes the chains it warned about
// on to Verify in seen (nil: not kept).
func WarnHostFirewall(log *slog.Logger, p *Plan) { warnHostFirewall(log, p, nil) }

func warnHostFirewall(log *slog.Logger, p *Plan, seen map[string]bool) {
	warnInputDrop(log, p.Options.Mark, p.Options.Interfaces, seen)
	warnForwardDrop(log, p)
}

// firewalldTable is the nftables table of firewalld's nftables backend. Its
// filter_INPUT and filter_FORWARD chains accept by policy but end with
// an unconditional reject, for whatever no zone allowed.
const firewalldTable = "firewalld"

// warnForwardDrop warns about a host firewall that drops forwarded packets
// by default (iptables' FORWARD with policy DROP, which Docker sets, or an
// nftables forward chain that drops or rejects by default, droppingChains)
// when tpgw counts on forwarding: the flows dns-bypass hands to the kernel,
// and with on-failure: open the LAN's traffic while tpgw is down. Through
// tpgw those flows are delivered locally and never meet FORWARD, so they
// worked until then. tpgw does not open the host's forwarding itself: the
// warning says what to add.
func warnForwardDrop(log *slog.Logger, p *Plan) {
	var what []string
	var iptRule, nftRule string // what lets the dns-bypass flows through
	if p.Options.DNSBypass {
		what = append(what, "the flows dns-bypass hands to the kernel")
		iptRule = fmt.Sprintf("-m connlabel --label %d -j ACCEPT", ConnLabelDNSBypass)
		nftRule = fmt.Sprintf("ct label %d accept", ConnLabelDNSBypass)
	}
	if p.Options.OnFailure == OnFailureOpen {
		what = append(what, "the LAN's traffic while tpgw is down (on-failure: open)")
	}
	if len(what) == 0 {
		return
	}
	warn := func(chain, how, rule string) {
		args := []any{"chain", chain, "drops_by", how, "forwarded", strings.Join(what, "; ")}
		if rule != "" {
			args = append(args, "add_to_it", rule)
		}
		log.Warn("netcfg: the host's firewall drops forwarded packets by default: unless a rule there accepts them, these are dropped (on a Docker host, add it to DOCKER-USER)", args...)
	}
	for _, f := range iptFamilies(p) {
		if _, err := exec.LookPath(iptCommand(f)); err != nil {
			continue
		}
		ipt, err := newIPT(f)
		if err != nil {
			continue
		}
		if lines, err := ipt.List("filter", "FORWARD"); err == nil && slices.Contains(lines, "-P FORWARD DROP") {
			warn(iptCommand(f)+" filter FORWARD", "policy DROP", iptRule)
		}
	}
	for _, d := range droppingChains(nftables.ChainHookForward) {
		c := d.chain
		if c.Name == "FORWARD" {
			continue // iptables-nft's, seen through iptables above
		}
		warn(fmt.Sprintf("%s %s %s", nftFamilyName(c.Table.Family), c.Table.Name, c.Name), d.how, nftRule)
	}
}

// droppingChain is a base chain of the host that drops what no rule of it
// accepted, and how it does that.
type droppingChain struct {
	chain *nftables.Chain
	how   string // "policy drop", or "last rule: reject" / "last rule: drop"
}

// droppingChains are the nftables base chains on hook, outside tpgw's
// table, that drop or reject what they did not accept: by policy, or by an
// unconditional drop or reject as their last rule (firewalld's, whose
// policy is accept). None when nftables cannot be read.
func droppingChains(hook *nftables.ChainHook) []droppingChain {
	conn, err := nftables.New()
	if err != nil {
		return nil
	}
	chains, err := conn.ListChains()
	if err != nil {
		return nil
	}
	var out []droppingChain
	for _, c := range chains {
		if c.Table == nil || c.Table.Name == TableName || c.Hooknum == nil || *c.Hooknum != *hook {
			continue
		}
		if c.Policy != nil && *c.Policy == nftables.ChainPolicyDrop {
			out = append(out, droppingChain{c, "policy drop"})
			continue
		}
		rules, err := conn.GetRules(c.Table, c)
		if err != nil || len(rules) == 0 {
			continue
		}
		if how := finalVerdict(rules[len(rules)-1].Exprs); how != "" {
			out = append(out, droppingChain{c, "last rule: " + how})
		}
	}
	return out
}

// finalVerdict is "reject" or "drop" for a rule that rejects or drops every
// packet (no match before the verdict; counters and logs do not match), or
// "".
func finalVerdict(exprs []expr.Any) string {
	for _, e := range exprs {
		switch e := e.(type) {
		case *expr.Counter, *expr.Log:
		case *expr.Reject:
			return "reject"
		case *expr.Verdict:
			if e.Kind == expr.VerdictDrop {
				return "drop"
			}
			return ""
		default:
			return ""
		}
	}
	return ""
}

// nftFamilyName is a table family as nft writes it.
func nftFamilyName(f nftables.TableFamily) string {
	switch f {
	case nftables.TableFamilyINet:
		return "inet"
	case nftables.TableFamilyIPv4:
		return "ip"
	case nftables.TableFamilyIPv6:
		return "ip6"
	case nftables.TableFamilyBridge:
		return "bridge"
	}
	return fmt.Sprint(uint32(f))
}

// A host firewall may also come after tpgw (`ufw enable`, firewalld started
// later): Verify calls watchHost on each check, which opens iptables' INPUT
// chain when it has started to filter (nftables backend; the iptables
// backend's own chain is first in INPUT already), and warns about nftables
// chains that drop by default and were not there before (warnInputDrop).

// watchHost opens the host's iptables INPUT chain where it filters now and
// was not opened, and reports whether it did. It reads iptables-nft's chain
// over netlink, which costs no process; an iptables-legacy firewall that
// appears later is not seen until a reload.
func (w *nftFirewall) watchHost(p *Plan) (bool, error) {
	conn, err := nftables.New()
	if err != nil {
		return false, nil
	}
	need := false
	for _, f := range iptFamilies(p) {
		if w.opened[f] == nil && iptablesNftInputFilters(conn, f) {
			need = true
		}
	}
	if !need {
		return false, nil
	}
	before := len(w.opened)
	err = w.syncHostInput(p)
	return len(w.opened) > before, err
}

// iptablesNftInputFilters reports whether iptables-nft's filter INPUT chain
// of family f would stop the diverted packets: a drop policy, or a rule
// other than a jump to a chain of ours (as hostInputFilters says from
// iptables' own output).
func iptablesNftInputFilters(conn *nftables.Conn, f Family) bool {
	fam := nftables.TableFamilyIPv4
	if f == IPv6 {
		fam = nftables.TableFamilyIPv6
	}
	chains, err := conn.ListChainsOfTableFamily(fam)
	if err != nil {
		return false
	}
	for _, c := range chains {
		if c.Table == nil || c.Table.Name != "filter" || c.Name != "INPUT" || c.Hooknum == nil || *c.Hooknum != *nftables.ChainHookInput {
			continue
		}
		if c.Policy != nil && *c.Policy == nftables.ChainPolicyDrop {
			return true
		}
		rules, err := conn.GetRules(c.Table, c)
		if err != nil {
			return false
		}
		for _, r := range rules {
			if !jumpsToOurs(r.Exprs) {
				return true
			}
		}
	}
	return false
}

// jumpsToOurs reports whether a rule jumps or goes to one of our iptables chains.
func jumpsToOurs(exprs []expr.Any) bool {
	for _, e := range exprs {
		if v, ok := e.(*expr.Verdict); ok && (v.Kind == expr.VerdictJump || v.Kind == expr.VerdictGoto) && strings.HasPrefix(v.Chain, iptPrefix) {
			return true
		}
	}
	return false
}
