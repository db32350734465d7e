package e2e

import (
	"bytes"
	"errors"
	"os/exec"
	"strings"
	"testing"
)

// TestExplain runs the built binary's `explain` on a config like the other
// e2e tests use: it only evaluates, so it needs no namespace and no root.
func TestExplain(t *testing.T) {
	cfg := writeConfig(t, baseConfig(t, []string{
		"IP-CIDR,203.0.113.3/32,ss,no-resolve",
		"DOMAIN-SUFFIX,example.com,ss",
		"MATCH,DIRECT",
	}, "tpgw:\n  interfaces: [lan0]\n  state-dir: "+t.TempDir()+"\n"))
	cases := []struct {
		name, dst   string
		intercepted bool
		want        []string // substrings, each on its own line, in order
	}{
		{"bypassed", "192.168.1.10:80", false, []string{
			"flow: tcp 192.168.77.2:40000 → 192.168.1.10:80 in lan0",
			"kernel: not intercepted: bypassed destination",
		}},
		{"direct", "203.0.113.2:80", true, []string{
			"kernel: intercepted — TPROXY to :7893",
			"mihomo: rule Match → DIRECT",
		}},
		{"proxied", "203.0.113.3:80", true, []string{
			"kernel: intercepted — TPROXY to :7893",
			"mihomo: rule IPCIDR,203.0.113.3/32 → ss",
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cmd := exec.Command(tpgwBin, "explain", "-c", cfg, "--src", "192.168.77.2:40000", "--dst", tc.dst, "--proto", "tcp")
			var stdout, stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			if err := cmd.Run(); err != nil {
				t.Fatalf("tpgw explain: %v\nstdout:\n%s\nstderr:\n%s", err, stdout.String(), stderr.String())
			}
			t.Logf("tpgw explain --dst %s:\n%s", tc.dst, stdout.String())
			lines := strings.Split(stdout.String(), "\n")
			i := 0
			for _, w := range tc.want {
				for i < len(lines) && !strings.Contains(lines[i], w) {
					i++
				}
				if i == len(lines) {
					t.Fatalf("output lacks a line with %q (in order):\n%s", w, stdout.String())
				}
			}
			if !tc.intercepted && strings.Contains(stdout.String(), "mihomo:") {
				t.Errorf("a flow the kernel does not intercept never reaches mihomo:\n%s", stdout.String())
			}
		})
	}

	// A usage error: exit 2, one line on stderr.
	cmd := exec.Command(tpgwBin, "explain", "-c", cfg, "--src", "192.168.77.2")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	var exit *exec.ExitError
	if err := cmd.Run(); !errors.As(err, &exit) || exit.ExitCode() != 2 {
		t.Fatalf("missing --dst: %v, want exit status 2", err)
	}
	if got := stderr.String(); strings.Count(got, "\n") != 1 || !strings.Contains(got, "--dst") {
		t.Errorf("missing --dst: stderr %q, want one line naming --dst", got)
	}
}
