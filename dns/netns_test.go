package dns

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	D "github.com/miekg/dns"

	"github.com/tpgw/tpgw/internal/testenv"
	"github.com/tpgw/tpgw/internal/testnet"
	"github.com/tpgw/tpgw/netcfg"
)

// TestHijackedQueries runs the server in the gateway namespace behind the real
// netcfg rules and asks dig, in the client namespace, servers that do not run
// DNS (203.0.113.2, the upstream) or not on port 53 (the gateway). Every query
// is diverted to the server, and every UDP reply must come from the address
// dig asked, or dig reports "reply from unexpected source" and times out.
func TestHijackedQueries(t *testing.T) {
	testenv.RequireTools(t, "dig", "nft")
	tp := testnet.New(t)

	plan, err := netcfg.BuildPlan(netcfg.Options{Mark: 666, Table: 666, TProxyPort: 7893, DNSPort: 1053, Interfaces: []string{tp.LANIface}, IPv6: true})
	if err != nil {
		t.Fatal(err)
	}
	stateDir := t.TempDir()
	var inst *netcfg.Installed
	if err := tp.Gateway.Do(func() (err error) {
		inst, err = netcfg.NewNftables(testLogger(t)).Apply(plan, stateDir)
		return err
	}); err != nil {
		t.Fatalf("apply netcfg plan: %v", err)
	}
	t.Cleanup(func() {
		if err := tp.Gateway.Do(inst.Remove); err != nil {
			t.Errorf("remove netcfg plan: %v", err)
		}
	})

	eng := &countingEngine{}
	var s *Server
	if err := tp.Gateway.Do(func() (err error) {
		s, err = Listen(netip.MustParseAddrPort("0.0.0.0:1053"), eng, testLogger(t))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if !s.Transparent() {
		t.Fatal("server sockets are not transparent as root")
	}
	serveUntilCleanup(t, s)

	tests := []struct {
		server string // as dig's @ argument
		port   int
		name   string
		qtype  string
		tcp    bool
		// twice: asked twice (without a DNS cookie, so the second query is
		// the same bytes): the second answer comes from the reply cache,
		// sent with sendmmsg from the listener or the cached reply socket.
		twice bool
	}{
		{"203.0.113.2", 53, "foo.test", "A", false, false},
		{"203.0.113.2", 53, "foo.test", "A", true, false},
		{"2001:db8:1::2", 53, "six.test", "AAAA", false, false},
		{"2001:db8:1::2", 53, "six.test", "AAAA", true, false},
		// The gateway's own LAN address is hijacked too (the reply socket is
		// then bound to a local address).
		{"192.168.77.1", 53, "gw.test", "A", false, false},
		{"fd77::1", 53, "gw6.test", "A", false, false},
		// The server's own port: not hijacked, answered from the listener.
		{"192.168.77.1", 1053, "direct.test", "A", false, false},
		{"fd77::1", 1053, "direct6.test", "A", false, false},
		{"192.168.77.1", 1053, "direct.test", "A", true, false},
		{"203.0.113.2", 53, "again.test", "A", false, true},
		{"2001:db8:1::2", 53, "again6.test", "AAAA", false, true},
		{"192.168.77.1", 53, "againgw.test", "A", false, true},
		{"192.168.77.1", 1053, "againdirect.test", "A", false, true},
		{"fd77::1", 1053, "againdirect6.test", "A", false, true},
	}
	queries := 0
	for _, tc := range tests {
		proto := "udp"
		if tc.tcp {
			proto = "tcp"
		}
		t.Run(fmt.Sprintf("%s_%s_%d_%s", proto, tc.server, tc.port, tc.qtype), func(t *testing.T) {
			args := []string{"@" + tc.server, "-p", fmt.Sprint(tc.port), tc.name, tc.qtype, "+time=2", "+tries=1", "+noall", "+answer", "+comments"}
			if tc.tcp {
				args = append(args, "+tcp")
			}
			runs := 1
			if tc.twice {
				args, runs = append(args, "+nocookie"), 2
			}
			calls := eng.calls.Load()
			for run := range runs {
				queries++
				// dig prints its warnings to stdout or stderr depending on the
				// version: capture both.
				out, err := tp.Client.Run(t, 10*time.Second, "sh", "-c", "dig "+strings.Join(args, " ")+" 2>&1")
				if err != nil {
					t.Fatalf("dig %v: %v\n%s", args, err, out)
				}
				checkDig(t, args, out, tc.name, tc.qtype)
				if run == 1 && eng.calls.Load() != calls+1 {
					t.Errorf("the second query reached the engine: %d calls, want 1", eng.calls.Load()-calls)
				}
			}
		})
	}
	if st := s.Stats(); st.Queries != uint64(queries) || st.Malformed != 0 {
		t.Errorf("Stats = %+v, want %d queries", st, queries)
	}
}

// checkDig checks dig's output: the answer came from the address asked,
// with the fake IP of name.
func checkDig(t *testing.T, args []string, out, name, qtype string) {
	t.Helper()
	if strings.Contains(out, "unexpected source") {
		t.Fatalf("reply came from another address than the one asked:\n%s", out)
	}
	want := fakeIP(D.Fqdn(name)).String()
	if qtype == "AAAA" {
		want = netip.AddrFrom16([16]byte{0: 0xfc, 15: fakeIP(D.Fqdn(name)).As4()[3]}).String()
	}
	if !strings.Contains(out, "status: NOERROR") || !strings.Contains(out, want) {
		t.Fatalf("dig %v: want NOERROR and %s, got:\n%s", args, want, out)
	}
}
