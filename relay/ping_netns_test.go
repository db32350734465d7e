package relay_test

import (
	"net/netip"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/tpgw/tpgw/internal/testenv"
	"github.com/tpgw/tpgw/internal/testnet"
	"github.com/tpgw/tpgw/netcfg"
	"github.com/tpgw/tpgw/relay"
)

var (
	fakeRange4 = netip.MustParsePrefix("198.18.0.0/16")
	fakeRange6 = netip.MustParsePrefix("fdfe:dcba:9876::/64")
)

// ping runs ping in the client namespace and returns how many replies came
// back (duplicates counted apart).
func ping(t *testing.T, tp *testnet.Topology, dst string) (replies, dups int, out string) {
	t.Helper()
	out, _ = tp.Client.Run(t, 15*time.Second, "ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", dst)
	if m := regexp.MustCompile(`(\d+) received`).FindStringSubmatch(out); m != nil {
		for _, c := range m[1] {
			replies = replies*10 + int(c-'0')
		}
	}
	return replies, strings.Count(out, "DUP!"), out
}

// TestPingFakeIP: netcfg's real rules route a client's pings to the fake-ip
// ranges to the gateway; the PingResponder answers IPv4 from the fake IP
// (the kernel cannot), the kernel answers IPv6; no reply comes twice.
func TestPingFakeIP(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTools(t, "ping")
	tp := testnet.New(t)
	plan, err := netcfg.BuildPlan(netcfg.Options{
		Mark: 666, Table: 666, TProxyPort: tproxyPort,
		Interfaces: []string{testnet.LANIface}, IPv6: true,
		FakeIPRange: fakeRange4, FakeIPRange6: fakeRange6,
	})
	if err != nil {
		t.Fatal(err)
	}
	var inst *netcfg.Installed
	if err := tp.Gateway.Do(func() (err error) {
		inst, err = netcfg.NewNftables(testLogger(t)).Apply(plan, t.TempDir())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := tp.Gateway.Do(inst.Remove); err != nil {
			t.Errorf("remove netcfg plan: %v", err)
		}
	}()

	// Without a responder nothing answers an IPv4 fake IP: the kernel's own
	// reply would come from an address that is not the gateway's.
	if n, _, out := ping(t, tp, "198.18.0.5"); n != 0 {
		t.Errorf("IPv4 fake IP answered with no responder running:\n%s", out)
	}

	var resp *relay.PingResponder
	if err := tp.Gateway.Do(func() (err error) {
		resp, err = relay.ListenPing(fakeRange4, testLogger(t))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- resp.Serve() }()
	defer func() {
		resp.Close()
		waitServe(t, served)
	}()

	for _, dst := range []string{"198.18.0.5", "198.18.255.254", "fdfe:dcba:9876::5"} {
		n, dups, out := ping(t, tp, dst)
		if n != 3 || dups != 0 {
			t.Errorf("ping %s: %d replies, %d duplicates; want 3 and 0:\n%s", dst, n, dups, out)
		}
		if !strings.Contains(out, "from "+dst+":") {
			t.Errorf("ping %s: replies do not come from the fake IP:\n%s", dst, out)
		}
	}
	if got := resp.Replies(); got != 6 {
		t.Errorf("responder sent %d replies, want 6 (IPv4 only)", got)
	}
	// Outside the fake range the rules and the responder change nothing: the
	// upstream answers its own address, through the gateway's forwarding.
	tp.Gateway.SetSysctl(t, "net.ipv4.ip_forward", "1")
	if n, _, out := ping(t, tp, tp.UpstreamIP.String()); n != 3 {
		t.Errorf("ping the upstream: %d replies, want 3:\n%s", n, out)
	}
	if got := resp.Replies(); got != 6 {
		t.Errorf("responder answered a ping outside the fake range (%d replies)", got)
	}

	// After a reload to another range, the old one is no longer answered.
	if err := resp.SetPrefix(netip.MustParsePrefix("198.19.0.0/16")); err != nil {
		t.Fatal(err)
	}
	if n, _, out := ping(t, tp, "198.18.0.5"); n != 0 {
		t.Errorf("old range still answered after SetPrefix:\n%s", out)
	}
}
