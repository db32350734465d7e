package bench

import (
	"errors"
	"fmt"
	"math"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tpgw/tpgw/internal/testnet"
)

// idleServer is a listener in the upstream namespace that never accepts:
// connections complete their handshake in the kernel and wait in the accept
// queue, so they cost this process no descriptors (its RLIMIT_NOFILE is
// bounded, and raising it needs CAP_SYS_RESOURCE). release closes the
// listener, which resets every queued connection, and listens again.
type idleServer struct {
	ns *testnet.NS
	fd int
}

// idleBacklog bounds the accept queue; the namespace's somaxconn is raised to it.
const idleBacklog = 65535

func (r *runner) startIdleServer() *idleServer {
	r.tp.Upstream.SetSysctl(r.env, "net.core.somaxconn", strconv.Itoa(idleBacklog))
	r.tp.Upstream.SetSysctl(r.env, "net.ipv4.tcp_max_syn_backlog", strconv.Itoa(idleBacklog))
	s := &idleServer{ns: r.tp.Upstream, fd: -1}
	if err := s.listen(); err != nil {
		r.env.Fatalf("bench: idle server: %v", err)
	}
	r.env.Cleanup(func() { unix.Close(s.fd) })
	return s
}

func (s *idleServer) listen() error {
	return s.ns.Do(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
			unix.Close(fd)
			return err
		}
		if err := unix.Bind(fd, &unix.SockaddrInet4{Port: idlePort}); err != nil {
			unix.Close(fd)
			return err
		}
		if err := unix.Listen(fd, idleBacklog); err != nil {
			unix.Close(fd)
			return err
		}
		s.fd = fd
		return nil
	})
}

// count is the number of established connections to the idle port in the
// upstream namespace (all of them wait in the accept queue).
func (s *idleServer) count(r *runner) int {
	out, err := s.ns.Run(r.env, 10*time.Second, "ss", "-Htn", "state", "established", "sport", "=", ":"+strconv.Itoa(idlePort))
	if err != nil {
		r.logf("  counting idle connections: %v", firstLine(err.Error()))
		return 0
	}
	return strings.Count(out, "\n")
}

func (s *idleServer) release() error {
	unix.Close(s.fd)
	s.fd = -1
	return s.listen()
}

// openIdle dials n connections from the client namespace to the idle server,
// from a few workers, each dialing on its own thread inside the namespace.
func (r *runner) openIdle(n int) ([]net.Conn, error) {
	const workers = 16
	target := net.JoinHostPort(r.tp.UpstreamIP.String(), strconv.Itoa(idlePort))
	var mu sync.Mutex
	var conns []net.Conn
	var wg sync.WaitGroup
	errs := make([]error, workers)
	for w := range workers {
		share := n / workers
		if w < n%workers {
			share++
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[w] = r.tp.Client.Do(func() error {
				d := net.Dialer{Timeout: 10 * time.Second}
				for range share {
					c, err := d.Dial("tcp4", target)
					if err != nil {
						return err
					}
					mu.Lock()
					conns = append(conns, c)
					mu.Unlock()
				}
				return nil
			})
		}()
	}
	wg.Wait()
	return conns, errors.Join(errs...)
}

// waitIdle waits (bounded) until the upstream queue holds n connections.
func (r *runner) waitIdle(n int) {
	for deadline := time.Now().Add(10 * time.Second); r.idle.count(r) < n && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
	}
}

// measureIdle opens IdleConns connections through setup, records the gateway
// process's memory and descriptors, and runs a bulk upload beside them.
func (r *runner) measureIdle(setup string) {
	n := r.opts.IdleConns
	g, err := r.start(setup)
	if err != nil {
		r.fail("idle: start "+setup, err)
		return
	}
	defer g.stop()
	start := time.Now()
	// The connections of the setup before were never accepted: closed by
	// their clients, they would still fill the accept queue. A new listener
	// starts empty (closing the old one resets what it held).
	if err := r.idle.release(); err != nil {
		r.fail("idle: "+setup+": re-listen", err)
		return
	}
	// Connections of an earlier setup may linger until their closes arrive.
	for deadline := time.Now().Add(15 * time.Second); r.idle.count(r) > 0 && time.Now().Before(deadline); {
		time.Sleep(100 * time.Millisecond)
	}
	// A relayed connection costs the gateway several descriptors (two
	// sockets, and the pipes of a splicing copy). Probe how many, and open
	// only as many as fit its RLIMIT_NOFILE: past it the gateway fails in
	// ways that would make the memory figure meaningless.
	const probe = 100
	var base FDs
	if g.pid != 0 {
		base, _ = ProcFDs(g.pid)
	}
	conns, err := r.openIdle(probe)
	// The connections must stay open until the measurement ends: a net.Conn
	// no longer referenced is closed by its finalizer when the GC runs, and
	// the gateway then passes the FIN on (the upstream's queue held 3248
	// connections in CLOSE-WAIT and the count found none).
	//
	// They end with a reset (SO_LINGER 0), not a FIN. Closed with a FIN,
	// the relay's side of each was left in LAST-ACK once the relay had
	// stopped (its rules gone, the client's last ACK no longer reaches the
	// transparent socket), and while those sockets retry their FIN the
	// kernel drops a forwarded SYN with the same addresses and ports (early
	// demux ties it to the socket, and a packet tied to a socket is not
	// forwarded): K, run after a relay, got 37 to 3,331 of its 10,000.
	defer func() {
		for _, c := range conns {
			if tc, ok := c.(*net.TCPConn); ok {
				tc.SetLinger(0)
			}
			c.Close()
		}
	}()
	if err == nil && g.pid != 0 && n > probe {
		r.waitIdle(probe)
		time.Sleep(500 * time.Millisecond)
		after, ferr := ProcFDs(g.pid)
		if perConn := float64(after.Total-base.Total) / probe; ferr == nil && perConn > 0 {
			fit := probe + int(float64(int(nofileLimit())-after.Total-500)/perConn)
			if fit < n {
				r.logf("  %.1f fds per connection: %d connections fit RLIMIT_NOFILE %d", perConn, fit, nofileLimit())
				r.noteOnce(fmt.Sprintf("%s holds %.1f fds per idle connection: %d of %d connections fit its RLIMIT_NOFILE of %d (raising it needs CAP_SYS_RESOURCE, which this host lacks), so its idle figures are at %d connections.",
					setup, perConn, fit, n, nofileLimit(), fit))
				n = fit
			}
		}
	}
	if err == nil {
		var more []net.Conn
		more, err = r.openIdle(n - probe)
		conns = append(conns, more...)
	}
	if err != nil {
		r.logf("  opening the connections: %v", firstLine(err.Error()))
	}
	// Wait until the upstream holds them all, or until no more arrive: a
	// gateway short of descriptors stops relaying new connections while the
	// kernel still completes the client's handshakes.
	got, last, lastChange := 0, -1, time.Now()
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		if got = min(r.idle.count(r), n); got >= n {
			break
		}
		if got != last {
			last, lastChange = got, time.Now()
		} else if time.Since(lastChange) > 5*time.Second {
			break
		}
	}
	r.s.add("idle_relayed", setup, float64(got))
	if got < n {
		r.fail("idle: "+setup, fmt.Errorf("upstream got %d of %d connections (fd limit %d)", got, n, nofileLimit()))
		if out, err := r.idle.ns.Run(r.env, 10*time.Second, "ss", "-ltn", "sport", "=", ":"+strconv.Itoa(idlePort)); err == nil {
			r.logf("  upstream listener (Recv-Q: queued, Send-Q: backlog):\n%s", out)
		}
		if len(g.procs) > 0 {
			out := g.procs[len(g.procs)-1].Output()
			r.logf("  gateway output (last 2000 bytes):\n%s", out[max(0, len(out)-2000):])
		}
		if got == 0 {
			return
		}
	}
	r.logf("  %d of %d connections at the upstream after %v", got, n, time.Since(start).Round(time.Millisecond))
	time.Sleep(2 * time.Second) // settle: goroutines parked, pipes drained
	if g.pid != 0 {
		rss, err1 := ProcRSSKiB(g.pid)
		fds, err2 := ProcFDs(g.pid)
		if err := errors.Join(err1, err2); err != nil {
			r.fail("idle: "+setup+" /proc", err)
		} else {
			r.s.add("idle_rss", setup, float64(rss)/1024)
			r.s.add("idle_fds", setup, float64(fds.Total))
			r.s.add("idle_pipes", setup, float64(fds.Pipes))
			perConn := (float64(rss)*1024 + float64(fds.PipeKernelBytes)) / float64(got) / 1024
			r.s.add("idle_mem_per_conn", setup, perConn)
			r.logf("  RSS %d KiB, %d fds, %d pipes (~%d KiB kernel), %.1f KiB per connection",
				rss, fds.Total, fds.Pipes, fds.PipeKernelBytes/1024, perConn)
		}
	}
	res, err := r.iperf("-O", "1")
	if err != nil {
		r.fail("idle: bulk upload through "+setup, err)
		r.s.add("idle_bulk", setup, math.NaN())
		return
	}
	r.s.add("idle_bulk", setup, res.BitsPerSec/1e9)
	r.logf("  bulk upload beside them: %.2f Gbit/s", res.BitsPerSec/1e9)
}

// nofileLimit is this process's RLIMIT_NOFILE, which the gateway inherits.
func nofileLimit() uint64 {
	var lim unix.Rlimit
	if unix.Getrlimit(unix.RLIMIT_NOFILE, &lim) != nil {
		return 0
	}
	return lim.Cur
}
