package dns

import (
	"strings"
	"testing"

	D "github.com/miekg/dns"
)

func TestIsLocalName(t *testing.T) {
	for name, want := range map[string]bool{
		"router.lan.":                true,
		"OpenWrt.LAN":                true,
		"nas.":                       true, // single label
		"printer.local.":             true,
		"host.localdomain.":          true,
		"nas.home.arpa.":             true,
		"svc.internal.":              true,
		"2.77.168.192.in-addr.arpa.": true,
		"5.0.0.10.in-addr.arpa.":     true,
		"1.0.20.172.in-addr.arpa.":   true,
		"1.0.254.169.in-addr.arpa.":  true,
		"1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.7.d.f.ip6.arpa.": true,
		"1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.e.f.ip6.arpa.": true,
		".":                        false,
		"example.com.":             false,
		"lan.example.com.":         false,
		"mylan.":                   true, // single label
		"x.mylan.":                 false,
		"intranet.corp.":           false, // a company domain: mihomo's
		"4.0.18.198.in-addr.arpa.": false, // a fake IP: mihomo maps it back
		"1.0.32.172.in-addr.arpa.": false, // 172.32/16 is public
		"8.8.8.8.in-addr.arpa.":    false,
		"in-addr.arpa.":            false,
		"2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.": false,
		"lan.":        true, // single label
		"home.arpa.":  true, // the zone itself
		"xhome.arpa.": false,
		"x.xlan.":     false,
		`a\.lan.`:     true, // one label, "a.lan"
		`a\.b.lan.`:   true,
		`x.my\.lan.`:  false, // the last label is "my.lan"
	} {
		if got := isLocalName(name); got != want {
			t.Errorf("isLocalName(%q) = %v, want %v", name, got, want)
		}
		// The string tests agree with miekg/dns's label-wise ones.
		if fqdn := strings.ToLower(D.Fqdn(name)); fqdn != "." {
			for _, z := range append(localSuffixes, localReverse...) {
				if got, want := inZone(z, fqdn), D.IsSubDomain(z, fqdn); !strings.Contains(fqdn, `\`) && got != want {
					t.Errorf("inZone(%q, %q) = %v, dns.IsSubDomain %v", z, fqdn, got, want)
				}
			}
		}
	}
}

func BenchmarkIsLocalName(b *testing.B) {
	for range b.N {
		isLocalName("host123.bench.example.")
	}
}
