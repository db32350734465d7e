package engine

import (
	"io"
	"os"
	"syscall"
	"unsafe"

	N "github.com/metacubex/sing/common/network"
	"golang.org/x/sys/unix"
)

// pipeSize is the capacity asked for a spliced direction's pipe (the default
// fs.pipe-max-size): one splice call moves up to this much.
const pipeSize = 1 << 20

// spliceAll moves a direction's bytes from src to dst with splice(2) through
// a pipe of its own until src's EOF, calling counters for every chunk as it
// enters the pipe.
//
// The splice calls are raw system calls (as tsock's recvmmsg and sendmmsg;
// see its doc.go): with both ends non-blocking and SPLICE_F_NONBLOCK they
// never wait for data or room, and waiting still goes through the
// runtime's poller (RawConn.Read and Write). Through the runtime's syscall
// entry (sing's copy, which tpgw used before), the first splice after the
// process had gone idle, which a bulk flow does between bursts, woke the
// scheduler's monitor thread (sysmon), and it then slept and woke every
// 20 µs for a millisecond. Measured with perf stat on the gateway process
// during 6 s of a single-stream iperf3 upload in the bench's namespaces:
// about 20,000 nanosleeps, 8,000 futex calls and 46,000 context switches,
// against about 100, 150 and 13,000 with raw calls; the process's CPU per
// GB moved fell by 14–26%. The chunked reads and writes of a flow that is not
// bulk (park.go) are raw calls too: a request after a quiet moment woke
// sysmon the same way. Over 7 alternating rounds the added median latency
// of a keep-alive request (wrk -c1) was 120 µs on average before and 106
// after, with a wide spread (79–147 µs).
func spliceAll(src, dst syscall.RawConn, counters []N.CountFunc) error {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return err
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	// A smaller pipe (fs.pipe-max-size or the user's pipe quota) still works.
	_, _ = unix.FcntlInt(uintptr(p[0]), unix.F_SETPIPE_SZ, pipeSize)

	var inPipe int   // bytes in the pipe, not yet written on
	var errIn error  // the last read's error
	var errOut error // the last write's error
	fill := func(fd uintptr) bool {
		n, err := rawSplice(int(fd), p[1], pipeSize)
		if err == unix.EAGAIN {
			return false
		}
		inPipe, errIn = n, err
		return true
	}
	drain := func(fd uintptr) bool {
		for inPipe > 0 {
			n, err := rawSplice(p[0], int(fd), inPipe)
			if err == unix.EAGAIN {
				return false
			}
			if err == nil && n == 0 {
				// Not expected from a pipe that holds data and has a
				// writer; do not spin on it.
				err = io.ErrNoProgress
			}
			if err != nil {
				errOut = err
				return true
			}
			inPipe -= n
		}
		return true
	}
	for {
		if err := src.Read(fill); err != nil {
			return err
		}
		if errIn != nil {
			return errIn
		}
		if inPipe == 0 {
			return nil // EOF
		}
		// Counted once in the pipe, before the write (as pump counts).
		for _, count := range counters {
			count(int64(inPipe))
		}
		if err := dst.Write(drain); err != nil {
			return err
		}
		if errOut != nil {
			return errOut
		}
	}
}

// rawSplice is one splice(2) of up to n bytes between non-blocking
// descriptors, retried on EINTR. It returns unix.EAGAIN when it would wait.
func rawSplice(in, out, n int) (int, error) {
	for {
		r, _, e := unix.RawSyscall6(unix.SYS_SPLICE, uintptr(in), 0, uintptr(out), 0, uintptr(n),
			unix.SPLICE_F_NONBLOCK|unix.SPLICE_F_MOVE)
		switch e {
		case 0:
			return int(r), nil
		case unix.EINTR:
			continue
		default:
			return 0, e
		}
	}
}

// rawRead is read(2) on a non-blocking descriptor as a raw system call
// (see spliceAll), retried on EINTR; unix.EAGAIN when there is nothing to
// read.
func rawRead(fd int, b []byte) (int, error) { return rawIO(unix.SYS_READ, fd, b) }

// rawWrite is write(2) on a non-blocking descriptor as a raw system call,
// retried on EINTR; unix.EAGAIN when the socket takes nothing more.
func rawWrite(fd int, b []byte) (int, error) { return rawIO(unix.SYS_WRITE, fd, b) }

// rawWriteAll writes b with rawWrite until all of it went, the socket takes
// no more (unix.EAGAIN) or a call fails; it returns how much went.
func rawWriteAll(fd int, b []byte) (int, error) {
	done := 0
	for done < len(b) {
		n, err := rawWrite(fd, b[done:])
		if err == nil && n == 0 {
			err = io.ErrNoProgress // not from a socket; do not spin
		}
		if err != nil {
			return done, err
		}
		done += n
	}
	return done, nil
}

// rawCloseWrite is shutdown(SHUT_WR) of rc's socket as a raw system call:
// on a veth or loopback the call carries the peer's processing of the FIN
// and the ACK, long enough for Go's scheduler to hand the thread's P over
// and keep sysmon waking (see above). In perf over the bench's
// connection-rate run sysmon's share of the process fell from 23% to 15%
// with it; most of the rest comes with connect(2), which mihomo's dialer
// makes through Go.
func rawCloseWrite(rc syscall.RawConn) error {
	var errno unix.Errno
	if err := rc.Control(func(fd uintptr) {
		_, _, errno = unix.RawSyscall(unix.SYS_SHUTDOWN, fd, unix.SHUT_WR, 0)
	}); err != nil {
		return err
	}
	if errno != 0 {
		return os.NewSyscallError("shutdown", errno)
	}
	return nil
}

func rawIO(trap uintptr, fd int, b []byte) (int, error) {
	for {
		r, _, e := unix.RawSyscall(trap, uintptr(fd), uintptr(unsafe.Pointer(unsafe.SliceData(b))), uintptr(len(b)))
		if e == 0 {
			return int(r), nil
		}
		if e != unix.EINTR {
			return 0, e
		}
	}
}
