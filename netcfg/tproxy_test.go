package netcfg

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tpgw/tpgw/internal/testsrv"
)

// link connects namespaces a and b with a veth pair and addresses them.
func link(t *testing.T, a *testNS, aIf, aAddr string, b *testNS, bIf, bAddr string) {
	t.Helper()
	a.run(t, "ip", "link", "add", aIf, "type", "veth", "peer", "name", bIf, "netns", b.name)
	a.run(t, "ip", "addr", "add", aAddr, "dev", aIf, "nodad")
	a.run(t, "ip", "link", "set", aIf, "up")
	b.run(t, "ip", "addr", "add", bAddr, "dev", bIf, "nodad")
	b.run(t, "ip", "link", "set", bIf, "up")
}

// serve accepts on ln and answers each connection with reply(conn) until ln closes.
func serve(ln net.Listener, reply func(net.Conn) string) {
	testsrv.ServeEach(ln, func(c net.Conn) { io.WriteString(c, reply(c)) })
}

// gwEnv is client ns ─ gateway ns ─ upstream ns, with an HTTP-less "server"
// on port 8080 of the upstream that answers "upstream" and closes.
type gwEnv struct {
	client, gw, upstream *testNS
	network              string // tcp4 or tcp6
	gwWAN, up            string // addresses without prefix length
	upAddr               string // up:8080
}

type gwAddrs struct{ network, gwLAN, client, gwWAN, upstream, forward string }

var (
	addrs4 = gwAddrs{"tcp4", "192.168.77.1/24", "192.168.77.2/24", "203.0.113.1/24", "203.0.113.2/24", "net.ipv4.ip_forward"}
	addrs6 = gwAddrs{"tcp6", "2001:db8:77::1/64", "2001:db8:77::2/64", "2001:db8:113::1/64", "2001:db8:113::2/64", "net.ipv6.conf.all.forwarding"}
)

func newGWEnv(t *testing.T, a gwAddrs) *gwEnv {
	t.Helper()
	e := &gwEnv{client: newTestNS(t, true), gw: newTestNS(t, true), upstream: newTestNS(t, true), network: a.network}
	link(t, e.gw, "lan0", a.gwLAN, e.client, "eth0", a.client)
	link(t, e.gw, "wan0", a.gwWAN, e.upstream, "eth0", a.upstream)
	e.gwWAN = strings.Split(a.gwWAN, "/")[0]
	e.up = strings.Split(a.upstream, "/")[0]
	e.client.run(t, "ip", "route", "add", "default", "via", strings.Split(a.gwLAN, "/")[0])
	e.upstream.run(t, "ip", "route", "add", "default", "via", e.gwWAN)
	var err error
	// Forwarding on before tpgw, so it stays on after Remove restores the old value.
	e.gw.in(t, func() { err = writeSysctl(a.forward, "1") })
	if err != nil {
		t.Fatal(err)
	}
	e.upAddr = net.JoinHostPort(e.up, "8080")
	var upLn net.Listener
	e.upstream.in(t, func() { upLn, err = net.Listen(e.network, fmt.Sprintf(":%d", 8080)) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { upLn.Close() })
	serve(upLn, func(net.Conn) string { return "upstream" })
	return e
}

// fetchFrom dials addr from ns and returns what the server says, or the error.
func fetchFrom(t *testing.T, ns *testNS, network, addr string, timeout time.Duration, control func(fd int) error) string {
	t.Helper()
	var c net.Conn
	var err error
	d := net.Dialer{Timeout: timeout}
	if control != nil {
		d.Control = func(_, _ string, rc syscall.RawConn) error {
			var cerr error
			if err := rc.Control(func(fd uintptr) { cerr = control(int(fd)) }); err != nil {
				return err
			}
			return cerr
		}
	}
	ns.in(t, func() { c, err = d.Dial(network, addr) })
	if err != nil {
		return "dial error: " + err.Error()
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	b, err := io.ReadAll(c)
	if err != nil {
		return "read error: " + err.Error()
	}
	return string(b)
}

// fetch connects from the client to the upstream server.
func (e *gwEnv) fetch(t *testing.T, timeout time.Duration) string {
	t.Helper()
	return fetchFrom(t, e.client, e.network, e.upAddr, timeout, nil)
}

// waitReady fetches until the fresh namespaces route (IPv6 neighbour
// discovery on a loaded host has taken more than okTimeout), for at most
// 10 s, and returns the last answer.
func (e *gwEnv) waitReady(t *testing.T) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := e.fetch(t, okTimeout)
		if got == "upstream" || time.Now().After(deadline) {
			return got
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// transparentListen opens an IP_TRANSPARENT TCP listener on port in ns,
// as the relay does.
func transparentListen(t *testing.T, ns *testNS, network string, port uint16) net.Listener {
	t.Helper()
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			if network == "tcp6" {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1)
			} else {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1)
			}
		})
		if err != nil {
			return err
		}
		return serr
	}}
	lc.SetMultipathTCP(false)
	var ln net.Listener
	var err error
	ns.in(t, func() { ln, err = lc.Listen(context.Background(), network, fmt.Sprintf(":%d", port)) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// serveTPGW answers each connection with "tpgw " and its local address: the
// original destination.
func serveTPGW(ln net.Listener) {
	serve(ln, func(c net.Conn) string { return "tpgw " + c.LocalAddr().String() })
}

const (
	okTimeout   = 3 * time.Second
	failTimeout = time.Second
)

// TestTProxyPath sends real TCP through a gateway namespace: with the plan
// applied but nothing listening, nftables lets the connection go straight to
// the upstream (tproxy falls through, on-failure: open) while iptables' TPROXY
// drops it; with a transparent listener on the TPROXY port, the listener gets
// it with the original destination as its local address; after Remove it
// goes straight again.
func TestTProxyPath(t *testing.T) {
	forBackends(t, func(t *testing.T, backend string) {
		for name, a := range map[string]gwAddrs{"ipv4": addrs4, "ipv6": addrs6} {
			t.Run(name, func(t *testing.T) {
				o := DefaultOptions()
				o.Interfaces = []string{"lan0"}
				o.IPv6 = a.network == "tcp6"
				e := newGWEnv(t, a)
				if got := e.waitReady(t); got != "upstream" {
					t.Fatalf("before Apply: got %q, want the upstream", got)
				}
				inst, err := apply(t, e.gw, newBackend(t, e.gw, backend, ""), mustPlan(t, o), t.TempDir())
				if err != nil {
					t.Fatalf("Apply: %v", err)
				}
				got := e.fetch(t, failTimeout)
				if backend == "nftables" && got != "upstream" {
					t.Fatalf("rules applied, nothing listening: got %q, want the upstream (tproxy must fall through)", got)
				}
				if backend == "iptables" && !strings.Contains(got, "error") {
					t.Fatalf("rules applied, nothing listening: got %q, want an error (TPROXY drops)", got)
				}
				ln := transparentListen(t, e.gw, e.network, o.TProxyPort)
				serveTPGW(ln)
				if got, want := e.fetch(t, okTimeout), "tpgw "+e.upAddr; got != want {
					t.Errorf("with a transparent listener: got %q, want %q", got, want)
				}
				ln.Close()

				remove(t, e.gw, inst)
				if got := e.fetch(t, okTimeout); got != "upstream" {
					t.Errorf("after Remove: got %q, want the upstream", got)
				}
			})
		}
	})
}

// TestOnFailure checks what LAN traffic does with the rules in place and
// nothing listening (tpgw dead): open goes direct, closed fails; with
// iptables, open needs RemoveDivert (the watchdog's job), after which it goes
// direct.
func TestOnFailure(t *testing.T) {
	cases := []struct {
		backend, policy string
		wantDirect      bool // before RemoveDivert
	}{
		{"nftables", OnFailureOpen, true},
		{"nftables", OnFailureClosed, false},
		{"iptables", OnFailureClosed, false},
		{"iptables", OnFailureOpen, false},
	}
	for _, c := range cases {
		t.Run(c.backend+"/"+c.policy, func(t *testing.T) {
			o := DefaultOptions()
			o.OnFailure = c.policy
			e := newGWEnv(t, addrs4)
			inst, err := apply(t, e.gw, newBackend(t, e.gw, c.backend, ""), mustPlan(t, o), t.TempDir())
			if err != nil {
				t.Fatalf("Apply: %v", err)
			}
			got := e.fetch(t, failTimeout)
			if c.wantDirect != (got == "upstream") {
				t.Fatalf("nothing listening: got %q, want direct=%v", got, c.wantDirect)
			}
			if c.policy == OnFailureOpen {
				e.gw.in(t, func() { err = RemoveDivert(testLogger(t)) })
				if err != nil {
					t.Fatalf("RemoveDivert: %v", err)
				}
				if got := e.fetch(t, okTimeout); got != "upstream" {
					t.Errorf("after RemoveDivert: got %q, want the upstream", got)
				}
			}
			remove(t, e.gw, inst)
		})
	}
}

// TestProxySelf: the gateway's own TCP connection to an outside address
// reaches the transparent listener with the original destination; a socket
// with SO_MARK=RoutingMark (the engine's) goes to the peer directly.
func TestProxySelf(t *testing.T) {
	forBackends(t, func(t *testing.T, backend string) {
		for name, a := range map[string]gwAddrs{"ipv4": addrs4, "ipv6": addrs6} {
			t.Run(name, func(t *testing.T) {
				o := DefaultOptions()
				o.RoutingMark = 255
				o.ProxySelf = true
				o.IPv6 = a.network == "tcp6"
				e := newGWEnv(t, a)
				if got := e.waitReady(t); got != "upstream" {
					t.Fatalf("before Apply: got %q, want the upstream", got)
				}
				inst, err := apply(t, e.gw, newBackend(t, e.gw, backend, ""), mustPlan(t, o), t.TempDir())
				if err != nil {
					t.Fatalf("Apply: %v", err)
				}
				serveTPGW(transparentListen(t, e.gw, e.network, o.TProxyPort))
				if got, want := fetchFrom(t, e.gw, e.network, e.upAddr, okTimeout, nil), "tpgw "+e.upAddr; got != want {
					t.Errorf("gateway's own connection: got %q, want %q", got, want)
				}
				withMark := func(fd int) error {
					return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, int(o.RoutingMark))
				}
				if got := fetchFrom(t, e.gw, e.network, e.upAddr, okTimeout, withMark); got != "upstream" {
					t.Errorf("socket with the routing-mark: got %q, want the upstream", got)
				}
				remove(t, e.gw, inst)
				if got := fetchFrom(t, e.gw, e.network, e.upAddr, okTimeout, nil); got != "upstream" {
					t.Errorf("after Remove: got %q, want the upstream", got)
				}
			})
		}
	})
}

// TestInputGuard: the TPROXY and DNS ports are not reachable from the WAN
// while the listeners exist; from the LAN, diverted traffic still works and
// the DNS port answers.
func TestInputGuard(t *testing.T) {
	forBackends(t, func(t *testing.T, backend string) {
		o := DefaultOptions() // no interfaces: the LAN is known by its private source addresses
		e := newGWEnv(t, addrs4)
		inst, err := apply(t, e.gw, newBackend(t, e.gw, backend, ""), mustPlan(t, o), t.TempDir())
		if err != nil {
			t.Fatalf("Apply: %v", err)
		}
		defer remove(t, e.gw, inst)
		serveTPGW(transparentListen(t, e.gw, "tcp4", o.TProxyPort))
		var dns net.PacketConn
		e.gw.in(t, func() { dns, err = net.ListenPacket("udp4", fmt.Sprintf(":%d", o.DNSPort)) })
		if err != nil {
			t.Fatal(err)
		}
		defer dns.Close()
		go func() { // a UDP echo standing in for the DNS server
			buf := make([]byte, 512)
			for {
				n, from, err := dns.ReadFrom(buf)
				if err != nil {
					return
				}
				dns.WriteTo(buf[:n], from)
			}
		}()
		udpAsk := func(ns *testNS, addr string) string {
			t.Helper()
			var c net.Conn
			var err error
			ns.in(t, func() { c, err = net.Dial("udp4", addr) })
			if err != nil {
				return "dial error: " + err.Error()
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(failTimeout))
			io.WriteString(c, "ping")
			b := make([]byte, 16)
			n, err := c.Read(b)
			if err != nil {
				return "read error: " + err.Error()
			}
			return string(b[:n])
		}

		tproxyWAN := net.JoinHostPort(e.gwWAN, fmt.Sprint(o.TProxyPort))
		if got := fetchFrom(t, e.upstream, "tcp4", tproxyWAN, failTimeout, nil); !strings.Contains(got, "error") {
			t.Errorf("TCP from the WAN to %s: got %q, want no connection", tproxyWAN, got)
		}
		dnsWAN := net.JoinHostPort(e.gwWAN, fmt.Sprint(o.DNSPort))
		if got := udpAsk(e.upstream, dnsWAN); got == "ping" {
			t.Errorf("UDP from the WAN to %s answered", dnsWAN)
		}
		// A WAN host routing through the gateway is not intercepted either.
		var clientLn net.Listener
		e.client.in(t, func() { clientLn, err = net.Listen("tcp4", ":8081") })
		if err != nil {
			t.Fatal(err)
		}
		defer clientLn.Close()
		serve(clientLn, func(net.Conn) string { return "client" })
		e.upstream.run(t, "ip", "route", "add", "192.168.77.0/24", "via", e.gwWAN)
		if got := fetchFrom(t, e.upstream, "tcp4", "192.168.77.2:8081", okTimeout, nil); got != "client" {
			t.Errorf("WAN to LAN through the gateway: got %q, want the client (not intercepted)", got)
		}

		if got, want := e.fetch(t, okTimeout), "tpgw "+e.upAddr; got != want {
			t.Errorf("diverted from the LAN: got %q, want %q", got, want)
		}
		if got := udpAsk(e.client, fmt.Sprintf("192.168.77.1:%d", o.DNSPort)); got != "ping" {
			t.Errorf("DNS port from the LAN: got %q, want the echo", got)
		}
		if got := fetchFrom(t, e.client, "tcp4", fmt.Sprintf("192.168.77.1:%d", o.TProxyPort), failTimeout, nil); !strings.Contains(got, "error") {
			t.Errorf("TCP from the LAN straight to the TPROXY port: got %q, want no connection", got)
		}
	})
}

// TestUpdate: Update swaps plan A for plan B; the kernel then holds exactly
// what a fresh Apply of B gives, B's bypass is in force, and a connection
// established through the transparent listener before Update keeps working.
func TestUpdate(t *testing.T) {
	forBackends(t, func(t *testing.T, backend string) {
		e := newGWEnv(t, addrs4)
		e.upstream.run(t, "ip", "addr", "add", "203.0.113.3/24", "dev", "eth0")
		a := DefaultOptions()
		a.Bypass = mustPrefixes("203.0.113.3/32")
		b := DefaultOptions()
		b.Bypass = mustPrefixes("203.0.113.4/32")
		b.ProxySelf, b.RoutingMark = true, 255 // a chain more
		before := e.gw.snapshot(t)
		stateDir := t.TempDir()
		inst, err := apply(t, e.gw, newBackend(t, e.gw, backend, ""), mustPlan(t, a), stateDir)
		if err != nil {
			t.Fatalf("Apply A: %v", err)
		}
		ln := transparentListen(t, e.gw, "tcp4", a.TProxyPort)
		testsrv.ServeEach(ln, func(c net.Conn) { // echo lines, prefixed with the original destination
			r := bufio.NewReader(c)
			for {
				line, err := r.ReadString('\n')
				if err != nil {
					return
				}
				fmt.Fprintf(c, "tpgw %s %s", c.LocalAddr(), line)
			}
		})
		bypassed := "203.0.113.3:8080"
		if got := fetchFrom(t, e.client, "tcp4", bypassed, okTimeout, nil); got != "upstream" {
			t.Fatalf("A bypasses %s: got %q", bypassed, got)
		}
		var conn net.Conn
		e.client.in(t, func() { conn, err = net.DialTimeout("tcp4", e.upAddr, okTimeout) })
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		r := bufio.NewReader(conn)
		say := func(msg string) string {
			conn.SetDeadline(time.Now().Add(okTimeout))
			fmt.Fprintf(conn, "%s\n", msg)
			line, err := r.ReadString('\n')
			if err != nil {
				return "error: " + err.Error()
			}
			return strings.TrimSpace(line)
		}
		if got, want := say("one"), "tpgw "+e.upAddr+" one"; got != want {
			t.Fatalf("established: got %q, want %q", got, want)
		}

		pb := mustPlan(t, b)
		e.gw.in(t, func() { err = inst.Update(pb) })
		if err != nil {
			t.Fatalf("Update: %v", err)
		}
		if got, want := say("two"), "tpgw "+e.upAddr+" two"; got != want {
			t.Errorf("established connection after Update: got %q, want %q", got, want)
		}
		var c2 net.Conn
		e.client.in(t, func() { c2, err = net.DialTimeout("tcp4", bypassed, okTimeout) })
		if err != nil {
			t.Fatal(err)
		}
		defer c2.Close()
		c2.SetDeadline(time.Now().Add(okTimeout))
		io.WriteString(c2, "three\n")
		if line, _ := bufio.NewReader(c2).ReadString('\n'); line != "tpgw "+bypassed+" three\n" {
			t.Errorf("B does not bypass %s: got %q", bypassed, line)
		}
		requireInstalled(t, e.gw, pb, backend)
		updated := e.gw.snapshot(t)

		// A fresh Apply of B in the same namespace gives the same state.
		fresh, err := apply(t, e.gw, newBackend(t, e.gw, backend, ""), pb, stateDir)
		if err != nil {
			t.Fatalf("Apply B: %v", err)
		}
		freshSnap, updatedSnap := rulesOnly(e.gw.snapshot(t)), rulesOnly(updated)
		if backend == "iptables" {
			// iptables-nft lists the renamed chains in another order in nft;
			// iptables-save, which orders them itself, is compared instead.
			delete(freshSnap, "nft list ruleset")
			delete(updatedSnap, "nft list ruleset")
		}
		requireSameState(t, freshSnap, updatedSnap)
		remove(t, e.gw, fresh)
		requireSameState(t, rulesOnly(before), rulesOnly(e.gw.snapshot(t)))
	})
}

// rulesOnly keeps the parts of a snapshot that netcfg writes; the v6 routes
// also hold link-local addresses that come up on their own while a test runs.
func rulesOnly(snap map[string]string) map[string]string {
	delete(snap, "ip -6 route")
	return snap
}
