package netcfg

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/google/nftables"

	"github.com/tpgw/tpgw/internal/hostfwtest"
)

// TestAcceptsFrom walks real rulesets loaded into a namespace: a chain is
// reported as accepting the diverted packets only when every way through it
// accepts them.
func TestAcceptsFrom(t *testing.T) {
	cases := []struct {
		name, ruleset, table, chain, iface string
		want                               bool
	}{
		{"fw4, lan zone accepts", hostfwtest.FW4, "fw4", "input", "lan0", true},
		{"fw4, from the wan", hostfwtest.FW4, "fw4", "input", "wan0", false},
		{"firewalld, lan0 in trusted", hostfwtest.Firewalld(`iifname "lan0" goto filter_IN_trusted`), "firewalld", "filter_INPUT", "lan0", true},
		{"firewalld, lan0 in public", hostfwtest.Firewalld(`iifname "lan0" goto filter_IN_public`), "firewalld", "filter_INPUT", "lan0", false},
		{"policy drop, mark accepted", "table inet hostfw {\n chain input { type filter hook input priority 0; policy drop;\n ct state established,related accept\n meta mark 0x29a accept\n }\n}\n", "hostfw", "input", "lan0", true},
		{"policy drop, port accepted only", "table inet hostfw {\n chain input { type filter hook input priority 0; policy drop;\n tcp dport 80 accept\n }\n}\n", "hostfw", "input", "lan0", false},
		{"policy drop, accept on another interface", "table inet hostfw {\n chain input { type filter hook input priority 0; policy drop;\n iifname \"lan1\" accept\n }\n}\n", "hostfw", "input", "lan0", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ns := newTestNS(t, true)
			ns.run(t, "ip", "link", "add", "lan0", "type", "veth", "peer", "name", "wan0")
			f := filepath.Join(t.TempDir(), "ruleset.nft")
			if err := os.WriteFile(f, []byte(c.ruleset), 0o600); err != nil {
				t.Fatal(err)
			}
			ns.run(t, "nft", "-f", f)
			var got bool
			ns.in(t, func() {
				conn, err := nftables.New()
				if err != nil {
					t.Fatal(err)
				}
				for _, d := range droppingChains(nftables.ChainHookInput) {
					if d.chain.Table.Name == c.table && d.chain.Name == c.chain {
						got = acceptsFrom(conn, d.chain, c.iface, 0x29a)
						return
					}
				}
				t.Fatalf("%s %s is not among the chains that drop by default", c.table, c.chain)
			})
			if got != c.want {
				t.Errorf("accepts the diverted packets from %s: %v, want %v", c.iface, got, c.want)
			}
		})
	}
}
