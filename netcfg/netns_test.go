package netcfg

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
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

// snapshot is the kernel state netcfg may touch, as the standard tools print it.
func (n *testNS) snapshot(t *testing.T) map[string]string {
	t.Helper()
	return map[string]string{
		"nft list ruleset":    n.run(t, "nft", "list", "ruleset"),
		"ip -4 rule":          n.run(t, "ip", "-4", "rule"),
		"ip -6 rule":          n.run(t, "ip", "-6", "rule"),
		"ip -4 route":         n.run(t, "ip", "-4", "route", "show", "table", "all"),
		"ip -6 route":         n.run(t, "ip", "-6", "route", "show", "table", "all"),
		"ipv4 ip_forward":     n.run(t, "cat", "/proc/sys/net/ipv4/ip_forward"),
		"ipv6 all.forwarding": n.run(t, "cat", "/proc/sys/net/ipv6/conf/all/forwarding"),
	}
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

// requireInstalled checks the plan is in the kernel once: every rule, both ip
// rules and routes, and the sysctls.
func requireInstalled(t *testing.T, n *testNS, p *Plan) {
	t.Helper()
	table := n.run(t, "nft", "list", "table", "inet", TableName)
	for _, want := range []string{"tproxy ip to :7893", "set bypass4", "hook prerouting priority mangle", "socket transparent 1"} {
		if !strings.Contains(table, want) {
			t.Errorf("nft table lacks %q:\n%s", want, table)
		}
	}
	if got := strings.Count(table, "comment \""); got != len(p.Rules) {
		t.Errorf("nft table has %d rules, want %d:\n%s", got, len(p.Rules), table)
	}
	if p.Options.IPv6 != strings.Contains(table, "tproxy ip6 to :7893") {
		t.Errorf("IPv6=%v but table is:\n%s", p.Options.IPv6, table)
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

func TestApplyRemove(t *testing.T) {
	for name, o := range goldenCases() {
		t.Run(name, func(t *testing.T) {
			n := newTestNS(t, true)
			p := mustPlan(t, o)
			stateDir := t.TempDir()
			before := n.snapshot(t)

			inst, err := apply(t, n, NewNftables(testLogger(t)), p, stateDir)
			if err != nil {
				t.Fatalf("Apply: %v", err)
			}
			requireInstalled(t, n, p)
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
}

func TestCleanupAfterCrash(t *testing.T) {
	n := newTestNS(t, true)
	p := mustPlan(t, DefaultOptions())
	stateDir := t.TempDir()
	before := n.snapshot(t)
	if _, err := apply(t, n, NewNftables(testLogger(t)), p, stateDir); err != nil {
		t.Fatalf("Apply: %v", err)
	}
	requireInstalled(t, n, p)
	// The Installed value is dropped, as if the process had been killed.
	cleanup(t, n, stateDir)
	requireSameState(t, before, n.snapshot(t))
	cleanup(t, n, stateDir) // idempotent: nothing there is no error
	requireSameState(t, before, n.snapshot(t))
}

func TestCleanupEmpty(t *testing.T) {
	n := newTestNS(t, true)
	before := n.snapshot(t)
	cleanup(t, n, t.TempDir())
	cleanup(t, n, "")
	requireSameState(t, before, n.snapshot(t))
}

func TestApplyTwice(t *testing.T) {
	n := newTestNS(t, true)
	p := mustPlan(t, DefaultOptions())
	stateDir := t.TempDir()
	before := n.snapshot(t)
	b := NewNftables(testLogger(t))
	if _, err := apply(t, n, b, p, stateDir); err != nil {
		t.Fatalf("first Apply: %v", err)
	}
	inst, err := apply(t, n, b, p, stateDir)
	if err != nil {
		t.Fatalf("second Apply: %v", err)
	}
	requireInstalled(t, n, p) // exactly one copy of everything
	remove(t, n, inst)
	// The second Apply recorded the sysctls only after restoring the first
	// run's values, so Remove brings back the original ones, not "1".
	requireSameState(t, before, n.snapshot(t))
}

func TestApplyFailureLeavesNothing(t *testing.T) {
	failAt := func(step string) func(string) error {
		return func(s string) error {
			if s == step {
				return errors.New("injected failure")
			}
			return nil
		}
	}
	for _, step := range []string{stepNft, stepRules, stepRoutes, stepSysctl} {
		t.Run(step, func(t *testing.T) {
			n := newTestNS(t, true)
			before := n.snapshot(t)
			stateDir := t.TempDir()
			b := &nftBackend{log: testLogger(t), beforeStep: failAt(step)}
			inst, err := apply(t, n, b, mustPlan(t, DefaultOptions()), stateDir)
			if err == nil || inst != nil {
				t.Fatalf("Apply = %v, %v; want an error", inst, err)
			}
			t.Log(err)
			requireSameState(t, before, n.snapshot(t))
		})
	}

	// The kernel refuses a local route on a device that is down: the route
	// step fails for real after the nft table and ip rules went in.
	t.Run("kernel rejects route", func(t *testing.T) {
		n := newTestNS(t, false)
		before := n.snapshot(t)
		_, err := apply(t, n, NewNftables(testLogger(t)), mustPlan(t, DefaultOptions()), t.TempDir())
		if err == nil || !strings.Contains(err.Error(), "netcfg: add ip route local") {
			t.Fatalf("Apply error = %v, want the route step to fail", err)
		}
		t.Log(err)
		requireSameState(t, before, n.snapshot(t))
	})

	// Overlapping interval elements make the kernel abort the whole nft batch.
	t.Run("kernel rejects nft batch", func(t *testing.T) {
		n := newTestNS(t, true)
		before := n.snapshot(t)
		p := mustPlan(t, DefaultOptions())
		p.Sets[0].Elements = append(p.Sets[0].Elements, rangeOf(mustPrefixes("10.1.0.0/16")[0]))
		_, err := apply(t, n, NewNftables(testLogger(t)), p, t.TempDir())
		if err == nil || !strings.Contains(err.Error(), "netcfg: add nft table inet tpgw") {
			t.Fatalf("Apply error = %v, want the nft step to fail", err)
		}
		t.Log(err)
		requireSameState(t, before, n.snapshot(t))
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
