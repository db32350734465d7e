package tsock

import (
	"fmt"
	"net"
	"runtime"
	"sync"

	"golang.org/x/sys/unix"
)

// threadNetnsPath names the network namespace of the calling OS thread.
const threadNetnsPath = "/proc/thread-self/ns/net"

// Netns is a network namespace recorded by CurrentNetns, in which Do runs
// functions that make sockets. The zero Netns (an unknown namespace) runs
// them in place.
type Netns struct {
	mu     sync.RWMutex // held for reading while fd is in use, for writing by Close
	fd     int          // open nsfs handle of the namespace, when known
	id     unix.Stat_t  // of fd: its device and inode identify the namespace
	known  bool
	closed bool
}

// CurrentNetns records the network namespace of the calling thread. A caller
// that switched namespaces must hold its thread locked
// (runtime.LockOSThread), as testnet's NS.Do does. When the namespace cannot
// be recorded (no /proc), it returns a Netns that runs everything in place,
// along with the reason.
func CurrentNetns() (*Netns, error) {
	fd, err := unix.Open(threadNetnsPath, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return &Netns{}, fmt.Errorf("open %s: %w", threadNetnsPath, err)
	}
	n := &Netns{fd: fd, known: true}
	if err := unix.Fstat(fd, &n.id); err != nil {
		unix.Close(fd)
		return &Netns{}, fmt.Errorf("identify network namespace: %w", err)
	}
	return n, nil
}

// Do runs fn in the namespace, and returns fn's error or why it could not
// run; net.ErrClosed after Close. fn must not start goroutines that need the
// namespace: only fn's own thread is switched.
//
// When the calling thread is already there (always, in a process that lives
// in one namespace) fn runs in place, after one stat(2). Otherwise fn runs on
// a fresh locked thread switched into the namespace and back. If switching
// back fails, fn's result still stands (it ran where it should), and the
// thread stays locked: the runtime retires it with its goroutine, so no other
// goroutine ever runs in the wrong namespace.
func (n *Netns) Do(fn func() error) error {
	n.mu.RLock()
	defer n.mu.RUnlock()
	if n.closed {
		return net.ErrClosed
	}
	if !n.known {
		return fn()
	}
	runtime.LockOSThread()
	// One stat, no file descriptor.
	var st unix.Stat_t
	if err := unix.Stat(threadNetnsPath, &st); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("identify current network namespace: %w", err)
	}
	if st.Dev == n.id.Dev && st.Ino == n.id.Ino {
		defer runtime.UnlockOSThread()
		return fn()
	}
	runtime.UnlockOSThread()

	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		back, err := unix.Open(threadNetnsPath, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			done <- fmt.Errorf("open current network namespace: %w", err)
			return
		}
		defer unix.Close(back)
		if err := unix.Setns(n.fd, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			done <- fmt.Errorf("enter network namespace: %w", err)
			return
		}
		err = fn()
		if unix.Setns(back, unix.CLONE_NEWNET) != nil {
			done <- err // the thread stays locked and dies with this goroutine
			return
		}
		runtime.UnlockOSThread()
		done <- err
	}()
	return <-done
}

// Close releases the namespace handle, after Do calls in progress; later Do
// calls fail with net.ErrClosed. It is safe to call more than once.
func (n *Netns) Close() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return nil
	}
	n.closed = true
	if !n.known {
		return nil
	}
	n.known = false
	return unix.Close(n.fd)
}
