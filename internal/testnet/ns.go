package testnet

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netns"
)

// MustRunTimeout bounds every MustRun call.
const MustRunTimeout = 20 * time.Second

// NS is one named network namespace of a Topology, visible in `ip netns list`
// under Name while the test runs.
type NS struct {
	Name string

	handle netns.NsHandle // open fd of the namespace, closed when it is deleted
	ipPath string         // full path of iproute2's ip, used for `ip netns exec`
}

// Run runs `ip netns exec NAME name args...`, bounded by timeout, and returns
// its stdout. A non-zero exit, a timeout or a start failure is returned as an
// error that includes the command line and its stderr.
func (n *NS) Run(t testing.TB, timeout time.Duration, name string, args ...string) (string, error) {
	t.Helper()
	out, _, err := n.RunCPU(t, timeout, name, args...)
	return out, err
}

// RunCPU is Run that also returns the CPU time (user and system) the
// program used (`ip netns exec` becomes the program, so its usage is the
// program's, with that of children it waited for); 0 when it did not run.
func (n *NS) RunCPU(t testing.TB, timeout time.Duration, name string, args ...string) (string, time.Duration, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, n.ipPath, n.execArgs(name, args)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	// A grandchild that keeps the pipes open must not make Run hang.
	cmd.WaitDelay = 2 * time.Second
	err := cmd.Run()
	var cpu time.Duration
	if ps := cmd.ProcessState; ps != nil {
		cpu = ps.UserTime() + ps.SystemTime()
	}
	if ctx.Err() != nil {
		err = fmt.Errorf("timed out after %v: %w", timeout, err)
	}
	if err != nil {
		return stdout.String(), cpu, fmt.Errorf("testnet: %s: %s: %w; stderr: %s",
			n.Name, commandLine(name, args), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), cpu, nil
}

// MustRun is Run with MustRunTimeout that fails the test on error.
func (n *NS) MustRun(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := n.Run(t, MustRunTimeout, name, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Do runs fn on a locked OS thread switched into the namespace and switches
// back afterwards. Sockets created inside fn belong to the namespace for their
// whole life, so a listener made in Do can be served from any goroutine later.
// Goroutines that fn starts do not run in the namespace.
func (n *NS) Do(fn func() error) error {
	type result struct{ err error }
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		origin, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			done <- result{fmt.Errorf("testnet: get current netns: %w", err)}
			return
		}
		defer origin.Close()
		if err := netns.Set(n.handle); err != nil {
			runtime.UnlockOSThread()
			done <- result{fmt.Errorf("testnet: enter netns %s: %w", n.Name, err)}
			return
		}
		fnErr := fn()
		if err := netns.Set(origin); err != nil {
			// Leave the thread locked: the runtime ends a locked thread when its
			// goroutine exits, so no other goroutine ever runs in the wrong netns.
			done <- result{errors.Join(fnErr, fmt.Errorf("testnet: leave netns %s: %w", n.Name, err))}
			return
		}
		runtime.UnlockOSThread()
		done <- result{fnErr}
	}()
	return (<-done).err
}

// Sysctl reads a sysctl such as "net.ipv4.ip_forward" inside the namespace.
func (n *NS) Sysctl(t testing.TB, key string) string {
	t.Helper()
	v, err := n.readSysctl(key)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// SetSysctl writes a sysctl such as "net.ipv4.ip_forward" inside the namespace.
func (n *NS) SetSysctl(t testing.TB, key, value string) {
	t.Helper()
	if err := n.writeSysctl(key, value); err != nil {
		t.Fatal(err)
	}
}

func (n *NS) readSysctl(key string) (string, error) {
	var v string
	// /proc/sys/net is resolved against the network namespace of the thread
	// that opens it, so the open must happen inside Do.
	err := n.Do(func() error {
		b, err := os.ReadFile(sysctlPath(key))
		v = strings.TrimSpace(string(b))
		return err
	})
	if err != nil {
		return "", fmt.Errorf("testnet: %s: read sysctl %s: %w", n.Name, key, err)
	}
	return v, nil
}

func (n *NS) writeSysctl(key, value string) error {
	err := n.Do(func() error { return os.WriteFile(sysctlPath(key), []byte(value), 0o644) })
	if err != nil {
		return fmt.Errorf("testnet: %s: set sysctl %s=%s: %w", n.Name, key, value, err)
	}
	return nil
}

func sysctlPath(key string) string {
	return filepath.Join("/proc/sys", strings.ReplaceAll(key, ".", "/"))
}

// execArgs is the argument list of `ip` that runs name inside the namespace.
// The program is resolved here, with the sbin fallbacks of lookTool, because
// `ip netns exec` only searches the PATH it inherits.
func (n *NS) execArgs(name string, args []string) []string {
	if p, err := lookTool(name); err == nil {
		name = p
	}
	return append([]string{"netns", "exec", n.Name, name}, args...)
}

// HasTool reports whether the program name can be run (in PATH or in the
// usual sbin and bin directories).
func HasTool(name string) bool {
	_, err := lookTool(name)
	return err == nil
}

// lookTool finds a program on PATH, then in the sbin directories that a
// test binary's PATH (CI, sudo -E, IDEs) often lacks.
func lookTool(name string) (string, error) {
	p, err := exec.LookPath(name)
	if err == nil || strings.Contains(name, "/") {
		return p, err
	}
	for _, dir := range []string{"/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/sbin", "/usr/local/bin"} {
		candidate := filepath.Join(dir, name)
		if fi, statErr := os.Stat(candidate); statErr == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return candidate, nil
		}
	}
	return "", err
}

func commandLine(name string, args []string) string {
	return strings.TrimSpace(name + " " + strings.Join(args, " "))
}
