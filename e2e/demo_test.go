package e2e

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
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

// TestDemoInterrupted: the demo with -hold keeps its gateway up, and Ctrl-C
// (SIGINT) then stops what the demo started and deletes its namespaces, as
// a normal end does.
func TestDemoInterrupted(t *testing.T) {
	requirePeers(t)
	demo := filepath.Join(t.TempDir(), "tpgw-demo")
	if out, err := exec.Command("go", "build", "-o", demo, "../cmd/tpgw-demo").CombinedOutput(); err != nil {
		t.Fatalf("build the demo: %v\n%s", err, out)
	}
	before := demoNamespaces(t)
	cmd := exec.Command(demo, "-bin", tpgwBin, "-c", "../config.example.yaml", "-hold")
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() { cmd.Process.Kill() })
	// Interrupt while it holds the gateway up for exploring.
	if waitFor(t, 60*time.Second, func() (string, bool) {
		return "up", strings.Contains(out.String(), "press Ctrl-C")
	}) == "" {
		t.Fatalf("the demo gateway did not come up:\n%s", out.String())
	}
	if err := cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 130 {
			t.Fatalf("demo after SIGINT: %v, want exit status 130\n%s", err, out.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("the demo did not exit within 30s of SIGINT:\n%s", out.String())
	}
	if after := demoNamespaces(t); after != before {
		t.Fatalf("namespaces left after an interrupted demo:\nbefore: %q\nafter:  %q\n%s", before, after, out.String())
	}
	if !strings.Contains(out.String(), "stopping and removing the namespaces") {
		t.Errorf("no cleanup message:\n%s", out.String())
	}
}

// demoNamespaces lists the tpgw-* network namespaces on the host.
func demoNamespaces(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, l := range strings.Split(string(out), "\n") {
		if f := strings.Fields(l); len(f) > 0 && strings.HasPrefix(f[0], "tpgw-") {
			names = append(names, f[0])
		}
	}
	sort.Strings(names)
	return strings.Join(names, " ")
}

// syncBuffer is a bytes.Buffer safe for a writing process and a reading test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
