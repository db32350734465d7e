package e2e

import (
	"bytes"
	"flag"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/tpgw/tpgw/internal/testenv"
)

var update = flag.Bool("update", false, "rewrite golden files")

// TestRulesGolden pins `tpgw rules -c config.example.yaml`, run as an
// unprivileged user to prove it needs no root and changes nothing.
func TestRulesGolden(t *testing.T) {
	example, err := filepath.Abs("../config.example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(tpgwBin, "rules", "-c", example)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if os.Geteuid() == 0 {
		// nobody: no capabilities, no write access to anything of ours.
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		if err := os.Chmod(filepath.Dir(tpgwBin), 0o755); err != nil {
			t.Fatal(err)
		}
	} else {
		testenv.Unavailable(t, "runs as root to drop to the nobody user")
	}
	if err := cmd.Run(); err != nil {
		t.Fatalf("tpgw rules as nobody: %v\n%s", err, stderr.String())
	}
	golden := filepath.Join("testdata", "rules-example.golden")
	if *update {
		if err := os.WriteFile(golden, stdout.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (run go test ./e2e -run TestRulesGolden -update)", err)
	}
	if !bytes.Equal(stdout.Bytes(), want) {
		t.Fatalf("tpgw rules output differs from %s (rerun with -update if intended)\n--- got\n%s", golden, stdout.String())
	}
}
