package testnet

import (
	"fmt"
	"regexp"
	"strings"
	"testing"
)

// snapshotSysctls are the sysctls tpgw may change and must restore.
var snapshotSysctls = []string{
	"net.ipv4.ip_forward",
	"net.ipv6.conf.all.forwarding",
}

// Snapshot returns the kernel state of ns that tpgw touches, as stable text, so
// that a test can compare it before start and after exit: the nftables ruleset,
// policy routing rules, all routing tables, forwarding sysctls and the
// iptables/ip6tables rules. Counters are dropped, and so are the empty built-in
// tables and chains that iptables-nft leaves behind and cannot delete, so only
// rule content is compared.
func Snapshot(t testing.TB, ns *NS) string {
	t.Helper()
	var b strings.Builder
	section := func(title, body string) {
		fmt.Fprintf(&b, "### %s\n%s", title, body)
		if body != "" && !strings.HasSuffix(body, "\n") {
			b.WriteByte('\n')
		}
	}
	run := func(name string, args ...string) string {
		out, err := ns.Run(t, MustRunTimeout, name, args...)
		if err != nil {
			t.Fatalf("testnet: snapshot: %v", err)
		}
		return out
	}
	if _, err := lookTool("nft"); err == nil {
		// -s: stateless, no counters or quotas.
		section("nft list ruleset", normalizeNFT(run("nft", "-s", "list", "ruleset")))
	} else {
		section("nft list ruleset", "(nft not installed)\n")
	}
	section("ip rule", run("ip", "rule", "show"))
	section("ip -6 rule", run("ip", "-6", "rule", "show"))
	section("ip -4 route show table all", run("ip", "-4", "route", "show", "table", "all"))
	section("ip -6 route show table all", run("ip", "-6", "route", "show", "table", "all"))
	for _, key := range snapshotSysctls {
		section("sysctl "+key, ns.Sysctl(t, key)+"\n")
	}
	for _, tool := range []string{"iptables-save", "ip6tables-save"} {
		if _, err := lookTool(tool); err != nil {
			continue
		}
		section(tool, normalizeIPTablesSave(run(tool)))
	}
	return b.String()
}

var (
	counterRE = regexp.MustCompile(`\s*\[\d+:\d+\]`)
	// nftCounterRE matches the counters of rules listed without -s.
	nftCounterRE = regexp.MustCompile(`counter packets \d+ bytes \d+`)
	// A built-in chain declaration of iptables-save: ":INPUT ACCEPT".
	builtinChainRE = regexp.MustCompile(`^:\S+ (ACCEPT|DROP|RETURN|QUEUE)$`)
)

// normalizeIPTablesSave drops comments and counters, built-in chains that have
// no rules and keep the default ACCEPT policy, and tables left with nothing.
// User chains (policy "-") are kept even when empty: a leftover chain of ours
// must show.
func normalizeIPTablesSave(s string) string {
	var out, table []string
	tableHasContent := false
	// Chains with rules, per table: mangle's FORWARD is empty even when
	// filter's FORWARD has rules.
	rulesIn := map[string]bool{} // "table/chain"
	current := ""
	for line := range strings.Lines(s) {
		line = strings.TrimRight(line, "\n")
		if strings.HasPrefix(line, "*") {
			current = line[1:]
		}
		if strings.HasPrefix(line, "-A ") {
			if f := strings.Fields(line); len(f) > 1 {
				rulesIn[current+"/"+f[1]] = true
			}
		}
	}
	current = ""
	for line := range strings.Lines(s) {
		line = strings.TrimSpace(counterRE.ReplaceAllString(strings.TrimRight(line, "\n"), ""))
		switch {
		case line == "" || strings.HasPrefix(line, "#"):
			continue
		case strings.HasPrefix(line, "*"):
			table, tableHasContent, current = []string{line}, false, line[1:]
		case line == "COMMIT":
			if tableHasContent {
				out = append(out, table...)
				out = append(out, line)
			}
			table = nil
		case builtinChainRE.MatchString(line):
			chain := strings.Fields(line)[0][1:]
			if strings.HasSuffix(line, " ACCEPT") && !rulesIn[current+"/"+chain] {
				continue // an empty built-in chain: existence is not state
			}
			table, tableHasContent = append(table, line), true
		default:
			table, tableHasContent = append(table, line), true
		}
	}
	if len(out) == 0 {
		return ""
	}
	return strings.Join(out, "\n") + "\n"
}

// iptablesNFTTables are the tables iptables-nft creates on first use.
var iptablesNFTTables = map[string]bool{"filter": true, "nat": true, "mangle": true, "raw": true, "security": true}

// normalizeNFT drops comments, counters, and the empty accept-policy base
// chains (and then-empty tables) that iptables-nft leaves in its own tables.
// Anything else, including an empty table or chain of another name, is kept.
func normalizeNFT(s string) string {
	s = nftCounterRE.ReplaceAllString(s, "counter")
	var out []string
	var table []string // current table block, header first
	var chain []string // current chain block inside it
	iptablesTable := false
	inChain := false
	for line := range strings.Lines(s) {
		line = strings.TrimRight(line, "\n")
		trimmed := strings.TrimSpace(line)
		switch {
		case trimmed == "" || strings.HasPrefix(trimmed, "#"):
			continue
		case table == nil && strings.HasPrefix(trimmed, "table "):
			f := strings.Fields(trimmed) // table <family> <name> {
			iptablesTable = len(f) >= 3 && (f[1] == "ip" || f[1] == "ip6") && iptablesNFTTables[f[2]]
			table = []string{line}
		case table != nil && !inChain && strings.HasPrefix(trimmed, "chain "):
			inChain, chain = true, []string{line}
		case inChain && line == "\t}": // nft indents with tabs; nested blocks close deeper
			chain = append(chain, line)
			inChain = false
			if !(iptablesTable && emptyAcceptBaseChain(chain)) {
				table = append(table, chain...)
			}
			chain = nil
		case inChain:
			chain = append(chain, line)
		case table != nil && line == "}":
			if !(iptablesTable && len(table) == 1) {
				out = append(out, table...)
				out = append(out, line)
			}
			table = nil
		case table != nil:
			table = append(table, line)
		default:
			out = append(out, line)
		}
	}
	if len(out) == 0 {
		return ""
	}
	return strings.Join(out, "\n") + "\n"
}

// emptyAcceptBaseChain reports whether a chain block is only its header, a
// hook line with policy accept, and the closing brace.
func emptyAcceptBaseChain(chain []string) bool {
	if len(chain) != 3 {
		return false
	}
	hook := strings.TrimSpace(chain[1])
	return strings.HasPrefix(hook, "type ") && strings.Contains(hook, " hook ") && strings.HasSuffix(hook, "policy accept;")
}
