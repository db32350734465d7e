package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tpgw/tpgw/netcfg"
)

// The watchdog makes on-failure: open hold when tpgw is killed (SIGKILL, OOM,
// a crash), where no deferred cleanup runs. nftables' tproxy falls through
// when nothing listens, but iptables' TPROXY target drops, and with
// proxy-self the gateway's own traffic is routed to a dead listener. So
// `tpgw run` starts `tpgw watchdog` as a separate process in its own session:
// it waits for tpgw to exit and, unless tpgw told it to stand down first,
// removes the jumps into the divert chains (netcfg.RemoveDivert). LAN traffic
// then flows directly; the next start or `tpgw cleanup` removes the rest.

type watchdog struct {
	cmd  *exec.Cmd
	done chan struct{}
}

func startWatchdog(log *slog.Logger) (*watchdog, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("watchdog: %w", err)
	}
	// tpgw opens the pidfd of itself and hands it over (fd 3): a watchdog that
	// opened one by PID after its own start-up would miss a tpgw killed in
	// between (ESRCH), or watch a stranger that reused the PID.
	pidfd, err := unix.PidfdOpen(os.Getpid(), 0)
	if err != nil {
		return nil, fmt.Errorf("watchdog: pidfd_open self: %w", err)
	}
	self := os.NewFile(uintptr(pidfd), "tpgw-pidfd")
	defer self.Close() // the child has its own copy
	cmd := exec.Command(exe, "watchdog", "-pid", strconv.Itoa(os.Getpid()), "-pidfd", "3")
	cmd.ExtraFiles = []*os.File{self}
	cmd.Stderr = os.Stderr
	// Own session: a terminal's Ctrl-C or a kill of tpgw's process group
	// must not take the watchdog down with tpgw.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("watchdog: %w", err)
	}
	w := &watchdog{cmd: cmd, done: make(chan struct{})}
	go func() { cmd.Wait(); close(w.done) }()
	log.Info("watchdog started", "pid", cmd.Process.Pid, "why", "on-failure: open")
	return w, nil
}

// stop tells the watchdog that tpgw exits cleanly (it removes its own rules).
func (w *watchdog) stop() {
	if w == nil {
		return
	}
	w.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-w.done:
	case <-time.After(3 * time.Second):
		w.cmd.Process.Kill()
		<-w.done
	}
}

// runWatchdog is `tpgw watchdog -pid PID [-pidfd FD]`; tpgw run passes the
// pidfd of itself as FD 3. Without -pidfd it opens one by PID (racy: for
// manual use only).
func runWatchdog(args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("watchdog", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	pid := fs.Int("pid", 0, "tpgw process to watch")
	inherited := fs.Int("pidfd", -1, "inherited pidfd of that process (tpgw run passes 3)")
	if err := fs.Parse(args); err != nil || *pid <= 0 {
		return fmt.Errorf("%w: watchdog -pid PID [-pidfd FD]", errUsage)
	}
	log := slog.New(slog.NewTextHandler(stderr, nil)).With("part", "watchdog", "tpgw_pid", *pid)
	pidfd := *inherited
	if pidfd < 0 {
		var err error
		if pidfd, err = unix.PidfdOpen(*pid, 0); err != nil {
			return fmt.Errorf("watchdog: pidfd_open %d: %w", *pid, err)
		}
	}
	defer unix.Close(pidfd)
	// Held until the divert rules are gone: a new tpgw waits for it (instance.go).
	if ln, err := holdSocket(watchdogSocket); err == nil {
		defer ln.Close()
	} else {
		log.Warn("watchdog: instance lock", "err", err)
	}

	// SIGTERM from tpgw means: clean exit, stand down.
	term := make(chan os.Signal, 1)
	signalNotify(term)
	died := make(chan error, 1)
	go func() {
		fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
		for {
			_, err := unix.Poll(fds, -1)
			if errors.Is(err, unix.EINTR) {
				continue
			}
			if err == nil && fds[0].Revents&unix.POLLNVAL != 0 {
				err = fmt.Errorf("pidfd %d is not an open file", pidfd)
			}
			died <- err
			return
		}
	}()
	select {
	case <-term:
		return nil
	case err := <-died:
		if err != nil {
			return fmt.Errorf("watchdog: poll: %w", err)
		}
	}
	// tpgw is gone without standing us down: it crashed or was killed.
	log.Warn("tpgw died; on-failure open: removing the divert rules so traffic flows directly")
	return netcfg.RemoveDivert(log)
}
