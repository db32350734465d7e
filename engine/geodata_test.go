package engine

import (
	"net"
	"path/filepath"
	"strings"
	"testing"
)

// A rule that needs a geodata file that is not there, with its download
// address unreachable (a closed port on loopback here, no WAN at boot on a
// router): the error says where tpgw reads the file from.
func TestGeodataMissing(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln.Addr().String()
	ln.Close()
	for _, tc := range []struct{ rule, key, file string }{
		{"GEOSITE,cn,DIRECT", "geosite", "GeoSite.dat"},
		{"GEOIP,CN,DIRECT", "mmdb", "geoip.metadb"},
		{"IP-ASN,13335,DIRECT", "asn", "ASN.mmdb"},
	} {
		home := t.TempDir()
		cfg := "geox-url:\n  " + tc.key + ": http://" + closed + "/x\nrules:\n  - " + tc.rule + "\n  - MATCH,DIRECT\n"
		err := Check([]byte(cfg), home)
		want := "tpgw reads the file from " + filepath.Join(home, tc.file)
		if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), tc.rule) {
			t.Errorf("%s: got %v; want an error naming the rule and containing %q", tc.rule, err, want)
		}
	}
}
