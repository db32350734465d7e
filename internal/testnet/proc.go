package testnet

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
)

// stopGrace is how long a process gets between SIGTERM and SIGKILL in cleanup.
const stopGrace = 3 * time.Second

// Proc is a background process started in a namespace with NS.Start.
type Proc struct {
	Cmd *exec.Cmd

	outPath string
	done    chan struct{} // closed once the process has been reaped
	waitErr error         // valid after done is closed
}

// Start runs `ip netns exec NAME name args...` in the background. Its stdout
// and stderr go to a file read by Output. In t.Cleanup it gets SIGTERM, then
// SIGKILL after 3s, addressed by PID (and its own process group), never by name.
func (n *NS) Start(t testing.TB, name string, args ...string) *Proc {
	t.Helper()
	p, err := n.start(t, name, args)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func (n *NS) start(t testing.TB, name string, args []string) (*Proc, error) {
	// The output file lives in a TempDir created before the stop cleanup is
	// registered, so it is removed only after the process has been stopped.
	outPath := filepath.Join(t.TempDir(), "output")
	out, err := os.Create(outPath)
	if err != nil {
		return nil, fmt.Errorf("testnet: %s: output file: %w", n.Name, err)
	}
	defer out.Close()

	cmd := exec.Command(n.ipPath, n.execArgs(name, args)...)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Its own process group lets cleanup reach helpers it forks, by id.
		Setpgid: true,
		// If the test binary dies, so does the process. Pdeathsig follows the
		// forking thread, which is why that thread stays locked until the
		// process is reaped (below).
		Pdeathsig: syscall.SIGKILL,
	}
	p := &Proc{Cmd: cmd, outPath: outPath, done: make(chan struct{})}

	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			close(p.done)
			return
		}
		started <- nil
		p.waitErr = cmd.Wait()
		close(p.done)
	}()
	if err := <-started; err != nil {
		return nil, fmt.Errorf("testnet: %s: start %s: %w", n.Name, commandLine(name, args), err)
	}
	t.Cleanup(p.stop)
	return p, nil
}

// Output returns what the process has printed so far (stdout and stderr).
func (p *Proc) Output() string {
	b, err := os.ReadFile(p.outPath)
	if err != nil {
		return fmt.Sprintf("<output unavailable: %v>", err)
	}
	return string(b)
}

// Signal sends sig to the process by PID; os.ErrProcessDone once it has exited.
func (p *Proc) Signal(sig os.Signal) error {
	if p.exited() {
		return os.ErrProcessDone
	}
	return p.Cmd.Process.Signal(sig)
}

// Wait waits at most timeout for the process to exit. It reports whether it
// exited and, if so, the error of its exit (nil for status 0).
func (p *Proc) Wait(timeout time.Duration) (exited bool, err error) {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case <-p.done:
		return true, p.waitErr
	case <-timer.C:
		return false, nil
	}
}

// Kill sends SIGKILL to the process and to its process group.
func (p *Proc) Kill() {
	p.signalGroup(syscall.SIGKILL)
}

func (p *Proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// signalGroup signals the process and the process group it leads. The group id
// is the PID of our own child and is only used while that child has not been
// reaped, when the kernel cannot have given the id to anyone else.
func (p *Proc) signalGroup(sig syscall.Signal) {
	if p.exited() {
		return
	}
	_ = syscall.Kill(-p.Cmd.Process.Pid, sig)
	_ = p.Cmd.Process.Signal(sig)
}

func (p *Proc) stop() {
	p.signalGroup(syscall.SIGTERM)
	if exited, _ := p.Wait(stopGrace); !exited {
		p.signalGroup(syscall.SIGKILL)
		p.Wait(stopGrace)
	}
}

// describe is used in failure messages: the command line, its state and output.
func (p *Proc) describe() string {
	state := "running"
	if p.exited() {
		state = "exited (status 0)"
		if p.waitErr != nil {
			state = fmt.Sprintf("exited (%v)", p.waitErr)
		}
	}
	return fmt.Sprintf("%s [%s]; output:\n%s", strings.Join(p.Cmd.Args, " "), state, p.Output())
}
