package e2e

import (
	"context"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestDemo runs what `make demo` runs and checks it shows both paths and a
// clean stop.
func TestDemo(t *testing.T) {
	requirePeers(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "go", "run", "../cmd/tpgw-demo", "-bin", tpgwBin, "-c", "../config.example.yaml").CombinedOutput()
	if err != nil {
		t.Fatalf("demo: %v\n%s", err, out)
	}
	for _, want := range []string{
		"upstream saw 203.0.113.1   = the gateway's WAN address: through tpgw, rule DIRECT",
		"upstream saw 198.51.100.2  = the proxy's address: through tpgw and the ss-server",
		"identical to before start",
	} {
		if !strings.Contains(string(out), want) {
			t.Errorf("demo output lacks %q:\n%s", want, out)
		}
	}
}
