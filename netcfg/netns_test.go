package netcfg

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"testing"

	"github.com/google/nftables"
	"github.com/vishvananda/netns"

	"github.com/tpgw/tpgw/internal/testenv"
)

// testNS is a throwaway named network namespace. Library calls run inside it on
// a locked OS thread (in); snapshots and checks use `ip netns exec`.
type testNS struct {
	name string
}

func newTestNS(t *testing.T, loUp bool) *testNS {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireTools(t, "ip", "nft")
	var rnd [4]byte
	rand.Read(rnd[:])
	n := &testNS{name: "tpgw-nc-" + hex.EncodeToString(rnd[:])}
	if out, err := exec.Command("ip", "netns", "add", n.name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", n.name, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", n.name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", n.name, err, out)
		}
	})
	if loUp {
		n.run(t, "ip", "link", "set", "lo", "up")
	}
	return n
}

// run runs a command inside the namespace and returns its output.
func (n *testNS) run(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", append([]string{"netns", "exec", n.name}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// in runs fn on this goroutine's thread switched into the namespace, and switches back.
func (n *testNS) in(t *testing.T, fn func()) {
	t.Helper()
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatalf("get current netns: %v", err)
	}
	defer orig.Close()
	target, err := netns.GetFromName(n.name)
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatalf("open netns %s: %v", n.name, err)
	}
	defer target.Close()
	if err := netns.Set(target); err != nil {
		runtime.UnlockOSThread()
		t.Fatalf("enter netns %s: %v", n.name, err)
	}
	defer func() {
		if err := netns.Set(orig); err != nil {
			// Leave the thread locked: it dies with the goroutine instead of
			// running other goroutines in the wrong namespace.
			t.Errorf("restore netns: %v", err)
			return
		}
		runtime.UnlockOSThread()
	}()
	fn()
}

// snapshot is the kernel state netcfg may touch, as the standard tools print
// it. iptables-nft leaves empty built-in chains behind that it cannot delete,
// so rule content is compared, not the existence of empty built-in chains.
func (n *testNS) snapshot(t *testing.T) map[string]string {
	t.Helper()
	snap := map[string]string{
		"nft list ruleset":    normalizeNftRuleset(n.run(t, "nft", "-s", "list", "ruleset")),
		"ip -4 rule":          n.run(t, "ip", "-4", "rule"),
		"ip -6 rule":          n.run(t, "ip", "-6", "rule"),
		"ip -4 route":         n.run(t, "ip", "-4", "route", "show", "table", "all"),
		"ip -6 route":         n.run(t, "ip", "-6", "route", "show", "table", "all"),
		"ipv4 ip_forward":     n.run(t, "cat", "/proc/sys/net/ipv4/ip_forward"),
		"ipv6 all.forwarding": n.run(t, "cat", "/proc/sys/net/ipv6/conf/all/forwarding"),
	}
	for _, tool := range []string{"iptables-save", "ip6tables-save"} {
		if _, err := exec.LookPath(tool); err == nil {
			snap[tool] = normalizeIPTablesSave(n.run(t, tool))
		}
	}
	return snap
}

var (
	iptCounterRE = regexp.MustCompile(`\s*\[\d+:\d+\]`)
	iptBuiltinRE = regexp.MustCompile(`^:(\S+) ACCEPT$`)
)

// normalizeIPTablesSave drops comments, counters, built-in chains with no
// rules and the default policy, and tables left with nothing.
func normalizeIPTablesSave(s string) string {
	used := map[string]bool{}
	for line := range strings.Lines(s) {
		if f := strings.Fields(line); len(f) > 1 && f[0] == "-A" {
			used[f[1]] = true
		}
	}
	var out, table []string
	content := false
	for line := range strings.Lines(s) {
		line = strings.TrimSpace(iptCounterRE.ReplaceAllString(strings.TrimRight(line, "\n"), ""))
		switch m := iptBuiltinRE.FindStringSubmatch(line); {
		case line == "" || strings.HasPrefix(line, "#"):
		case strings.HasPrefix(line, "*"):
			table, content = []string{line}, false
		case line == "COMMIT":
			if content {
				out = append(append(out, table...), line)
			}
		case m != nil && !used[m[1]]:
		default:
			table, content = append(table, line), true
		}
	}
	return strings.Join(out, "\n")
}

// normalizeNftRuleset drops the tables iptables-nft creates (ip/ip6 filter,
// mangle, ...) while they hold only empty accept-policy base chains.
func normalizeNftRuleset(s string) string {
	var out []string
	var block []string
	for line := range strings.Lines(s) {
		line = strings.TrimRight(line, "\n")
		if block == nil && !strings.HasPrefix(line, "table ") {
			out = append(out, line)
			continue
		}
		block = append(block, line)
		if line != "}" {
			continue
		}
		if !emptyIPTablesNftTable(block) {
			out = append(out, block...)
		}
		block = nil
	}
	return strings.Join(out, "\n")
}

func emptyIPTablesNftTable(block []string) bool {
	f := strings.Fields(block[0])
	if len(f) < 3 || (f[1] != "ip" && f[1] != "ip6") {
		return false
	}
	switch f[2] {
	case "filter", "mangle", "nat", "raw", "security":
	default:
		return false
	}
	for _, line := range block[1 : len(block)-1] {
		l := strings.TrimSpace(line)
		if l == "" || l == "}" || strings.HasPrefix(l, "chain ") {
			continue
		}
		if strings.HasPrefix(l, "type ") && strings.HasSuffix(l, "policy accept;") {
			continue
		}
		return false
	}
	return true
}

func requireSameState(t *testing.T, before, after map[string]string) {
	t.Helper()
	for k, v := range before {
		if after[k] != v {
			t.Errorf("%s changed:\nbefore:\n%s\nafter:\n%s", k, v, after[k])
		}
	}
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

func mustPlan(t *testing.T, o Options) *Plan {
	t.Helper()
	p, err := BuildPlan(o)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func apply(t *testing.T, n *testNS, b Backend, p *Plan, stateDir string) (inst *Installed, err error) {
	t.Helper()
	n.in(t, func() { inst, err = b.Apply(p, stateDir) })
	return inst, err
}

func remove(t *testing.T, n *testNS, inst *Installed) {
	t.Helper()
	var err error
	n.in(t, func() { err = inst.Remove() })
	if err != nil {
		t.Fatalf("Remove: %v", err)
	}
}

func cleanup(t *testing.T, n *testNS, stateDir string) {
	t.Helper()
	var err error
	n.in(t, func() { err = Cleanup(testLogger(t), stateDir) })
	if err != nil {
		t.Fatalf("Cleanup: %v", err)
	}
}

// backendNames are the backends every kernel test runs with.
var backendNames = []string{"nftables", "iptables"}

// newBackend makes the named backend inside n (the iptables probe adds and
// deletes a chain there). failAt, when set, makes that step fail.
func newBackend(t *testing.T, n *testNS, name string, failAt string) Backend {
	t.Helper()
	var hook func(string) error
	if failAt != "" {
		hook = func(s string) error {
			if s == failAt {
				return errors.New("injected failure")
			}
			return nil
		}
	}
	switch name {
	case "nftables":
		return &nftBackend{log: testLogger(t), beforeStep: hook}
	case "iptables":
		testenv.RequireTools(t, "iptables", "ip6tables", "iptables-save", "ip6tables-save")
		var b Backend
		var err error
		n.in(t, func() { b, err = NewIPTables(testLogger(t)) })
		if err != nil {
			t.Fatalf("NewIPTables: %v", err)
		}
		b.(*iptBackend).beforeStep = hook
		return b
	}
	t.Fatalf("unknown backend %q", name)
	return nil
}

// forBackends runs f as a subtest per backend.
func forBackends(t *testing.T, f func(t *testing.T, backend string)) {
	for _, b := range backendNames {
		t.Run(b, func(t *testing.T) { f(t, b) })
	}
}

// planRuleCount is the number of rules of all chains of the plan.
func planRuleCount(p *Plan) int {
	n := 0
	for _, c := range p.Chains {
		n += len(c.Rules)
	}
	return n
}

// requireInstalled checks the plan is in the kernel once: every rule, both ip
// rules and routes, and the sysctls.
func requireInstalled(t *testing.T, n *testNS, p *Plan, backend string) {
	t.Helper()
	switch backend {
	case "nftables":
		table := n.run(t, "nft", "list", "table", "inet", TableName)
		for _, want := range []string{"tproxy ip to :7893", "set bypass4", "hook prerouting priority mangle", "socket transparent 1", "jump divert"} {
			if !strings.Contains(table, want) {
				t.Errorf("nft table lacks %q:\n%s", want, table)
			}
		}
		if got := strings.Count(table, "comment \""); got != planRuleCount(p) {
			t.Errorf("nft table has %d rules, want %d:\n%s", got, planRuleCount(p), table)
		}
		if p.Options.IPv6 != strings.Contains(table, "tproxy ip6 to :7893") {
			t.Errorf("IPv6=%v but table is:\n%s", p.Options.IPv6, table)
		}
	case "iptables":
		for _, f := range []Family{IPv4, IPv6} {
			save := n.run(t, iptCommand(f)+"-save")
			if f == IPv6 && !p.Options.IPv6 {
				// The input guard alone (iptInstallFamilies).
				if mangle := n.run(t, "ip6tables", "-t", "mangle", "-S"); strings.Contains(mangle, "TPGW") {
					t.Errorf("IPv6 off but ip6tables mangle has our chains:\n%s", mangle)
				}
				if !strings.Contains(save, "-A INPUT -m comment --comment tpgw -j TPGW_IN") {
					t.Errorf("IPv6 off and no IPv6 input guard:\n%s", save)
				}
			}
			chains, err := iptablesChains(p, f, "")
			if err != nil {
				t.Fatal(err)
			}
			want := 0
			for _, c := range chains {
				want += len(c.Rules)
				if c.Builtin != "" {
					want++ // the jump
					if !strings.Contains(save, "-A "+c.Builtin+" -m comment --comment tpgw -j "+c.Name+"\n") {
						t.Errorf("%s-save lacks the jump to %s:\n%s", iptCommand(f), c.Name, save)
					}
				}
			}
			if got := countOurRules(save) + countJumps(save); got != want {
				t.Errorf("%s-save has %d rules of ours, want %d:\n%s", iptCommand(f), got, want, save)
			}
			if (f == IPv4 || p.Options.IPv6) && !strings.Contains(save, "-j TPROXY --on-port 7893") {
				t.Errorf("%s-save lacks the TPROXY rule:\n%s", iptCommand(f), save)
			}
		}
		if table := n.run(t, "nft", "list", "tables"); strings.Contains(table, "inet "+TableName) {
			t.Errorf("iptables backend left an nft table:\n%s", table)
		}
	}
	families := []string{"-4"}
	if p.Options.IPv6 {
		families = append(families, "-6")
	}
	for _, f := range families {
		rules := n.run(t, "ip", f, "rule")
		if got := strings.Count(rules, "9766:\tfrom all fwmark 0x29a lookup 666"); got != 1 {
			t.Errorf("ip %s rule: %d copies of our rule, want 1:\n%s", f, got, rules)
		}
		routes := n.run(t, "ip", f, "route", "show", "table", "all")
		if got := strings.Count(routes, "proto 102"); got != 1 {
			t.Errorf("ip %s route: %d routes of ours, want 1:\n%s", f, got, routes)
		}
		if !strings.Contains(routes, "local default dev lo table 666 proto 102") {
			t.Errorf("ip %s route lacks our local default route:\n%s", f, routes)
		}
	}
	if p.Options.Forward {
		if got := strings.TrimSpace(n.run(t, "cat", "/proc/sys/net/ipv4/ip_forward")); got != "1" {
			t.Errorf("ip_forward = %s, want 1", got)
		}
	}
}

// countOurRules counts the rules in our chains (-A TPGW...) of iptables-save text.
func countOurRules(save string) int { return strings.Count(save, "\n-A TPGW") }

// countJumps counts the jumps from built-in chains to ours.
func countJumps(save string) int { return strings.Count(save, "--comment tpgw -j TPGW") }

func TestApplyRemove(t *testing.T) {
	forBackends(t, func(t *testing.T, backend string) {
		for name, o := range goldenCases() {
			t.Run(name, func(t *testing.T) {
				n := newTestNS(t, true)
				p := mustPlan(t, o)
				stateDir := t.TempDir()
				before := n.snapshot(t)

				inst, err := apply(t, n, newBackend(t, n, backend, ""), p, stateDir)
				if o.DNSBypass && backend == "iptables" {
					if !errors.Is(err, ErrDNSBypassIPTables) {
						t.Fatalf("Apply with dns-bypass on iptables: %v, want ErrDNSBypassIPTables", err)
					}
					requireSameState(t, before, n.snapshot(t))
					return
				}
				if err != nil {
					t.Fatalf("Apply: %v", err)
				}
				requireInstalled(t, n, p, backend)
				_, statErr := os.Stat(filepath.Join(stateDir, sysctlStateFile))
				if o.Forward && before["ipv4 ip_forward"] != "1\n" && statErr != nil {
					t.Errorf("no sysctl record after Apply with Forward: %v", statErr)
				}

				remove(t, n, inst)
				requireSameState(t, before, n.snapshot(t))
				if _, err := os.Stat(filepath.Join(stateDir, sysctlStateFile)); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("sysctl record left after Remove: %v", err)
				}
				remove(t, n, inst) // a second Remove is a no-op
			})
		}
	})
}

func TestCleanupAfterCrash(t *testing.T) {
	forBackends(t, func(t *testing.T, backend string) {
		o := DefaultOptions()
		o.RoutingMark, o.ProxySelf = 255, true // every chain there is
		n := newTestNS(t, true)
		p := mustPlan(t, o)
		stateDir := t.TempDir()
		before := n.snapshot(t)
		if _, err := apply(t, n, newBackend(t, n, backend, ""), p, stateDir); err != nil {
			t.Fatalf("Apply: %v", err)
		}
		requireInstalled(t, n, p, backend)
		// The Installed value is dropped, as if the process had been killed.
		cleanup(t, n, stateDir)
		requireSameState(t, before, n.snapshot(t))
		cleanup(t, n, stateDir) // idempotent: nothing there is no error
		requireSameState(t, before, n.snapshot(t))
	})
}

// TestCleanupOtherBackend: leftovers of one backend are removed when the
// other one starts (Apply runs Cleanup), and by Cleanup alone.
func TestCleanupOtherBackend(t *testing.T) {
	n := newTestNS(t, true)
	before := n.snapshot(t)
	p := mustPlan(t, DefaultOptions())
	stateDir := t.TempDir()
	if _, err := apply(t, n, newBackend(t, n, "iptables", ""), p, stateDir); err != nil {
		t.Fatalf("Apply iptables: %v", err)
	}
	inst, err := apply(t, n, newBackend(t, n, "nftables", ""), p, stateDir)
	if err != nil {
		t.Fatalf("Apply nftables: %v", err)
	}
	if save := n.run(t, "iptables-save"); strings.Contains(save, "TPGW") {
		t.Errorf("iptables chains left after nftables Apply:\n%s", save)
	}
	requireInstalled(t, n, p, "nftables")
	_ = inst // dropped: a crash
	if _, err := apply(t, n, newBackend(t, n, "iptables", ""), p, stateDir); err != nil {
		t.Fatalf("Apply iptables: %v", err)
	}
	requireInstalled(t, n, p, "iptables")
	cleanup(t, n, stateDir)
	requireSameState(t, before, n.snapshot(t))
}

func TestCleanupEmpty(t *testing.T) {
	n := newTestNS(t, true)
	before := n.snapshot(t)
	cleanup(t, n, t.TempDir())
	cleanup(t, n, "")
	requireSameState(t, before, n.snapshot(t))
}

// TestCleanupWithoutIPTables: with no iptables command on PATH, Cleanup still
// removes the nft table and does not fail.
func TestCleanupWithoutIPTables(t *testing.T) {
	n := newTestNS(t, true)
	before := n.snapshot(t)
	stateDir := t.TempDir()
	if _, err := apply(t, n, NewNftables(testLogger(t)), mustPlan(t, DefaultOptions()), stateDir); err != nil {
		t.Fatalf("Apply: %v", err)
	}
	path := os.Getenv("PATH")
	t.Setenv("PATH", t.TempDir())
	cleanup(t, n, stateDir)
	os.Setenv("PATH", path)
	requireSameState(t, before, n.snapshot(t))
}

func TestApplyTwice(t *testing.T) {
	forBackends(t, func(t *testing.T, backend string) {
		n := newTestNS(t, true)
		p := mustPlan(t, DefaultOptions())
		stateDir := t.TempDir()
		before := n.snapshot(t)
		b := newBackend(t, n, backend, "")
		if _, err := apply(t, n, b, p, stateDir); err != nil {
			t.Fatalf("first Apply: %v", err)
		}
		inst, err := apply(t, n, b, p, stateDir)
		if err != nil {
			t.Fatalf("second Apply: %v", err)
		}
		requireInstalled(t, n, p, backend) // exactly one copy of everything
		remove(t, n, inst)
		// The second Apply recorded the sysctls only after restoring the first
		// run's values, so Remove brings back the original ones, not "1".
		requireSameState(t, before, n.snapshot(t))
	})
}

func TestApplyFailureLeavesNothing(t *testing.T) {
	forBackends(t, func(t *testing.T, backend string) {
		for _, step := range []string{backend, stepRules, stepRoutes, stepSysctl} {
			t.Run(step, func(t *testing.T) {
				n := newTestNS(t, true)
				before := n.snapshot(t)
				stateDir := t.TempDir()
				b := newBackend(t, n, backend, step)
				inst, err := apply(t, n, b, mustPlan(t, DefaultOptions()), stateDir)
				if err == nil || inst != nil {
					t.Fatalf("Apply = %v, %v; want an error", inst, err)
				}
				t.Log(err)
				requireSameState(t, before, n.snapshot(t))
			})
		}

		// The kernel refuses a local route on a device that is down: the route
		// step fails for real after the rules and ip rules went in.
		t.Run("kernel rejects route", func(t *testing.T) {
			n := newTestNS(t, false)
			before := n.snapshot(t)
			_, err := apply(t, n, newBackend(t, n, backend, ""), mustPlan(t, DefaultOptions()), t.TempDir())
			if err == nil || !strings.Contains(err.Error(), "netcfg: add ip route local") {
				t.Fatalf("Apply error = %v, want the route step to fail", err)
			}
			t.Log(err)
			requireSameState(t, before, n.snapshot(t))
		})

		// The kernel (or iptables) rejects a rule in the middle of the firewall
		// step: with nftables, overlapping interval elements abort the whole
		// batch; with iptables, a rule of the last chain is refused after
		// everything before it went in.
		t.Run("kernel rejects rules", func(t *testing.T) {
			n := newTestNS(t, true)
			before := n.snapshot(t)
			p := mustPlan(t, DefaultOptions())
			want := "netcfg: add nft table inet tpgw"
			if backend == "nftables" {
				p.Sets[0].Elements = append(p.Sets[0].Elements, rangeOf(mustPrefixes("10.1.0.0/16")[0]))
			} else {
				// iptables refuses an interface name longer than IFNAMSIZ.
				last := &p.Chains[len(p.Chains)-1]
				r := &last.Rules[0] // the IPv4 rule: iptables runs before ip6tables
				r.Matches = append(r.Matches, MatchIIfName{Name: strings.Repeat("x", 20)})
				want = "netcfg: iptables -t filter -A " + iptChainName(last.Name)
			}
			_, err := apply(t, n, newBackend(t, n, backend, ""), p, t.TempDir())
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Fatalf("Apply error = %v, want %q", err, want)
			}
			t.Log(err)
			requireSameState(t, before, n.snapshot(t))
		})
	})
}

// TestNftMatchesPlanText loads the printed plan with `nft -f` in one namespace
// and applies the plan through netlink in another: nft must list both the
// same, so the text `tpgw rules` shows is what the kernel really runs.
func TestNftMatchesPlanText(t *testing.T) {
	for name, o := range goldenCases() {
		t.Run(name, func(t *testing.T) {
			p := mustPlan(t, o)
			viaNft := newTestNS(t, true)
			file := filepath.Join(t.TempDir(), "plan.nft")
			if err := os.WriteFile(file, []byte(p.NftRuleset()), 0o644); err != nil {
				t.Fatal(err)
			}
			viaNft.run(t, "nft", "-f", file)

			viaNetlink := newTestNS(t, true)
			var conn *nftables.Conn
			var err error
			viaNetlink.in(t, func() {
				if conn, err = nftables.New(); err == nil {
					if err = queueNftPlan(conn, p); err == nil {
						err = conn.Flush()
					}
				}
			})
			if err != nil {
				t.Fatal(err)
			}
			want := viaNft.run(t, "nft", "list", "table", "inet", TableName)
			got := viaNetlink.run(t, "nft", "list", "table", "inet", TableName)
			if got != want {
				t.Errorf("netlink ruleset differs from nft -f of the plan text\nnft -f:\n%s\nnetlink:\n%s", want, got)
			}
		})
	}
}

func TestChooseBackend(t *testing.T) {
	n := newTestNS(t, true)
	testenv.RequireTools(t, "iptables")
	before := n.snapshot(t)
	for _, c := range []struct{ name, want, why string }{
		{"auto", "nftables", "auto: nftables available"},
		{"nftables", "nftables", "nftables: configured"},
		{"iptables", "iptables", "iptables: configured"},
	} {
		var b Backend
		var why string
		var err error
		n.in(t, func() { b, why, err = ChooseBackend(c.name, testLogger(t)) })
		if err != nil {
			t.Fatalf("ChooseBackend(%q): %v", c.name, err)
		}
		if b.Name() != c.want || !strings.HasPrefix(why, c.why) {
			t.Errorf("ChooseBackend(%q) = %s, %q; want %s, %q...", c.name, b.Name(), why, c.want, c.why)
		}
	}
	if _, _, err := ChooseBackend("pf", nil); err == nil {
		t.Error("ChooseBackend accepted an unknown backend")
	}
	// The probes leave nothing behind; RemoveDivert with nothing installed is a no-op.
	var err error
	n.in(t, func() { err = RemoveDivert(testLogger(t)) })
	if err != nil {
		t.Errorf("RemoveDivert with nothing installed: %v", err)
	}
	requireSameState(t, before, n.snapshot(t))
}

// TestHostInputOpening: with nftables, the iptables INPUT chain is opened for
// diverted packets only where it filters, taken out by Remove and by
// Cleanup after a crash; an iptables that does not work here (a router
// without its modules) does not fail the start.
func TestHostInputOpening(t *testing.T) {
	testenv.RequireTools(t, "iptables", "ip6tables")
	opening := func(n *testNS) int {
		return strings.Count(n.run(t, "iptables", "-S", "INPUT"), "-j TPGW_IN") + strings.Count(n.run(t, "ip6tables", "-S", "INPUT"), "-j TPGW_IN")
	}
	t.Run("not filtering", func(t *testing.T) {
		n := newTestNS(t, true)
		inst, err := apply(t, n, NewNftables(testLogger(t)), mustPlan(t, DefaultOptions()), t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		if k := opening(n); k != 0 {
			t.Errorf("%d jumps to TPGW_IN on a host whose INPUT accepts everything", k)
		}
		remove(t, n, inst)
	})
	t.Run("filtering", func(t *testing.T) {
		n := newTestNS(t, true)
		n.run(t, "iptables", "-P", "INPUT", "DROP")
		n.run(t, "ip6tables", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT")
		before := n.snapshot(t)
		stateDir := t.TempDir()
		inst, err := apply(t, n, NewNftables(testLogger(t)), mustPlan(t, DefaultOptions()), stateDir)
		if err != nil {
			t.Fatal(err)
		}
		if k := opening(n); k != 2 {
			t.Errorf("%d jumps to TPGW_IN, want 2 (v4 policy DROP, v6 with a rule)", k)
		}
		remove(t, n, inst)
		requireSameState(t, before, n.snapshot(t))
		// A crash leaves it; Cleanup (the next start) takes it out.
		if _, err := apply(t, n, NewNftables(testLogger(t)), mustPlan(t, DefaultOptions()), stateDir); err != nil {
			t.Fatal(err)
		}
		cleanup(t, n, stateDir)
		requireSameState(t, before, n.snapshot(t))
	})
	t.Run("opening fails", func(t *testing.T) {
		// The IPv4 opening goes in, the IPv6 one fails half-way (its chain
		// made, its rule refused): the start fails and leaves nothing, the
		// nft table included.
		n := newTestNS(t, true)
		n.run(t, "iptables", "-P", "INPUT", "DROP")
		n.run(t, "ip6tables", "-P", "INPUT", "DROP")
		before := n.snapshot(t)
		real, err := exec.LookPath("ip6tables")
		if err != nil {
			t.Fatal(err)
		}
		bin := t.TempDir()
		script := "#!/bin/sh\ncase \" $* \" in *\" -A " + iptChainName(ChainInput) + " \"*) echo refused >&2; exit 1;; esac\nexec " + real + " \"$@\"\n"
		if err := os.WriteFile(filepath.Join(bin, "ip6tables"), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
		path := os.Getenv("PATH")
		t.Setenv("PATH", bin+":"+path)
		_, err = apply(t, n, NewNftables(testLogger(t)), mustPlan(t, DefaultOptions()), t.TempDir())
		os.Setenv("PATH", path)
		if err == nil {
			t.Fatal("Apply succeeded with an ip6tables that refuses the opening's rule")
		}
		requireSameState(t, before, n.snapshot(t))
	})
	t.Run("iptables broken", func(t *testing.T) {
		n := newTestNS(t, true)
		bin := t.TempDir()
		for _, name := range []string{"iptables", "ip6tables"} {
			// What iptables-legacy prints without its kernel modules.
			script := "#!/bin/sh\nif [ \"$1\" = --version ]; then echo \"$0 v1.8.9 (legacy)\"; exit 0; fi\n" +
				"echo \"$0 v1.8.9 (legacy): can't initialize iptables table \\`filter': Table does not exist (do you need to insmod?)\" >&2\nexit 3\n"
			if err := os.WriteFile(filepath.Join(bin, name), []byte(script), 0o755); err != nil {
				t.Fatal(err)
			}
		}
		path := os.Getenv("PATH")
		t.Setenv("PATH", bin+":"+path)
		inst, err := apply(t, n, NewNftables(testLogger(t)), mustPlan(t, DefaultOptions()), t.TempDir())
		os.Setenv("PATH", path)
		if err != nil {
			t.Fatalf("Apply with an iptables that does not run: %v", err)
		}
		remove(t, n, inst)
	})
}

// TestRemoveDivertMidUpdate: a crash in the middle of an iptables update
// (the old chains deleted, the new ones not yet renamed) leaves jumps to
// the chains that still carry their _NEW suffix; the watchdog's RemoveDivert
// takes those out too.
func TestRemoveDivertMidUpdate(t *testing.T) {
	n := newTestNS(t, true)
	b := newBackend(t, n, "iptables", "")
	before := n.snapshot(t)
	stateDir := t.TempDir()
	if _, err := apply(t, n, b, mustPlan(t, DefaultOptions()), stateDir); err != nil {
		t.Fatal(err)
	}
	// Renaming keeps the jumps pointing at the chains: the state update
	// leaves just before its renames.
	for _, ipt := range []string{"iptables", "ip6tables"} {
		for _, table := range iptTables {
			for line := range strings.Lines(n.run(t, ipt, "-t", table, "-S")) {
				if f := strings.Fields(line); len(f) == 2 && f[0] == "-N" && strings.HasPrefix(f[1], iptPrefix) {
					n.run(t, ipt, "-t", table, "-E", f[1], f[1]+iptNewSuffix)
				}
			}
		}
	}
	divNew := iptChainName(ChainDivert) + iptNewSuffix
	if !strings.Contains(n.run(t, "iptables", "-t", "mangle", "-S"), "-j "+divNew) {
		t.Fatalf("no jump to %s to start from:\n%s", divNew, n.run(t, "iptables", "-t", "mangle", "-S"))
	}
	var err error
	n.in(t, func() { err = RemoveDivert(testLogger(t)) })
	if err != nil {
		t.Fatalf("RemoveDivert: %v", err)
	}
	for _, ipt := range []string{"iptables", "ip6tables"} {
		for line := range strings.Lines(n.run(t, ipt, "-t", "mangle", "-S")) {
			if strings.Contains(ruleTarget(strings.TrimSpace(line)), "DIVERT") {
				t.Errorf("%s: a jump into a divert chain is left: %s", ipt, strings.TrimSpace(line))
			}
		}
	}
	cleanup(t, n, stateDir)
	requireSameState(t, before, n.snapshot(t))
}

// TestCleanupSysctlGone: a recorded sysctl whose key has gone since (its
// module unloaded while tpgw was down) does not fail the next start's
// Cleanup; the others are restored and the record is deleted.
func TestCleanupSysctlGone(t *testing.T) {
	n := newTestNS(t, true)
	stateDir := t.TempDir()
	n.run(t, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	const gone = "net.tpgw-test-gone.knob"
	if err := saveSysctlState(stateDir, []sysctlChange{
		{Key: "net.ipv4.ip_forward", Old: "0", New: "1"},
		{Key: gone, Old: "1", New: "0"},
	}); err != nil {
		t.Fatal(err)
	}
	cleanup(t, n, stateDir)
	if got := strings.TrimSpace(n.run(t, "cat", "/proc/sys/net/ipv4/ip_forward")); got != "0" {
		t.Errorf("ip_forward = %s after Cleanup, want the recorded 0", got)
	}
	if _, err := os.Stat(filepath.Join(stateDir, sysctlStateFile)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the sysctl record is still there after Cleanup (%v)", err)
	}
}

// TestIPv6DisabledLegacyIP6Tables: on a kernel booted with ipv6.disable=1,
// iptables-legacy's ip6tables runs but fails on every table. With IPv6 off
// in the plan (as tpgw fits it to such a host), the start, the stop and the
// watchdog's RemoveDivert leave ip6tables alone instead of failing on it.
func TestIPv6DisabledLegacyIP6Tables(t *testing.T) {
	n := newTestNS(t, true)
	old := ipv6Conf
	ipv6Conf = filepath.Join(t.TempDir(), "missing") // what ipv6.disable=1 shows
	t.Cleanup(func() { ipv6Conf = old })
	bin := t.TempDir()
	script := "#!/bin/sh\nif [ \"$1\" = --version ]; then echo \"$0 v1.8.9 (legacy)\"; exit 0; fi\n" +
		"echo \"$0 v1.8.9 (legacy): can't initialize ip6tables table \\`mangle': Address family not supported by protocol\" >&2\nexit 3\n"
	if err := os.WriteFile(filepath.Join(bin, "ip6tables"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	path := os.Getenv("PATH")
	t.Setenv("PATH", bin+":"+path)
	o := DefaultOptions()
	o.IPv6 = false
	for _, backend := range backendNames {
		inst, err := apply(t, n, newBackend(t, n, backend, ""), mustPlan(t, o), t.TempDir())
		if err != nil {
			t.Fatalf("%s: Apply: %v", backend, err)
		}
		n.in(t, func() { err = RemoveDivert(testLogger(t)) })
		if err != nil {
			t.Errorf("%s: RemoveDivert: %v", backend, err)
		}
		remove(t, n, inst)
	}
}

// TestIPTJumpsDeletedBySpec: Cleanup deletes our jumps by their spec, so a
// rule another tool inserts at the top of a built-in chain between the -S
// and the -D stays, and a jump whose comment iptables quotes is read back.
func TestIPTJumpsDeletedBySpec(t *testing.T) {
	testenv.RequireTools(t, "iptables")
	n := newTestNS(t, true)
	b := newBackend(t, n, "iptables", "")
	before := n.snapshot(t)
	stateDir := t.TempDir()
	if _, err := apply(t, n, b, mustPlan(t, DefaultOptions()), stateDir); err != nil {
		t.Fatal(err)
	}
	const quoted = `a "tpgw" jump\ that's quoted`
	n.run(t, "iptables", "-t", "mangle", "-N", iptPrefix+"TEST")
	n.run(t, "iptables", "-t", "mangle", "-A", "OUTPUT", "-m", "comment", "--comment", quoted, "-j", iptPrefix+"TEST")
	if s := n.run(t, "iptables", "-t", "mangle", "-S", "OUTPUT"); !strings.Contains(s, `\"tpgw\"`) {
		t.Fatalf("iptables -S does not quote the comment as expected:\n%s", s)
	}
	foreign := []string{"-s", "192.0.2.77/32", "-m", "comment", "--comment", "another tool", "-j", "ACCEPT"}
	inserted := false
	afterIPTList = func(table, chain string) {
		if table == "mangle" && chain == "PREROUTING" && !inserted {
			inserted = true
			n.run(t, append([]string{"iptables", "-t", "mangle", "-I", "PREROUTING", "1"}, foreign...)...)
		}
	}
	t.Cleanup(func() { afterIPTList = nil })
	cleanup(t, n, stateDir)
	afterIPTList = nil
	if !inserted {
		t.Fatal("Cleanup never listed mangle PREROUTING")
	}
	pre := n.run(t, "iptables", "-t", "mangle", "-S", "PREROUTING")
	if !strings.Contains(pre, "192.0.2.77") {
		t.Errorf("the rule another tool inserted is gone:\n%s", pre)
	}
	for _, table := range iptTables {
		if s := n.run(t, "iptables", "-t", table, "-S"); strings.Contains(s, iptPrefix) {
			t.Errorf("iptables -t %s still holds tpgw's rules:\n%s", table, s)
		}
	}
	n.run(t, append([]string{"iptables", "-t", "mangle", "-D", "PREROUTING"}, foreign...)...)
	requireSameState(t, before, n.snapshot(t))
}

func TestSplitIPTRule(t *testing.T) {
	for _, c := range []struct {
		line string
		want []string
	}{
		{"-A PREROUTING -m comment --comment tpgw -j TPGW_PRE", []string{"-A", "PREROUTING", "-m", "comment", "--comment", "tpgw", "-j", "TPGW_PRE"}},
		{`-A OUTPUT ! -s 10.0.0.0/8 -m comment --comment "two words" -j TPGW_OUT`, []string{"-A", "OUTPUT", "!", "-s", "10.0.0.0/8", "-m", "comment", "--comment", "two words", "-j", "TPGW_OUT"}},
		{`-A X -m comment --comment "a \"q\" \\ b\'s" -j Y`, []string{"-A", "X", "-m", "comment", "--comment", `a "q" \ b's`, "-j", "Y"}},
		{`-A X -m comment --comment "" -j Y`, []string{"-A", "X", "-m", "comment", "--comment", "", "-j", "Y"}},
	} {
		got, err := splitIPTRule(c.line)
		if err != nil || !slices.Equal(got, c.want) {
			t.Errorf("splitIPTRule(%s) = %q, %v; want %q", c.line, got, err, c.want)
		}
	}
	for _, bad := range []string{`-A X --comment "open`, `-A X --comment "ends \`} {
		if _, err := splitIPTRule(bad); err == nil {
			t.Errorf("splitIPTRule(%s) took an unreadable line", bad)
		}
	}
}

// TestNetworksOverlapping: the host's networks that overlap the fake-ip
// ranges are found, by interface, in both families; others and loopback
// are not.
func TestNetworksOverlapping(t *testing.T) {
	n := newTestNS(t, true)
	n.run(t, "ip", "link", "add", "lan9", "type", "veth", "peer", "name", "lan9p")
	n.run(t, "ip", "link", "set", "lan9", "up")
	n.run(t, "ip", "addr", "add", "198.18.5.1/24", "dev", "lan9")
	n.run(t, "ip", "addr", "add", "10.1.2.3/24", "dev", "lan9")
	n.run(t, "ip", "addr", "add", "198.0.0.1/7", "dev", "lan9")
	n.run(t, "ip", "-6", "addr", "add", "fdfe:dcba:9876::5/64", "dev", "lan9", "nodad")
	n.run(t, "ip", "addr", "add", "198.18.9.9/32", "dev", "lo")
	var got []OutsideLAN
	var err error
	n.in(t, func() {
		got, err = NetworksOverlapping(netip.MustParsePrefix("198.18.0.1/16"), netip.MustParsePrefix("fdfe:dcba:9876::/64"))
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []OutsideLAN{
		{"lan9", netip.MustParsePrefix("198.18.5.0/24")},
		{"lan9", netip.MustParsePrefix("198.0.0.0/7")},
		{"lan9", netip.MustParsePrefix("fdfe:dcba:9876::/64")},
	}
	for _, w := range want {
		if !slices.Contains(got, w) {
			t.Errorf("%v not found in %v", w, got)
		}
	}
	if len(got) != len(want) {
		t.Errorf("found %v, want %v", got, want)
	}
	n.in(t, func() { got, err = NetworksOverlapping(netip.Prefix{}) })
	if err != nil || len(got) != 0 {
		t.Errorf("no range: %v, %v", got, err)
	}
}

// TestNotInterceptedPointToPoint: a LAN on a point-to-point interface (a
// tun, WireGuard or PPP device) numbered from a global IPv6 prefix is
// reported like any other; the WAN, which holds the default route, is not.
// Before, the link flags were read as the kernel's IFF_ bits, and
// IFF_LOOPBACK's bit is Go's FlagPointToPoint, so such interfaces were left out.
func TestNotInterceptedPointToPoint(t *testing.T) {
	testenv.RequireTools(t, "ip")
	n := newTestNS(t, true)
	n.run(t, "ip", "tuntap", "add", "dev", "tun9", "mode", "tun")
	n.run(t, "ip", "link", "set", "tun9", "up")
	n.run(t, "ip", "-6", "addr", "add", "2001:db8:5::1/64", "dev", "tun9", "nodad")
	n.run(t, "ip", "link", "add", "wan9", "type", "veth", "peer", "name", "wan9p")
	n.run(t, "ip", "link", "set", "wan9", "up")
	n.run(t, "ip", "link", "set", "wan9p", "up")
	n.run(t, "ip", "-6", "addr", "add", "2001:db8:99::2/64", "dev", "wan9", "nodad")
	n.run(t, "ip", "-6", "route", "add", "default", "via", "2001:db8:99::1", "dev", "wan9")
	var got []OutsideLAN
	var err error
	n.in(t, func() { got, err = NotIntercepted(Options{IPv6: true}) })
	if err != nil {
		t.Fatal(err)
	}
	want := []OutsideLAN{{"tun9", netip.MustParsePrefix("2001:db8:5::/64")}}
	if !slices.Equal(got, want) {
		t.Errorf("NotIntercepted = %v, want %v", got, want)
	}
}

// TestIPTablesIPv6OffGuard: with IPv6 not intercepted, the iptables backend
// still guards the TPROXY and DNS ports over IPv6 (tpgw's listeners take
// IPv6 too), as nftables' inet input chain does, and removes the guard.
func TestIPTablesIPv6OffGuard(t *testing.T) {
	testenv.RequireTools(t, "iptables", "ip6tables")
	n := newTestNS(t, true)
	b := newBackend(t, n, "iptables", "")
	before := n.snapshot(t)
	o := DefaultOptions()
	o.IPv6 = false
	o.DNSPort, o.DNSAddr = 1053, netip.IPv4Unspecified()
	inst, err := apply(t, n, b, mustPlan(t, o), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	in6 := n.run(t, "ip6tables", "-t", "filter", "-S")
	for _, want := range []string{"-A INPUT -m comment --comment tpgw -j TPGW_IN", "--dport 1053", "--dport 7893"} {
		if !strings.Contains(in6, want) {
			t.Errorf("ip6tables lacks %q:\n%s", want, in6)
		}
	}
	if m := n.run(t, "ip6tables", "-t", "mangle", "-S"); strings.Contains(m, iptPrefix) {
		t.Errorf("IPv6 not intercepted, yet ip6tables mangle holds tpgw's chains:\n%s", m)
	}
	remove(t, n, inst)
	requireSameState(t, before, n.snapshot(t))
}

// TestForwardingKeepsRAs: turning IPv6 forwarding on sets accept_ra=2 where
// it was 1 (the kernel would otherwise ignore Router Advertisements there,
// and a default route learnt from them would expire), on names with a dot
// too, and Remove puts 1 back; lo is left alone.
func TestForwardingKeepsRAs(t *testing.T) {
	n := newTestNS(t, true)
	n.run(t, "ip", "link", "add", "wan7", "type", "veth", "peer", "name", "wan7.100")
	n.run(t, "sysctl", "-qw", "net.ipv6.conf.wan7.accept_ra=1")
	n.run(t, "sysctl", "-qw", "net.ipv6.conf.wan7/100.accept_ra=1")
	n.run(t, "sysctl", "-qw", "net.ipv6.conf.lo.accept_ra=1")
	o := DefaultOptions()
	o.Forward, o.IPv6 = true, true
	before := n.snapshot(t)
	inst, err := apply(t, n, newBackend(t, n, "nftables", ""), mustPlan(t, o), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ra := func(iface string) string {
		return strings.TrimSpace(n.run(t, "cat", "/proc/sys/net/ipv6/conf/"+iface+"/accept_ra"))
	}
	if got := ra("wan7"); got != "2" {
		t.Errorf("wan7 accept_ra = %s with forwarding on, want 2", got)
	}
	if got := ra("wan7.100"); got != "2" {
		t.Errorf("wan7.100 accept_ra = %s with forwarding on, want 2", got)
	}
	if got := ra("lo"); got != "1" {
		t.Errorf("lo accept_ra = %s, want it left alone", got)
	}
	remove(t, n, inst)
	for _, iface := range []string{"wan7", "wan7.100"} {
		if got := ra(iface); got != "1" {
			t.Errorf("%s accept_ra = %s after Remove, want 1 back", iface, got)
		}
	}
	requireSameState(t, before, n.snapshot(t))
}

// TestMarkRulesAhead: an ip rule before tpgw's whose fwmark/mask matches
// tpgw's mark (mwan3's, for its second WAN) is found; one whose mask does
// not match, one after tpgw's and one without fwmark are not.
func TestMarkRulesAhead(t *testing.T) {
	n := newTestNS(t, true)
	n.run(t, "ip", "rule", "add", "fwmark", "0x200/0x3f00", "lookup", "2", "pref", "2002")
	n.run(t, "ip", "rule", "add", "fwmark", "0x100/0x3f00", "lookup", "1", "pref", "2001")
	n.run(t, "ip", "rule", "add", "fwmark", "0x29a", "lookup", "5", "pref", "20000")
	n.run(t, "ip", "rule", "add", "from", "10.9.0.0/16", "lookup", "6", "pref", "3000")
	n.run(t, "ip", "-6", "rule", "add", "not", "fwmark", "0xca6c", "lookup", "7", "pref", "4000")
	var got []string
	var err error
	n.in(t, func() { got, err = MarkRulesAhead(0x29a) })
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"ip -4 rule 2002: fwmark 0x200/0x3f00 lookup 2", "ip -6 rule 4000: not fwmark 0xca6c/0xffffffff lookup 7"}
	if !slices.Equal(got, want) {
		t.Errorf("MarkRulesAhead = %q, want %q", got, want)
	}
}
