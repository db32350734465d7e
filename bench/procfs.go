package bench

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// clockTicks is USER_HZ, the unit of utime and stime in /proc/PID/stat; it is
// 100 on every Linux architecture Go supports.
const clockTicks = 100

// ProcCPUSeconds returns utime+stime of all threads of pid, in seconds.
func ProcCPUSeconds(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("bench: cpu of pid %d: %w", pid, err)
	}
	ut, st, err := parseStatCPU(string(b))
	if err != nil {
		return 0, fmt.Errorf("bench: cpu of pid %d: %w", pid, err)
	}
	return float64(ut+st) / clockTicks, nil
}

// parseStatCPU reads utime and stime (fields 14 and 15) from a /proc/PID/stat
// line. The command name (field 2) may contain spaces and parentheses, so
// fields are counted from the last ')'.
func parseStatCPU(stat string) (utime, stime uint64, err error) {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, 0, errors.New("malformed stat: no ')'")
	}
	f := strings.Fields(stat[i+1:])
	// f[0] is field 3 (state), so field n is f[n-3].
	if len(f) < 13 {
		return 0, 0, fmt.Errorf("malformed stat: %d fields after the name", len(f))
	}
	if utime, err = strconv.ParseUint(f[11], 10, 64); err != nil {
		return 0, 0, fmt.Errorf("malformed utime %q", f[11])
	}
	if stime, err = strconv.ParseUint(f[12], 10, 64); err != nil {
		return 0, 0, fmt.Errorf("malformed stime %q", f[12])
	}
	return utime, stime, nil
}

// HostCPUSeconds returns, from the "cpu" line of /proc/stat, the CPU time
// all CPUs of the machine spent on work since boot (busy: user, nice,
// system, irq and softirq; guest time is already part of user) and the
// time the hypervisor ran something else while this guest's CPUs wanted to
// run (steal, 0 where the kernel does not count it). Idle and iowait are in
// neither.
func HostCPUSeconds() (busy, steal float64, err error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0, fmt.Errorf("bench: host cpu: %w", err)
	}
	bt, st, err := parseHostCPU(string(b))
	if err != nil {
		return 0, 0, fmt.Errorf("bench: host cpu: %w", err)
	}
	return float64(bt) / clockTicks, float64(st) / clockTicks, nil
}

// parseHostCPU reads the aggregate "cpu " line of /proc/stat: busy is the
// sum of user, nice, system, irq and softirq (fields 1-3, 6 and 7), steal
// field 8.
func parseHostCPU(stat string) (busy, steal uint64, err error) {
	for line := range strings.Lines(stat) {
		rest, ok := strings.CutPrefix(line, "cpu ")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) < 7 {
			return 0, 0, fmt.Errorf("malformed cpu line: %d fields", len(f))
		}
		field := func(i int) (uint64, error) {
			v, err := strconv.ParseUint(f[i], 10, 64)
			if err != nil {
				return 0, fmt.Errorf("malformed cpu field %d %q", i+1, f[i])
			}
			return v, nil
		}
		for _, i := range []int{0, 1, 2, 5, 6} {
			v, err := field(i)
			if err != nil {
				return 0, 0, err
			}
			busy += v
		}
		if len(f) > 7 {
			if steal, err = field(7); err != nil {
				return 0, 0, err
			}
		}
		return busy, steal, nil
	}
	return 0, 0, errors.New("no aggregate cpu line")
}

// ProcRSSKiB returns VmRSS of pid in KiB.
func ProcRSSKiB(pid int) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, fmt.Errorf("bench: rss of pid %d: %w", pid, err)
	}
	defer f.Close()
	return parseVmRSS(f)
}

func parseVmRSS(r io.Reader) (int64, error) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			f := strings.Fields(v)
			if len(f) != 2 || f[1] != "kB" {
				return 0, fmt.Errorf("bench: malformed VmRSS line %q", sc.Text())
			}
			return strconv.ParseInt(f[0], 10, 64)
		}
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, errors.New("bench: no VmRSS in status")
}

// FDs is what a process holds open.
type FDs struct {
	Total int // open file descriptors
	Pipes int // distinct pipes among them (each pipe has a read and a write end)
	// PipeKernelBytes estimates the kernel memory of those pipes when empty:
	// the pipe_buffer ring (40 bytes per slot; a slot is a page of capacity,
	// so a 1 MiB pipe has 256 slots; rounded as kmalloc does) plus pipePerPipeBytes of inode, dentry,
	// two struct files and pipe_inode_info. Pages with data are not counted:
	// the pipes of idle relays are empty.
	PipeKernelBytes int64
}

const (
	pipeSlotBytes    = 40   // sizeof(struct pipe_buffer) on 64-bit
	pipePerPipeBytes = 1536 // inode + dentry + 2 files + pipe_inode_info, rounded up
)

// ProcFDs counts the open descriptors and pipes of pid. Pipe capacity is read
// with F_GETPIPE_SZ on a second descriptor opened through /proc/PID/fd.
func ProcFDs(pid int) (FDs, error) {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return FDs{}, fmt.Errorf("bench: fds of pid %d: %w", pid, err)
	}
	var r FDs
	seen := map[string]bool{}
	for _, e := range ents {
		r.Total++
		p := filepath.Join(dir, e.Name())
		target, err := os.Readlink(p)
		if err != nil || !strings.HasPrefix(target, "pipe:") || seen[target] {
			continue
		}
		seen[target] = true
		r.Pipes++
		size := 16 * 4096 // the default capacity, if it cannot be read
		if fd, err := unix.Open(p, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0); err == nil {
			if n, err := unix.FcntlInt(uintptr(fd), unix.F_GETPIPE_SZ, 0); err == nil {
				size = n
			}
			unix.Close(fd)
		}
		r.PipeKernelBytes += kmallocBytes(int64(size/4096)*pipeSlotBytes) + pipePerPipeBytes
	}
	return r, nil
}

// kmallocBytes is what the kernel takes for an allocation of n bytes
// (kcalloc of the pipe ring): up to 8 KiB, the next kmalloc size class
// (powers of two, and 96 and 192); beyond, whole pages from the page
// allocator, a power of two of them (a 1 MiB pipe's 10,240-byte ring takes
// 16 KiB).
func kmallocBytes(n int64) int64 {
	switch {
	case n <= 0:
		return 0
	case n <= 8:
		return 8
	case n > 8192:
		pages := int64(1)
		for pages*4096 < n {
			pages *= 2
		}
		return pages * 4096
	case n > 64 && n <= 96:
		return 96
	case n > 128 && n <= 192:
		return 192
	}
	c := int64(8)
	for c < n {
		c *= 2
	}
	return c
}
