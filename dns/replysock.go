package dns

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Reply socket cache. LAN clients ask few DNS servers (the ISP's, 8.8.8.8,
// 1.1.1.1), so a handful of sockets, one per original destination, serve
// almost every reply; making one per reply costs a socket, bind and close
// each time, about 8 times the cost of a cached send (BenchmarkReplySocket).
const (
	maxReplySockets  = 64
	replySocketIdle  = 30 * time.Second
	replyExpireEvery = 5 * time.Second
)

// replySockets keeps transparent UDP sockets bound to original destinations
// (e.g. 8.8.8.8:53), to send replies from them. They are never connected, so
// the kernel's tproxy lookup (which prefers an established UDP socket) never
// picks them for incoming queries; those keep going to the listener. Nothing
// reads from them.
//
// The exception is a destination that is one of the gateway's own addresses
// (a client asking the router, 192.168.1.1:53): a socket bound there would
// take, and never read, the datagrams that reach that address without being
// hijacked (from the gateway itself, or from a LAN interface tpgw does not
// serve) while a local resolver such as dnsmasq listens on it. Replies from
// such addresses use a socket made for the one reply and closed at once.
type replySockets struct {
	ns          netns.NsHandle // where sockets must be made; netns.None() = anywhere
	transparent bool
	log         *slog.Logger
	isLocal     func(netip.Addr) bool // isLocalAddr; tests replace it
	nsID        unix.Stat_t           // of ns: its device and inode identify it

	mu     sync.Mutex
	socks  map[netip.AddrPort]*replySocket
	local  map[netip.Addr]localCheck // whether an address is the host's, as last seen
	closed bool
}

// localCheck is the answer of isLocalAddr for one address, kept for
// localRecheck so that local destinations do not pay for the check on every
// reply, while an address added or removed later is noticed.
type localCheck struct {
	local bool
	at    time.Time
}

const (
	localRecheck  = time.Minute
	maxLocalCheck = 1024
)

type replySocket struct {
	conn     *net.UDPConn
	users    int // sends in progress; the socket is closed only at 0
	lastUsed time.Time
}

func newReplySockets(ns netns.NsHandle, transparent bool, log *slog.Logger) *replySockets {
	var id unix.Stat_t
	if ns.IsOpen() {
		if err := unix.Fstat(int(ns), &id); err != nil {
			log.Warn("cannot identify the network namespace; reply sockets are made in the sender's", "err", err)
			ns.Close()
			ns = netns.None()
		}
	}
	return &replySockets{nsID: id, isLocal: isLocalAddr, ns: ns, transparent: transparent, log: log, socks: map[netip.AddrPort]*replySocket{}, local: map[netip.Addr]localCheck{}}
}

// send writes b to client from a socket bound to from.
func (r *replySockets) send(b []byte, client, from netip.AddrPort) error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return net.ErrClosed
	}
	if rs := r.socks[from]; rs != nil {
		rs.users++
		r.mu.Unlock()
		_, err := rs.conn.WriteToUDPAddrPort(b, client)
		r.put(from, rs)
		return err
	}
	check, seen := r.local[from.Addr()]
	fresh := seen && time.Since(check.at) <= localRecheck
	r.mu.Unlock()

	if fresh && check.local {
		return r.inNetns(func() error { return r.sendOnce(b, client, from) })
	}
	// Not cached yet: check whether from is local and make its socket, in one
	// visit to the server's namespace.
	var conn *net.UDPConn
	local := check.local
	err := r.inNetns(func() (err error) {
		if !fresh {
			local = r.isLocal(from.Addr())
		}
		if local {
			return r.sendOnce(b, client, from)
		}
		conn, err = r.bind(from)
		return err
	})
	if !fresh {
		r.mu.Lock()
		if len(r.local) >= maxLocalCheck {
			clear(r.local)
		}
		r.local[from.Addr()] = localCheck{local: local, at: time.Now()}
		r.mu.Unlock()
	}
	if err != nil || local {
		return err
	}
	rs := r.adopt(from, conn)
	if rs == nil {
		return net.ErrClosed
	}
	_, err = rs.conn.WriteToUDPAddrPort(b, client)
	r.put(from, rs)
	return err
}

// adopt caches conn as the socket for from and takes it for one send, or
// takes the socket another sender cached meanwhile (closing conn). When the
// cache is full of busy sockets conn is used uncached; put closes it. It
// returns nil once closed.
func (r *replySockets) adopt(from netip.AddrPort, conn *net.UDPConn) *replySocket {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		conn.Close()
		return nil
	}
	if other := r.socks[from]; other != nil {
		conn.Close()
		other.users++
		return other
	}
	rs := &replySocket{conn: conn, users: 1}
	if len(r.socks) >= maxReplySockets {
		r.evictOldestLocked()
	}
	if len(r.socks) < maxReplySockets {
		r.socks[from] = rs
	}
	return rs
}

func (r *replySockets) put(from netip.AddrPort, rs *replySocket) {
	r.mu.Lock()
	defer r.mu.Unlock()
	rs.users--
	rs.lastUsed = time.Now()
	if r.socks[from] != rs && rs.users == 0 {
		// Not cached (cache full, or closed meanwhile).
		rs.conn.Close()
	}
}

// evictIdleLocked closes cached sockets unused for longer than idle.
func (r *replySockets) evictIdleLocked(now time.Time, idle time.Duration) {
	for k, rs := range r.socks {
		if rs.users == 0 && now.Sub(rs.lastUsed) >= idle {
			rs.conn.Close()
			delete(r.socks, k)
		}
	}
}

// evictOldestLocked closes the least recently used idle socket, if any.
func (r *replySockets) evictOldestLocked() {
	var oldest netip.AddrPort
	var at time.Time
	for k, rs := range r.socks {
		if rs.users == 0 && (at.IsZero() || rs.lastUsed.Before(at)) {
			oldest, at = k, rs.lastUsed
		}
	}
	if rs := r.socks[oldest]; rs != nil && rs.users == 0 {
		rs.conn.Close()
		delete(r.socks, oldest)
	}
}

// expireLoop closes idle sockets until ctx is done.
func (r *replySockets) expireLoop(ctx context.Context) {
	t := time.NewTicker(replyExpireEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			r.mu.Lock()
			r.evictIdleLocked(now, replySocketIdle)
			for a, c := range r.local {
				if now.Sub(c.at) > localRecheck {
					delete(r.local, a)
				}
			}
			r.mu.Unlock()
		}
	}
}

// close closes every cached socket and the namespace handle. Senders still
// holding a socket close it in put.
func (r *replySockets) close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil
	}
	r.closed = true
	for k, rs := range r.socks {
		if rs.users == 0 {
			rs.conn.Close()
		}
		delete(r.socks, k)
	}
	if r.ns.IsOpen() {
		return r.ns.Close()
	}
	return nil
}

// inNetns runs fn in the server's network namespace. In tpgw every thread is
// in one namespace and this costs one check; tests run the server inside a
// namespace entered only by the thread that called Listen, while replies are
// sent from goroutines on threads still in the host's namespace, where a
// socket would route nowhere.
func (r *replySockets) inNetns(fn func() error) error {
	if !r.ns.IsOpen() {
		return fn()
	}
	runtime.LockOSThread()
	// One stat, no file descriptor: cheaper than netns.Get and Equal.
	var st unix.Stat_t
	if err := unix.Stat("/proc/thread-self/ns/net", &st); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("dns: get netns: %w", err)
	}
	if st.Dev == r.nsID.Dev && st.Ino == r.nsID.Ino {
		defer runtime.UnlockOSThread()
		return fn()
	}
	runtime.UnlockOSThread()

	// A fresh locked thread switched into the namespace. If switching back
	// fails the thread stays locked and the runtime ends it with the
	// goroutine, so no other goroutine ever runs in the wrong namespace.
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			done <- fmt.Errorf("dns: get netns: %w", err)
			return
		}
		defer orig.Close()
		if err := netns.Set(r.ns); err != nil {
			runtime.UnlockOSThread()
			done <- fmt.Errorf("dns: enter netns: %w", err)
			return
		}
		err = fn()
		if serr := netns.Set(orig); serr != nil {
			done <- err // thread stays locked and dies with us
			return
		}
		runtime.UnlockOSThread()
		done <- err
	}()
	return <-done
}

// isLocalAddr reports whether a is an address of this host, in the calling
// thread's namespace: binding it without IP_TRANSPARENT succeeds only then
// (or everywhere with net.ipv4.ip_nonlocal_bind=1, which just makes every
// reply socket a one-off). Port 0 never conflicts with a bound socket.
func isLocalAddr(a netip.Addr) bool {
	var family int
	var sa unix.Sockaddr
	if a.Is4() {
		family, sa = unix.AF_INET, &unix.SockaddrInet4{Addr: a.As4()}
	} else {
		family, sa = unix.AF_INET6, &unix.SockaddrInet6{Addr: a.As16(), ZoneId: zoneID(a)}
	}
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	return unix.Bind(fd, sa) == nil
}

// sendOnce sends b to client from a socket bound to from for this one
// datagram, in the calling thread's namespace. Plain syscalls: the runtime's
// poller has no use for a socket that lives for one send, and skipping it
// halves the cost.
func (r *replySockets) sendOnce(b []byte, client, from netip.AddrPort) error {
	var family int
	var src, dst unix.Sockaddr
	if from.Addr().Is4() {
		family = unix.AF_INET
		src = &unix.SockaddrInet4{Addr: from.Addr().As4(), Port: int(from.Port())}
		dst = &unix.SockaddrInet4{Addr: client.Addr().Unmap().As4(), Port: int(client.Port())}
	} else {
		family = unix.AF_INET6
		src = &unix.SockaddrInet6{Addr: from.Addr().As16(), Port: int(from.Port()), ZoneId: zoneID(from.Addr())}
		dst = &unix.SockaddrInet6{Addr: client.Addr().As16(), Port: int(client.Port()), ZoneId: zoneID(client.Addr())}
	}
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return fmt.Errorf("dns: reply socket %v: %w", from, err)
	}
	defer unix.Close(fd)
	if r.transparent {
		if err := setTransparent(fd); err != nil {
			return fmt.Errorf("dns: reply socket %v: %w", from, err)
		}
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		return fmt.Errorf("dns: reply socket %v: set SO_REUSEADDR: %w", from, err)
	}
	if err := unix.Bind(fd, src); err != nil {
		return fmt.Errorf("dns: reply socket: bind %v: %w", from, err)
	}
	if err := unix.Sendto(fd, b, 0, dst); err != nil {
		return fmt.Errorf("dns: reply from %v to %v: %w", from, client, err)
	}
	return nil
}

// zoneID is the interface index of a scoped IPv6 address (numeric zone, as
// parseOrigDst makes it, or an interface name), 0 if none.
func zoneID(a netip.Addr) uint32 {
	z := a.Zone()
	if z == "" {
		return 0
	}
	if n, err := strconv.ParseUint(z, 10, 32); err == nil {
		return uint32(n)
	}
	if ifi, err := net.InterfaceByName(z); err == nil {
		return uint32(ifi.Index)
	}
	return 0
}

// bind makes the socket in the calling thread's namespace: IP_TRANSPARENT to
// bind a non-local address, SO_REUSEADDR to share it with other sockets bound
// there (a one-off reply socket, a relay's UDP session, a local resolver).
func (r *replySockets) bind(from netip.AddrPort) (*net.UDPConn, error) {
	network := "udp4"
	if from.Addr().Is6() {
		network = "udp6"
	}
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		return control(c, func(fd int) error {
			if r.transparent {
				if err := setTransparent(fd); err != nil {
					return err
				}
			}
			return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
		})
	}}
	pc, err := lc.ListenPacket(context.Background(), network, from.String())
	if err != nil {
		return nil, fmt.Errorf("dns: reply socket: %w", err)
	}
	return pc.(*net.UDPConn), nil
}
