// Package testenv decides whether a privileged or tool-dependent test can run.
//
// Outside CI a missing privilege or tool skips the test, so `go test ./...` works
// for a developer without root. Under CI=true the same condition fails the test:
// CI runs as root with every tool installed, and a silent skip there would hide
// that the kernel tests never ran.
package testenv

import (
	"os"
	"os/exec"
	"testing"
)

// InCI reports whether the tests run under CI (CI=true), where skips are failures.
func InCI() bool { return os.Getenv("CI") == "true" }

// Unavailable skips the test, or fails it under CI, with the reason.
func Unavailable(t testing.TB, format string, args ...any) {
	t.Helper()
	if InCI() {
		t.Fatalf("CI=true but test cannot run: "+format, args...)
	}
	t.Skipf(format, args...)
}

// RequireRoot needs uid 0 (network namespaces, netfilter, policy routing).
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Unavailable(t, "needs root")
	}
}

// RequireTools needs every named program on PATH and returns nothing; use
// exec.LookPath afterwards for the full path if needed.
func RequireTools(t testing.TB, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			Unavailable(t, "needs %s on PATH: %v", n, err)
		}
	}
}

// Short skips long tests under -short, but never under CI.
func Short(t testing.TB) {
	t.Helper()
	if testing.Short() && !InCI() {
		t.Skip("skipped under -short")
	}
}
