package netcfg

import (
	"os"
	"path/filepath"
	"slices"
	"testing"
)

func TestProbeIPv6(t *testing.T) {
	dir := t.TempDir()
	old := ipv6Conf
	t.Cleanup(func() { ipv6Conf = old })

	ipv6Conf = filepath.Join(dir, "missing")
	if h, err := ProbeIPv6(); err != nil || h.Kernel {
		t.Errorf("no conf dir (ipv6.disable=1): %+v, %v; want no IPv6 kernel", h, err)
	}

	ipv6Conf = dir
	for name, off := range map[string]string{"all": "1", "default": "1", "lo": "1", "eth0": "1", "br-lan": "0\n"} {
		if err := os.MkdirAll(filepath.Join(dir, name), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name, "disable_ipv6"), []byte(off), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	h, err := ProbeIPv6()
	if err != nil || !h.Kernel || !h.LoDisabled || !slices.Equal(h.Enabled, []string{"br-lan"}) {
		t.Errorf("lo off, br-lan on: %+v, %v", h, err)
	}
}
