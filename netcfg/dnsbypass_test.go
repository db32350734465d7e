package netcfg

import (
	"errors"
	"net/netip"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestDNSBypassSet: with dns-bypass the table has two empty timeout sets;
// Add puts addresses in with their timeout (and refreshes it), Flush empties
// them, and Remove leaves nothing behind.
func TestDNSBypassSet(t *testing.T) {
	n := newTestNS(t, true)
	o := DefaultOptions()
	o.DNSBypass = true
	before := n.snapshot(t)
	inst, set := applyBypassSet(t, n, o)

	list := func(name string) string { return n.run(t, "nft", "list", "set", "inet", TableName, name) }
	v4, v6 := netip.MustParseAddr("203.0.113.2"), netip.MustParseAddr("2001:db8:1::2")
	if err := set.Add([]netip.Addr{v4, v6, netip.MustParseAddr("::ffff:203.0.113.9")}, 90*time.Second); err != nil {
		t.Fatalf("Add: %v", err)
	}
	for name, want := range map[string]*regexp.Regexp{
		SetDNSBypass4: regexp.MustCompile(`203\.0\.113\.2 timeout 1m30s expires 1m[23]\d`),
		SetDNSBypass6: regexp.MustCompile(`2001:db8:1::2 timeout 1m30s expires 1m[23]\d`),
	} {
		if got := list(name); !want.MatchString(got) {
			t.Errorf("set %s lacks %s:\n%s", name, want, got)
		}
	}
	if got := list(SetDNSBypass4); !strings.Contains(got, "203.0.113.9 timeout") {
		t.Errorf("a v4-mapped address is not added as v4:\n%s", got)
	}
	// Adding again sets the new timeout.
	if err := set.Add([]netip.Addr{v4}, 10*time.Minute); err != nil {
		t.Fatalf("Add again: %v", err)
	}
	if got := list(SetDNSBypass4); !strings.Contains(got, "203.0.113.2 timeout 10m") {
		t.Errorf("timeout not refreshed:\n%s", got)
	}
	// A shorter one too (the element is made anew), beside a new element.
	if err := set.Add([]netip.Addr{v4, netip.MustParseAddr("203.0.113.7")}, 2*time.Minute); err != nil {
		t.Fatalf("Add a shorter timeout: %v", err)
	}
	if got := list(SetDNSBypass4); !regexp.MustCompile(`203\.0\.113\.2 timeout 2m expires (2m|1m5\d)`).MatchString(got) ||
		!strings.Contains(got, "203.0.113.7 timeout 2m") || !strings.Contains(got, "203.0.113.9 timeout") {
		t.Errorf("after adding again with 2m:\n%s", got)
	}
	if err := set.Flush(); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	for _, name := range []string{SetDNSBypass4, SetDNSBypass6} {
		if got := list(name); strings.Contains(got, "elements") {
			t.Errorf("set %s not empty after Flush:\n%s", name, got)
		}
	}
	if err := set.Add([]netip.Addr{v4}, time.Minute); err != nil {
		t.Fatalf("Add after Flush: %v", err)
	}
	remove(t, n, inst)
	requireSameState(t, before, n.snapshot(t))
}

// TestDNSBypassSetRefused: the sets are only there when the plan asks for
// them, and only with nftables.
func TestDNSBypassSetRefused(t *testing.T) {
	n := newTestNS(t, true)
	inst, err := apply(t, n, newBackend(t, n, "nftables", ""), mustPlan(t, DefaultOptions()), t.TempDir())
	if err != nil {
		t.Fatalf("Apply: %v", err)
	}
	defer remove(t, n, inst)
	if _, err := inst.DNSBypassSet(); err == nil || !strings.Contains(err.Error(), "dns-bypass is off") {
		t.Errorf("DNSBypassSet without dns-bypass: %v", err)
	}
	o := DefaultOptions()
	o.DNSBypass = true
	if s := mustPlan(t, o).Render("iptables"); !strings.Contains(s, ErrDNSBypassIPTables.Error()) {
		t.Errorf("iptables rendering does not say dns-bypass is unsupported:\n%s", s)
	}
	if _, err := iptablesChains(mustPlan(t, o), IPv4, ""); !errors.Is(err, ErrDNSBypassIPTables) {
		t.Errorf("iptablesChains: %v", err)
	}
}

// TestDNSBypassSetFollowsUpdate: a reload that turns IPv6 on gives the new
// table a dns_bypass6, and the set opened before adds IPv6 addresses to
// it; one that turns IPv6 off leaves no dns_bypass6, and Flush (which a
// reload calls) still works. Before, the set kept the start's IPv6.
func TestDNSBypassSetFollowsUpdate(t *testing.T) {
	n := newTestNS(t, true)
	o := DefaultOptions()
	o.DNSBypass, o.IPv6 = true, false
	before := n.snapshot(t)
	inst, set := applyBypassSet(t, n, o)
	var err error
	update := func(ipv6 bool) {
		t.Helper()
		o.IPv6 = ipv6
		n.in(t, func() { err = inst.Update(mustPlan(t, o)) })
		if err != nil {
			t.Fatalf("Update (ipv6 %v): %v", ipv6, err)
		}
	}
	update(true)
	v6 := netip.MustParseAddr("2001:db8:1::2")
	if err := set.Add([]netip.Addr{v6}, time.Minute); err != nil {
		t.Fatalf("Add: %v", err)
	}
	if got := n.run(t, "nft", "list", "set", "inet", TableName, SetDNSBypass6); !strings.Contains(got, "2001:db8:1::2 timeout") {
		t.Errorf("IPv6 turned on by a reload: the address is not in %s:\n%s", SetDNSBypass6, got)
	}
	update(false)
	if err := set.Flush(); err != nil {
		t.Errorf("Flush after IPv6 was turned off: %v", err)
	}
	if err := set.Add([]netip.Addr{netip.MustParseAddr("203.0.113.2"), v6}, time.Minute); err != nil {
		t.Errorf("Add after IPv6 was turned off: %v", err)
	}
	remove(t, n, inst)
	requireSameState(t, before, n.snapshot(t))
}

// applyBypassSet applies o with nftables in n and opens its dns-bypass
// sets, closed when the test ends.
func applyBypassSet(t *testing.T, n *testNS, o Options) (*Installed, *DNSBypassSet) {
	t.Helper()
	inst, err := apply(t, n, newBackend(t, n, "nftables", ""), mustPlan(t, o), t.TempDir())
	if err != nil {
		t.Fatalf("Apply: %v", err)
	}
	var set *DNSBypassSet
	n.in(t, func() { set, err = inst.DNSBypassSet() })
	if err != nil {
		t.Fatalf("DNSBypassSet: %v", err)
	}
	t.Cleanup(func() { set.Close() })
	return inst, set
}
