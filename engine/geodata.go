package engine

import (
	"fmt"
	"strings"

	C "github.com/metacubex/mihomo/constant"
)

// parseError is the error for a mihomo config that mihomo refused. When a
// rule needs a geodata file (GEOIP, GEOSITE, IP-ASN) that is not in the
// home directory, mihomo downloads it while it parses; offline (a router
// starting before its WAN is up, a host with no way out) that fails with
// "can't download GeoSite.dat: ...". The error then also says where the
// file is looked for, so that the user can put it there.
func parseError(err error) error {
	msg := err.Error()
	for _, g := range []struct {
		what string
		path func() string
	}{
		{"GeoSite.dat", C.Path.GeoSite},
		{"GeoIP.dat", C.Path.GeoIP},
		{"MMDB", C.Path.MMDB},
		{"ASN", C.Path.ASN},
	} {
		if strings.Contains(msg, "can't download "+g.what) {
			return fmt.Errorf("mihomo config: %w (tpgw reads the file from %s, in the config file's directory: put it there, or start tpgw when it can reach the download address; geox-url sets that address)", err, g.path())
		}
	}
	return fmt.Errorf("mihomo config: %w", err)
}
