package relay

import (
	"errors"
	"fmt"
	"net"
	"runtime"
	"sync"

	"golang.org/x/sys/unix"
)

// threadNetnsPath names the network namespace of the calling OS thread.
const threadNetnsPath = "/proc/thread-self/ns/net"

// homeNetns remembers the network namespace a listener was opened in, so that
// the sockets it opens later (UDP reply sockets, on whichever goroutine calls
// reply) live in the same namespace.
//
// In tpgw the whole process is in one namespace: do finds the calling thread
// already at home (one stat(2)) and runs fn in place. Tests open listeners
// inside a namespace on a locked thread (testnet's NS.Do) and call reply from
// other goroutines; do then runs fn on a fresh locked thread switched into the
// home namespace and back, the way NS.Do does.
type homeNetns struct {
	mu       sync.RWMutex // held for reading while fd is in use, for writing by close
	fd       int          // open /proc/thread-self/ns/net of the opener, -1 when unknown or closed
	dev, ino uint64       // identity of the namespace (nsfs device and inode)
	unknown  bool         // /proc was not readable: run everything in place
	closed   bool
}

// currentNetns records the namespace of the calling thread. A caller that
// switched namespaces must hold its thread locked (runtime.LockOSThread).
func currentNetns() *homeNetns {
	fd, err := unix.Open(threadNetnsPath, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return &homeNetns{fd: -1, unknown: true}
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return &homeNetns{fd: -1, unknown: true}
	}
	return &homeNetns{fd: fd, dev: st.Dev, ino: st.Ino}
}

// isCurrent reports whether the calling (locked) thread is in the home namespace.
func (h *homeNetns) isCurrent() bool {
	var st unix.Stat_t
	if err := unix.Stat(threadNetnsPath, &st); err != nil {
		return false
	}
	return st.Dev == h.dev && st.Ino == h.ino
}

// do runs fn in the home namespace. fn must not start goroutines that need
// the namespace: only fn's own thread is switched.
func (h *homeNetns) do(fn func() error) error {
	h.mu.RLock()
	defer h.mu.RUnlock()
	if h.closed {
		return net.ErrClosed
	}
	if h.unknown {
		return fn()
	}
	runtime.LockOSThread()
	if h.isCurrent() {
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
			done <- fmt.Errorf("relay: open current netns: %w", err)
			return
		}
		defer unix.Close(back)
		if err := unix.Setns(h.fd, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			done <- fmt.Errorf("relay: enter listener netns: %w", err)
			return
		}
		fnErr := fn()
		if err := unix.Setns(back, unix.CLONE_NEWNET); err != nil {
			// The thread stays locked: the runtime retires a locked thread when
			// its goroutine exits, so nothing else runs in the wrong namespace.
			done <- errors.Join(fnErr, fmt.Errorf("relay: leave listener netns: %w", err))
			return
		}
		runtime.UnlockOSThread()
		done <- fnErr
	}()
	return <-done
}

// close releases the namespace handle; later do calls fail with net.ErrClosed.
func (h *homeNetns) close() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return
	}
	h.closed = true
	if h.fd >= 0 {
		unix.Close(h.fd)
		h.fd = -1
	}
}
