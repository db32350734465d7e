package bench

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// RelaySyscalls are the system calls CountSyscalls traces: splice, and the
// ones a relay that copies through its own buffers makes instead.
const RelaySyscalls = "splice,read,write,readv,writev,recvfrom,sendto,recvmsg,sendmsg"

// CountSyscalls attaches `strace -f -c` to every thread of pid, runs during,
// and returns the calls per syscall of the set (RelaySyscalls, say) that the
// process made meanwhile. The summary goes to a file in dir. strace is ended
// by SIGINT (it then writes the summary), or killed 10 s later.
func CountSyscalls(pid int, set, dir string, during func() error) (map[string]int64, error) {
	out := filepath.Join(dir, "strace-"+strconv.Itoa(pid)+".txt")
	cmd := exec.Command("strace", "-f", "-c", "-o", out, "-e", "trace="+set, "-p", strconv.Itoa(pid))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	// Pdeathsig follows the thread that forks: keep it for the child's life.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("bench: strace: %w", err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	time.Sleep(time.Second) // attach to every thread
	derr := during()
	_ = cmd.Process.Signal(syscall.SIGINT)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
		<-done
	}
	b, err := os.ReadFile(out)
	if err != nil {
		return nil, errors.Join(derr, fmt.Errorf("bench: strace output: %w; %s", err, stderr.String()))
	}
	calls, err := ParseStraceSummary(string(b))
	return calls, errors.Join(derr, err)
}
