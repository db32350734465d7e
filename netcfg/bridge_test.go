package netcfg

import (
	"slices"
	"testing"
)

// br_netfilter's bridge-layer prerouting defeats tproxy (bridge.go): every
// plan turns bridge-nf-call off, for the families it intercepts, and only
// where br_netfilter is loaded.
func TestPlanBridgeNetfilterSysctls(t *testing.T) {
	for _, ipv6 := range []bool{true, false} {
		o := DefaultOptions()
		o.IPv6, o.Forward = ipv6, false
		p, err := BuildPlan(o)
		if err != nil {
			t.Fatal(err)
		}
		want := []Sysctl{{Key: "net.bridge.bridge-nf-call-iptables", Value: "0", IfPresent: true}}
		if ipv6 {
			want = append(want, Sysctl{Key: "net.bridge.bridge-nf-call-ip6tables", Value: "0", IfPresent: true})
		}
		if !slices.Equal(p.Sysctls, want) {
			t.Errorf("ipv6=%v: sysctls %v, want %v", ipv6, p.Sysctls, want)
		}
	}
}

// A sysctl with IfPresent whose key the kernel lacks (module not loaded) is
// skipped, not an error, and nothing is recorded for it.
func TestApplySysctlsSkipsAbsent(t *testing.T) {
	dir := t.TempDir()
	changed, err := applySysctls(dir, []Sysctl{{Key: "net.tpgw-no-such-module.knob", Value: "0", IfPresent: true}})
	if err != nil || len(changed) != 0 {
		t.Fatalf("applySysctls = %v, %v; want nothing changed and no error", changed, err)
	}
	if recorded, err := loadSysctlState(dir); err != nil || len(recorded) != 0 {
		t.Fatalf("record = %v, %v; want none", recorded, err)
	}
	if _, err := applySysctls(dir, []Sysctl{{Key: "net.tpgw-no-such-module.knob", Value: "0"}}); err == nil {
		t.Fatal("a missing sysctl without IfPresent must be an error")
	}
}
