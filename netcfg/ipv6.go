package netcfg

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// IPv6Host is what the kernel of the current network namespace offers for
// IPv6. tpgw diverts IPv6 flows through a local route on lo, which the kernel
// refuses ("permission denied") while lo has IPv6 disabled.
type IPv6Host struct {
	Kernel     bool     // the kernel has IPv6 (not booted with ipv6.disable=1)
	LoDisabled bool     // net.ipv6.conf.lo.disable_ipv6 is 1
	Enabled    []string // the interfaces other than lo with IPv6 on
}

// ipv6Conf is where the kernel shows each interface's IPv6 settings (for the
// reading process's network namespace).
var ipv6Conf = "/proc/sys/net/ipv6/conf"

// ProbeIPv6 reads the IPv6 state of this network namespace.
func ProbeIPv6() (IPv6Host, error) {
	entries, err := os.ReadDir(ipv6Conf)
	if errors.Is(err, fs.ErrNotExist) {
		return IPv6Host{}, nil
	}
	if err != nil {
		return IPv6Host{}, err
	}
	h := IPv6Host{Kernel: true}
	for _, e := range entries {
		name := e.Name()
		if name == "all" || name == "default" {
			continue
		}
		b, err := os.ReadFile(filepath.Join(ipv6Conf, name, "disable_ipv6"))
		if err != nil {
			continue // the interface went away meanwhile
		}
		off := strings.TrimSpace(string(b)) == "1"
		switch {
		case name == "lo":
			h.LoDisabled = off
		case !off:
			h.Enabled = append(h.Enabled, name)
		}
	}
	return h, nil
}
