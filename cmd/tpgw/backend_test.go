package main

import (
	"bytes"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tpgw/tpgw/config"
	"github.com/tpgw/tpgw/internal/testenv"
	"github.com/tpgw/tpgw/netcfg"
)

// namedBackend stands in for a backend that is only asked its name.
type namedBackend struct {
	netcfg.Backend
	name string
}

func (b namedBackend) Name() string { return b.name }

// TestCheckDNSBypassFallback: with backend auto on a host whose nftables
// cannot be used, dns-bypass is refused by `tpgw check` (as root, where it
// can probe), as a start refuses it, naming the key and why iptables was
// picked.
func TestCheckDNSBypassFallback(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "config.yaml")
	cfg := fmt.Sprintf(`dns:
  enable: true
  enhanced-mode: fake-ip
  listen: 0.0.0.0:1053
rules:
  - MATCH,DIRECT
tpgw:
  interfaces: [lan0]
  dns-bypass: true
  state-dir: %s
`, filepath.Join(dir, "state"))
	if err := os.WriteFile(p, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	pick := "iptables"
	chooseBackend = func(name string, _ *slog.Logger) (netcfg.Backend, string, error) {
		if name != "auto" {
			t.Errorf("backend %q asked for, want auto", name)
		}
		if pick == "iptables" {
			return namedBackend{name: pick}, "auto: nftables unusable: test; using iptables", nil
		}
		return namedBackend{name: pick}, "auto: nftables available", nil
	}
	t.Cleanup(func() { chooseBackend = netcfg.ChooseBackend })

	// The decision a start makes.
	c, err := config.Load(p)
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range []string{"iptables", "nftables"} {
		pick = b
		_, _, err := backendFor(c, slog.New(slog.DiscardHandler))
		if (err != nil) != (b == "iptables") {
			t.Errorf("backendFor with %s picked: %v", b, err)
		}
	}

	// tpgw check probes the backend only as root.
	testenv.RequireRoot(t)
	check := func() (int, string) {
		var stdout, stderr bytes.Buffer
		code := realMain([]string{"check", "-c", p}, &stdout, &stderr)
		return code, stdout.String() + stderr.String()
	}
	pick = "iptables"
	code, out := check()
	if code != 1 || !strings.Contains(out, "tpgw.dns-bypass needs the nftables backend") || !strings.Contains(out, "nftables unusable: test") {
		t.Errorf("tpgw check with auto falling back to iptables: exit %d\n%s", code, out)
	}
	pick = "nftables"
	if code, out := check(); code != 0 {
		t.Errorf("tpgw check with auto picking nftables: exit %d\n%s", code, out)
	}
}

// TestStateDirWritable: a state-dir that can be created is accepted; one
// under a file is refused with its key and line (a read-only file system is
// tested end to end in e2e TestBadConfig).
func TestStateDirWritable(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ stateDir, want string }{
		{filepath.Join(dir, "a", "b"), ""},
		{dir, ""},
		{filepath.Join(file, "state"), "config.yaml:4: tpgw.state-dir: " + filepath.Join(file, "state") + " cannot be made a directory: " + file + " is a file"},
	} {
		cfg, err := config.Parse([]byte("rules:\n  - MATCH,DIRECT\ntpgw:\n  state-dir: "+c.stateDir+"\n"), "config.yaml")
		if err != nil {
			t.Fatal(err)
		}
		err = stateDirWritable(cfg)
		if got := fmt.Sprint(err); (c.want == "" && err != nil) || (c.want != "" && !strings.Contains(got, c.want)) {
			t.Errorf("state-dir %s: %v, want %q", c.stateDir, err, c.want)
		}
	}
}
