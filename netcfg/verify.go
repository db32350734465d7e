package netcfg

import (
	"fmt"
	"os/exec"
	"regexp"
	"slices"
	"strings"

	"github.com/google/nftables"
)

// Something else may take tpgw's rules out of the kernel while it runs:
// Debian's nftables.service starts with `flush ruleset`, a firewall reload
// may flush every iptables chain, systemd-networkd deletes ip rules it did
// not make. tpgw then kept running with nothing diverted to it, and the
// LAN's flows went out unproxied without a word. Verify notices and puts
// the rules back.

// state is a fingerprint of our table in the kernel: each chain with its
// hook and number of rules ("" when the table is gone). Set elements are
// left out: dns-bypass adds and expires them as it runs.
func (w *nftFirewall) state() (string, error) {
	conn, err := nftables.New()
	if err != nil {
		return "", fmt.Errorf("netcfg: open nftables netlink: %w", err)
	}
	exists, err := ourNftTableExists(conn)
	if err != nil || !exists {
		return "", err
	}
	chains, err := conn.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return "", fmt.Errorf("netcfg: list nft chains: %w", err)
	}
	var lines []string
	for _, c := range chains {
		if c.Table.Name != TableName {
			continue
		}
		rules, err := conn.GetRules(nftTable(), c)
		if err != nil {
			return "", fmt.Errorf("netcfg: list nft rules of %s: %w", c.Name, err)
		}
		hook := "-"
		if c.Hooknum != nil {
			hook = fmt.Sprint(*c.Hooknum)
		}
		lines = append(lines, fmt.Sprintf("%s hook %s: %d rules", c.Name, hook, len(rules)))
	}
	slices.Sort(lines)
	lines = append(lines, w.hostInputState()...)
	return strings.Join(lines, "\n"), nil
}

var iptCounters = regexp.MustCompile(`\[\d+:\d+\]`)

// state is a fingerprint of our chains and the jumps to them, each line with
// its table, from one iptables-save per family.
func (w *iptFirewall) state() (string, error) {
	var lines []string
	for _, f := range []Family{IPv4, IPv6} {
		if w.ipt[f] == nil {
			continue
		}
		out, err := exec.Command(iptCommand(f) + "-save").Output()
		if err != nil {
			return "", fmt.Errorf("netcfg: %s-save: %w", iptCommand(f), err)
		}
		table := ""
		for _, l := range strings.Split(string(out), "\n") {
			if t, ok := strings.CutPrefix(l, "*"); ok {
				table = t
			} else if strings.Contains(l, iptPrefix) {
				lines = append(lines, iptCommand(f)+" "+table+" "+iptCounters.ReplaceAllString(l, ""))
			}
		}
	}
	slices.Sort(lines)
	return strings.Join(lines, "\n"), nil
}

// Verify checks that what was installed is still in the kernel and puts back
// what is missing: the firewall part is replaced as a reload replaces it, and
// the ip rules and routes are added again. It returns what it restored, nil
// when nothing was missing. The dns-bypass sets come back empty.
func (i *Installed) Verify() (restored []string, err error) {
	if i == nil || i.removed {
		return nil, nil
	}
	st, err := i.fw.state()
	if err != nil {
		return nil, err
	}
	if st != i.fwState {
		if err := i.fw.update(i.plan, i.plan); err != nil {
			return nil, fmt.Errorf("netcfg: restore %s rules: %w", i.fw.name(), err)
		}
		if i.fwState, err = i.fw.state(); err != nil {
			return nil, err
		}
		restored = append(restored, i.fw.name()+" rules")
	}
	// A host firewall that came after the start (hostinput.go). Opening it
	// is logged there; nothing of ours was missing.
	if hw, ok := i.fw.(interface{ watchHost(*Plan) (bool, error) }); ok {
		opened, err := hw.watchHost(i.plan)
		if opened {
			if st, serr := i.fw.state(); serr == nil {
				i.fwState = st
			}
		}
		if err != nil {
			return restored, fmt.Errorf("netcfg: open the host's iptables INPUT chain: %w", err)
		}
	}
	if i.dropSeen == nil {
		i.dropSeen = map[string]bool{}
	}
	warnInputDrop(i.log, i.plan.Options.Mark, i.plan.Options.Interfaces, i.dropSeen)
	rules, err := ourRules()
	if err != nil {
		return restored, err
	}
	routes, err := ourRoutes()
	if err != nil {
		return restored, err
	}
	if len(rules) != len(i.rules) || len(routes) != len(i.routes) {
		if err := i.removeRouting(); err != nil {
			return restored, fmt.Errorf("netcfg: restore routing: %w", err)
		}
		if err := i.addRouting(i.plan, func(string) error { return nil }); err != nil {
			return restored, fmt.Errorf("netcfg: restore routing: %w", err)
		}
		restored = append(restored, "ip rules and routes")
	}
	return restored, nil
}
