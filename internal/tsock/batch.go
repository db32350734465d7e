package tsock

import (
	"encoding/binary"
	"net"
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// mmsghdr is struct mmsghdr: a msghdr and the length recvmmsg received. Go
// pads the struct to the msghdr's alignment, as C does, so a slice of them
// is the array the kernel expects on 32- and 64-bit platforms alike.
type mmsghdr struct {
	hdr unix.Msghdr
	n   uint32
}

// BatchMsg is one datagram read by a BatchReader. Its slices point into the
// reader's buffers and are valid until the next Read.
type BatchMsg struct {
	Data []byte
	OOB  []byte
	Src  netip.AddrPort // v4-mapped sources are unmapped
}

// BatchReader reads many datagrams with one recvmmsg(2) system call: under
// load that is one call and one wake-up for a whole burst instead of one per
// datagram. It allocates nothing per call. One goroutine may use it at a
// time.
type BatchReader struct {
	rc    syscall.RawConn
	hdrs  []mmsghdr
	iovs  []unix.Iovec
	names []unix.RawSockaddrInet6 // large enough for sockaddr_in too
	bufs  [][]byte
	oobs  [][]byte
	msgs  []BatchMsg
	// read is the function handed to RawConn.Read, made once.
	read    func(fd uintptr) bool
	got     int
	readErr error
}

// NewBatchReader prepares to read up to batch datagrams of at most bufSize
// bytes each, with oobSize bytes of control messages, per call.
func NewBatchReader(c *net.UDPConn, batch, bufSize, oobSize int) (*BatchReader, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	r := &BatchReader{
		rc:    rc,
		hdrs:  make([]mmsghdr, batch),
		iovs:  make([]unix.Iovec, batch),
		names: make([]unix.RawSockaddrInet6, batch),
		bufs:  make([][]byte, batch),
		oobs:  make([][]byte, batch),
		msgs:  make([]BatchMsg, batch),
	}
	data := make([]byte, batch*bufSize)
	oob := make([]byte, batch*oobSize)
	for i := range batch {
		r.bufs[i] = data[i*bufSize : (i+1)*bufSize : (i+1)*bufSize]
		r.oobs[i] = oob[i*oobSize : (i+1)*oobSize : (i+1)*oobSize]
		r.iovs[i].Base = &r.bufs[i][0]
		r.iovs[i].SetLen(bufSize)
	}
	r.read = r.recvmmsg
	return r, nil
}

// reset restores the lengths the kernel overwrote in the previous call.
func (r *BatchReader) reset() {
	for i := range r.hdrs {
		h := &r.hdrs[i].hdr
		h.Name = (*byte)(unsafe.Pointer(&r.names[i]))
		h.Namelen = unix.SizeofSockaddrInet6
		h.Iov = &r.iovs[i]
		h.SetIovlen(1)
		if len(r.oobs[i]) > 0 {
			h.Control = &r.oobs[i][0]
			h.SetControllen(len(r.oobs[i]))
		}
		h.Flags = 0
		r.hdrs[i].n = 0
	}
}

func (r *BatchReader) recvmmsg(fd uintptr) bool {
	r.reset()
	// A raw system call (see doc.go, "Raw system calls"): MSG_DONTWAIT.
	n, _, errno := unix.RawSyscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&r.hdrs[0])), uintptr(len(r.hdrs)),
		unix.MSG_DONTWAIT, 0, 0)
	if errno == unix.EAGAIN || errno == unix.EWOULDBLOCK {
		return false // park until readable
	}
	r.got, r.readErr = int(n), nil
	if errno != 0 {
		r.got, r.readErr = 0, errno
	}
	return true
}

// Read blocks until at least one datagram is there and returns the ones
// read (at most the batch size). The result is valid until the next Read.
// Errors are those of the socket (net.ErrClosed after Close).
func (r *BatchReader) Read() ([]BatchMsg, error) {
	if err := r.rc.Read(r.read); err != nil {
		return nil, err
	}
	if r.readErr != nil {
		return nil, r.readErr
	}
	out := r.msgs[:0]
	for i := range r.got {
		h := &r.hdrs[i]
		src, ok := sockaddrAddrPort(&r.names[i], h.hdr.Namelen)
		if !ok {
			continue
		}
		n := min(int(h.n), len(r.bufs[i]))
		oobn := min(int(h.hdr.Controllen), len(r.oobs[i]))
		out = append(out, BatchMsg{Data: r.bufs[i][:n], OOB: r.oobs[i][:oobn], Src: src})
	}
	return out, nil
}

// sockaddrAddrPort decodes the source address recvmmsg wrote.
func sockaddrAddrPort(sa *unix.RawSockaddrInet6, n uint32) (netip.AddrPort, bool) {
	b := unsafe.Slice((*byte)(unsafe.Pointer(sa)), unix.SizeofSockaddrInet6)[:min(int(n), unix.SizeofSockaddrInet6)]
	if len(b) < 2 {
		return netip.AddrPort{}, false
	}
	switch binary.NativeEndian.Uint16(b) {
	case unix.AF_INET:
		if len(b) < 8 {
			return netip.AddrPort{}, false
		}
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[4:8])), binary.BigEndian.Uint16(b[2:4])), true
	case unix.AF_INET6:
		if len(b) < 24 {
			return netip.AddrPort{}, false
		}
		return netip.AddrPortFrom(netip.AddrFrom16([16]byte(b[8:24])).Unmap(), binary.BigEndian.Uint16(b[2:4])), true
	}
	return netip.AddrPort{}, false
}

// BatchWriter sends many datagrams with one sendmmsg(2) system call, each to
// its own destination and with its own control message. It allocates
// nothing per call. One goroutine may use it at a time.
type BatchWriter struct {
	hdrs  []mmsghdr
	iovs  []unix.Iovec
	names []unix.RawSockaddrInet6 // large enough for sockaddr_in too
	oobs  [][]byte
	n     int // datagrams queued
	// State of one Flush, for the function handed to RawConn.Write.
	write func(fd uintptr) bool
	off   int
	err   error
}

// NewBatchWriter prepares to send up to batch datagrams per call, each with
// at most oobSize bytes of control message.
func NewBatchWriter(batch, oobSize int) *BatchWriter {
	w := &BatchWriter{
		hdrs:  make([]mmsghdr, batch),
		iovs:  make([]unix.Iovec, batch),
		names: make([]unix.RawSockaddrInet6, batch),
		oobs:  make([][]byte, batch),
	}
	oob := make([]byte, batch*oobSize)
	for i := range batch {
		w.oobs[i] = oob[i*oobSize : i*oobSize : (i+1)*oobSize]
	}
	w.write = w.sendmmsg
	return w
}

// Len is the number of datagrams queued.
func (w *BatchWriter) Len() int { return w.n }

// Add queues b for dst, with oob (nil for none; copied) as its control
// message; false when the batch is full or oob does not fit. b is not
// copied: it must not change until Flush. v6 says the socket the batch goes
// out on is AF_INET6, where IPv4 destinations are written v4-mapped.
func (w *BatchWriter) Add(b []byte, dst netip.AddrPort, oob []byte, v6 bool) bool {
	if w.n == len(w.hdrs) || len(oob) > cap(w.oobs[w.n]) || len(b) == 0 {
		return false
	}
	i := w.n
	namelen, ok := putSockaddr(&w.names[i], dst, v6)
	if !ok {
		return false
	}
	w.iovs[i].Base = &b[0]
	w.iovs[i].SetLen(len(b))
	w.oobs[i] = append(w.oobs[i][:0], oob...)
	h := &w.hdrs[i].hdr
	*h = unix.Msghdr{Name: (*byte)(unsafe.Pointer(&w.names[i])), Namelen: namelen, Iov: &w.iovs[i]}
	h.SetIovlen(1)
	if len(oob) > 0 {
		h.Control = &w.oobs[i][0]
		h.SetControllen(len(oob))
	}
	w.n++
	return true
}

// putSockaddr writes dst into sa as a sockaddr_in6 (v6: the socket is
// AF_INET6, where IPv4 destinations are written v4-mapped) or a sockaddr_in,
// and returns its length; false when dst is IPv6 and the socket is not.
func putSockaddr(sa *unix.RawSockaddrInet6, dst netip.AddrPort, v6 bool) (uint32, bool) {
	if v6 {
		*sa = unix.RawSockaddrInet6{Family: unix.AF_INET6, Addr: dst.Addr().As16(), Scope_id: ZoneID(dst.Addr())}
		putPort(&sa.Port, dst.Port())
		return unix.SizeofSockaddrInet6, true
	}
	if !dst.Addr().Unmap().Is4() {
		return 0, false
	}
	sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
	*sa4 = unix.RawSockaddrInet4{Family: unix.AF_INET, Addr: dst.Addr().Unmap().As4()}
	putPort(&sa4.Port, dst.Port())
	return unix.SizeofSockaddrInet4, true
}

// putPort writes a port in network byte order into a sockaddr's port field.
func putPort(field *uint16, port uint16) {
	binary.BigEndian.PutUint16(unsafe.Slice((*byte)(unsafe.Pointer(field)), 2), port)
}

// Flush sends the queued datagrams on rc, waiting while the socket's send
// buffer is full, and empties the batch. A datagram the kernel refuses is
// skipped, the others are still sent; the error is the first refusal, or the
// socket's (net.ErrClosed after Close).
func (w *BatchWriter) Flush(rc syscall.RawConn) error {
	if w.n == 0 {
		return nil
	}
	w.off, w.err = 0, nil
	err := rc.Write(w.write)
	w.clear()
	if err != nil {
		return err
	}
	return w.err
}

// clear empties the batch, dropping its references to the callers' buffers.
func (w *BatchWriter) clear() {
	for i := range w.n {
		w.iovs[i].Base = nil
	}
	w.n = 0
}

func (w *BatchWriter) sendmmsg(fd uintptr) bool { return w.send(fd, false) }

// send sends what is left of the batch. Without wait it is a raw system
// call with MSG_DONTWAIT (see doc.go, "Raw system calls") and returns false
// while the socket's send buffer is full. With wait (ReplySocket, a blocking
// socket) the call waits for room, accounted by the runtime as a system call
// that may block, up to the socket's SO_SNDTIMEO; when that passes, the rest
// is dropped with EAGAIN.
func (w *BatchWriter) send(fd uintptr, wait bool) bool {
	for w.off < w.n {
		var n uintptr
		var errno unix.Errno
		if wait {
			n, _, errno = unix.Syscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&w.hdrs[w.off])), uintptr(w.n-w.off), 0, 0, 0)
		} else {
			n, _, errno = unix.RawSyscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&w.hdrs[w.off])), uintptr(w.n-w.off),
				unix.MSG_DONTWAIT, 0, 0)
		}
		switch {
		case errno == unix.EAGAIN || errno == unix.EWOULDBLOCK:
			if !wait {
				return false // wait until writable
			}
			if w.err == nil {
				w.err = errno
			}
			return true
		case errno == unix.EINTR:
		case errno != 0:
			// The datagram at off was refused (say, EPERM from a firewall
			// or an unreachable destination); go on with the next.
			if w.err == nil {
				w.err = errno
			}
			w.off++
		default:
			w.off += int(n)
		}
	}
	return true
}
