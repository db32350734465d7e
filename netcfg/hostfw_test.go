package netcfg

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/google/nftables"
)

// fw4Ruleset is OpenWrt's fw4 input path, as `nft list ruleset` shows it on
// OpenWrt 23.05 with the default zones (lan input ACCEPT, wan input REJECT).
const fw4Ruleset = `table inet fw4 {
	chain input {
		type filter hook input priority filter; policy drop;
		iifname "lo" accept comment "!fw4: Accept traffic from loopback"
		ct state vmap { established : accept, related : accept } comment "!fw4: Handle inbound flows"
		tcp flags syn / fin,syn,rst,ack jump syn_flood comment "!fw4: Rate limit TCP syn packets"
		iifname "lan0" jump input_lan comment "!fw4: Handle lan IPv4/IPv6 input traffic"
		iifname "wan0" jump input_wan comment "!fw4: Handle wan IPv4/IPv6 input traffic"
		jump handle_reject
	}
	chain handle_reject {
		meta l4proto tcp reject with tcp reset comment "!fw4: Reject TCP traffic"
		reject comment "!fw4: Reject any other traffic"
	}
	chain syn_flood {
		limit rate 25/second burst 50 packets return comment "!fw4: Accept SYN packets below rate-limit"
		drop comment "!fw4: Drop excess packets"
	}
	chain input_lan {
		ct status dnat accept comment "!fw4: Accept port redirections"
		jump accept_from_lan
	}
	chain input_wan {
		meta nfproto ipv4 udp dport 68 counter accept comment "!fw4: Allow-DHCP-Renew"
		icmp type echo-request counter accept comment "!fw4: Allow-Ping"
		ct status dnat accept comment "!fw4: Accept port redirections"
		jump reject_from_wan
	}
	chain accept_from_lan {
		iifname "lan0" counter accept comment "!fw4: accept lan IPv4/IPv6 traffic"
	}
	chain reject_from_wan {
		iifname "wan0" counter jump handle_reject comment "!fw4: reject wan IPv4/IPv6 traffic"
	}
}
`

// firewalldRuleset is firewalld's nftables input path with lan0 in the zone
// given by the dispatch rule.
func firewalldRuleset(dispatch string) string {
	return `table inet firewalld {
	chain filter_IN_public {
		tcp dport 22 accept
		ip6 daddr fe80::/64 udp dport 546 accept
	}
	chain filter_IN_trusted {
		accept
	}
	chain filter_INPUT_dispatch {
		` + dispatch + `
	}
	chain filter_INPUT {
		type filter hook input priority filter + 10; policy accept;
		ct state { established, related } accept
		ct status dnat accept
		iifname "lo" accept
		ct state { invalid } drop
		jump filter_INPUT_dispatch
		reject with icmpx admin-prohibited
	}
}
`
}

// TestAcceptsFrom walks real rulesets loaded into a namespace: a chain is
// reported as accepting the diverted packets only when every way through it
// accepts them.
func TestAcceptsFrom(t *testing.T) {
	cases := []struct {
		name, ruleset, table, chain, iface string
		want                               bool
	}{
		{"fw4, lan zone accepts", fw4Ruleset, "fw4", "input", "lan0", true},
		{"fw4, from the wan", fw4Ruleset, "fw4", "input", "wan0", false},
		{"firewalld, lan0 in trusted", firewalldRuleset(`iifname "lan0" goto filter_IN_trusted`), "firewalld", "filter_INPUT", "lan0", true},
		{"firewalld, lan0 in public", firewalldRuleset(`iifname "lan0" goto filter_IN_public`), "firewalld", "filter_INPUT", "lan0", false},
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
