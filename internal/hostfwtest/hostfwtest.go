// Package hostfwtest holds the host firewalls that tpgw's tests load into
// their namespaces: OpenWrt's fw4 and firewalld's nftables backend, as they
// list their input paths, with lan0 as the LAN interface and wan0 as the WAN.
package hostfwtest

// FW4 is OpenWrt's fw4 input path, as `nft list ruleset` shows it on
// OpenWrt 23.05 with the default zones (lan input ACCEPT, wan input REJECT).
const FW4 = `table inet fw4 {
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

// Firewalld is firewalld's nftables input path (its filter_INPUT accepts by
// policy and ends with a reject) with lan0 in the zone given by the dispatch
// rule; none when dispatch is empty.
func Firewalld(dispatch string) string {
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
