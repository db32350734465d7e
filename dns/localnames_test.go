package dns

import (
	"net/netip"
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

// TestLocalTargetNotItself: a local name asked of this listener itself is
// answered by the engine, not forwarded: with dns.listen on port 53 the
// forward would reach this listener again, and again (each hop holding a
// query slot for forwardTimeout). Asked of another server, or of this host
// on port 53 while the listener is on another port (a local dnsmasq), it is
// forwarded.
func TestLocalTargetNotItself(t *testing.T) {
	for _, c := range []struct {
		listen, origDst string
		forward         bool
	}{
		{"[::]:53", "127.0.0.1:53", false}, // a wildcard listener on 53, asked at one of this host's addresses
		{"0.0.0.0:53", "[::ffff:127.0.0.1]:53", false},
		{"127.0.0.1:53", "127.0.0.1:53", false}, // the listener's own address
		{"[::]:53", "192.0.2.53:53", true},      // a LAN server the kernel diverted
		{"0.0.0.0:1053", "127.0.0.1:53", true},  // this host's own resolver on 53
		{"127.0.0.2:53", "192.0.2.53:53", true}, // listener on one address, another server asked
	} {
		s := &Server{addr: netip.MustParseAddrPort(c.listen)}
		s.ForwardLocalNames(0, nil)
		got := s.localTarget("nas.lan.", netip.MustParseAddrPort(c.origDst))
		if got.IsValid() != c.forward {
			t.Errorf("listening on %s, asked at %s: forward to %v, want forwarded %v", c.listen, c.origDst, got, c.forward)
		}
	}
}
