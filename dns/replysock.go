package dns

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tpgw/tpgw/internal/tsock"
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
// such addresses leave from a raw socket that writes the UDP header itself
// (sendLocal): no socket is ever bound there, not even for the one send,
// which would take the datagrams that arrive meanwhile (such as tpgw's own
// forward of a local name to that dnsmasq, lost with a SERVFAIL 3 s later).
type replySockets struct {
	ns          *tsock.Netns // the server's: sockets are made there, whichever thread sends
	transparent bool
	log         *slog.Logger
	isLocal     func(netip.Addr) bool // isLocalAddr; tests replace it
	raw         rawSender             // replies from local addresses
	rawDenied   atomic.Bool           // no CAP_NET_RAW: sendOnce instead

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
	conn     *tsock.ReplySocket
	users    int // sends in progress; the socket is closed only at 0
	lastUsed time.Time
}

// rawSender sends a datagram with any source: *tsock.RawUDP.
type rawSender interface {
	Send(payload []byte, src, dst netip.AddrPort) error
	Close() error
}

// newReplySockets makes replySockets that make their sockets in ns, which
// they own (close closes it).
func newReplySockets(ns *tsock.Netns, transparent bool, log *slog.Logger) *replySockets {
	return &replySockets{isLocal: isLocalAddr, ns: ns, transparent: transparent, log: log, raw: tsock.NewRawUDP(),
		socks: map[netip.AddrPort]*replySocket{}, local: map[netip.Addr]localCheck{}}
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
		return r.ns.Do(func() error { return r.sendLocal(b, client, from) })
	}
	// Not cached yet: check whether from is local and make its socket, in one
	// visit to the server's namespace.
	var conn *tsock.ReplySocket
	local := check.local
	err := r.ns.Do(func() (err error) {
		if !fresh {
			local = r.isLocal(from.Addr())
		}
		if local {
			return r.sendLocal(b, client, from)
		}
		conn, err = r.bind(from)
		return err
	})
	if !fresh {
		r.rememberLocal(from.Addr(), local)
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

// sendBatch sends the replies of pending that leave from `from` with one
// sendmmsg on its cached socket. Without a cached socket (the first reply
// from that address, or an address of this host) they go one by one
// through send, which makes the socket.
func (r *replySockets) sendBatch(w *tsock.BatchWriter, from netip.AddrPort, pending []pendingReply) error {
	r.mu.Lock()
	rs := r.socks[from]
	if rs != nil && !r.closed {
		rs.users++
	} else {
		rs = nil
	}
	r.mu.Unlock()
	if rs == nil {
		var errs []error
		for _, p := range pending {
			if p.origDst == from {
				if err := r.send(p.reply, p.client, from); err != nil {
					errs = append(errs, err)
				}
			}
		}
		return errors.Join(errs...)
	}
	defer r.put(from, rs)
	for _, p := range pending {
		if p.origDst == from {
			w.Add(p.reply, p.client, nil, rs.conn.V6())
		}
	}
	return rs.conn.Flush(w)
}

// adopt caches conn as the socket for from and takes it for one send, or
// takes the socket another sender cached meanwhile (closing conn). When the
// cache is full of busy sockets conn is used uncached; put closes it. It
// returns nil once closed.
func (r *replySockets) adopt(from netip.AddrPort, conn *tsock.ReplySocket) *replySocket {
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
	return errors.Join(r.raw.Close(), r.ns.Close())
}

// localAddr reports whether a is an address of this host, in the server's
// namespace, with the answer kept for localRecheck as send keeps it.
func (r *replySockets) localAddr(a netip.Addr) bool {
	r.mu.Lock()
	check, seen := r.local[a]
	r.mu.Unlock()
	if seen && time.Since(check.at) <= localRecheck {
		return check.local
	}
	local := false
	if err := r.ns.Do(func() error { local = r.isLocal(a); return nil }); err != nil {
		return false
	}
	r.rememberLocal(a, local)
	return local
}

// rememberLocal keeps isLocal's answer for a, for localRecheck.
func (r *replySockets) rememberLocal(a netip.Addr, local bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.local) >= maxLocalCheck {
		clear(r.local)
	}
	r.local[a] = localCheck{local: local, at: time.Now()}
}

// isLocalAddr reports whether a is an address of this host, in the calling
// thread's namespace: binding it without IP_TRANSPARENT succeeds only then
// (or everywhere with net.ipv4.ip_nonlocal_bind=1, which just sends every
// reply from the raw socket). Port 0 never conflicts with a bound socket.
func isLocalAddr(a netip.Addr) bool { return tsock.TryBind(a) == nil }

// sendLocal sends b to client from from, an address of this host, through
// the raw socket, in the calling thread's namespace. It falls back to
// sendOnce, with the window that it has, without CAP_NET_RAW and for a reply
// larger than the link's MTU (a client's EDNS0 buffer may allow 4096 bytes):
// the kernel fragments what a UDP socket sends, not what a raw one does.
func (r *replySockets) sendLocal(b []byte, client, from netip.AddrPort) error {
	if !r.rawDenied.Load() {
		err := r.raw.Send(b, from, client)
		switch {
		case errors.Is(err, unix.EMSGSIZE):
			return r.sendOnce(b, client, from)
		case !errors.Is(err, unix.EPERM):
			return err
		}
		if !r.rawDenied.Swap(true) {
			r.log.Warn("no CAP_NET_RAW: DNS replies from this host's own addresses leave from a socket bound there for each reply, which can take a datagram sent to that address meanwhile", "err", err)
		}
	}
	return r.sendOnce(b, client, from)
}

// sendOnce sends b to client from a socket bound to from for this one
// datagram, in the calling thread's namespace. A reply socket stays out of
// the runtime's poller (tsock.OpenReply), which a socket that lives for one
// send has no use for.
func (r *replySockets) sendOnce(b []byte, client, from netip.AddrPort) error {
	conn, err := r.bind(from)
	if err != nil {
		return err
	}
	defer conn.Close()
	if _, err := conn.WriteToUDPAddrPort(b, client); err != nil {
		return fmt.Errorf("dns: reply from %v to %v: %w", from, client, err)
	}
	return nil
}

// bind makes the socket in the calling thread's namespace: IP_TRANSPARENT to
// bind a non-local address, SO_REUSEADDR to share it with other sockets bound
// there (a one-off reply socket, a relay's UDP session, a local resolver).
func (r *replySockets) bind(from netip.AddrPort) (*tsock.ReplySocket, error) {
	conn, err := tsock.OpenReply(from, tsock.ReplyOptions{Plain: !r.transparent})
	if err != nil {
		return nil, fmt.Errorf("dns: reply socket: %w", err)
	}
	return conn, nil
}
