package netcfg

import (
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
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
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			io.WriteString(c, reply(c))
			c.Close()
		}
	}()
}

// TestTProxyPath sends real TCP through a gateway namespace: with the plan
// applied but nothing listening, the connection goes straight to the upstream
// (tproxy falls through, on-failure: open); with a transparent listener on
// the TPROXY port, the listener gets it with the original destination as its
// local address; after Remove it goes straight again.
func TestTProxyPath(t *testing.T) {
	type addrs struct{ network, gwLAN, client, gwWAN, upstream, up, forward string }
	for name, a := range map[string]addrs{
		"ipv4": {"tcp4", "192.168.77.1/24", "192.168.77.2/24", "203.0.113.1/24", "203.0.113.2/24", "203.0.113.2", "net.ipv4.ip_forward"},
		"ipv6": {"tcp6", "2001:db8:77::1/64", "2001:db8:77::2/64", "2001:db8:113::1/64", "2001:db8:113::2/64", "2001:db8:113::2", "net.ipv6.conf.all.forwarding"},
	} {
		t.Run(name, func(t *testing.T) {
			o := DefaultOptions()
			o.Interfaces = []string{"lan0"}
			o.IPv6 = a.network == "tcp6"
			testTProxyPath(t, o, a.network, a.gwLAN, a.client, a.gwWAN, a.upstream, a.up, a.forward)
		})
	}
}

func testTProxyPath(t *testing.T, o Options, network, gwLAN, clientAddr, gwWAN, upstreamAddr, up, forward string) {
	client := newTestNS(t, true)
	gw := newTestNS(t, true)
	upstream := newTestNS(t, true)
	link(t, gw, "lan0", gwLAN, client, "eth0", clientAddr)
	link(t, gw, "wan0", gwWAN, upstream, "eth0", upstreamAddr)
	client.run(t, "ip", "route", "add", "default", "via", strings.Split(gwLAN, "/")[0])
	upstream.run(t, "ip", "route", "add", "default", "via", strings.Split(gwWAN, "/")[0])
	var err error
	// Forwarding on before tpgw, so it stays on after Remove restores the old value.
	gw.in(t, func() { err = writeSysctl(forward, "1") })
	if err != nil {
		t.Fatal(err)
	}
	upAddr := net.JoinHostPort(up, "8080")

	var upLn net.Listener
	upstream.in(t, func() { upLn, err = net.Listen(network, upAddr) })
	if err != nil {
		t.Fatal(err)
	}
	defer upLn.Close()
	serve(upLn, func(net.Conn) string { return "upstream" })

	fetch := func() string {
		t.Helper()
		var c net.Conn
		var err error
		client.in(t, func() { c, err = net.DialTimeout(network, upAddr, 3*time.Second) })
		if err != nil {
			return "dial error: " + err.Error()
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(3 * time.Second))
		b, err := io.ReadAll(c)
		if err != nil {
			return "read error: " + err.Error()
		}
		return string(b)
	}
	if got := fetch(); got != "upstream" {
		t.Fatalf("before Apply: got %q, want the upstream", got)
	}

	p := mustPlan(t, o)
	inst, err := apply(t, gw, NewNftables(testLogger(t)), p, t.TempDir())
	if err != nil {
		t.Fatalf("Apply: %v", err)
	}
	if got := fetch(); got != "upstream" {
		t.Fatalf("rules applied, nothing listening: got %q, want the upstream (tproxy must fall through)", got)
	}

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
	var tpLn net.Listener
	gw.in(t, func() { tpLn, err = lc.Listen(context.Background(), network, fmt.Sprintf(":%d", o.TProxyPort)) })
	if err != nil {
		t.Fatal(err)
	}
	serve(tpLn, func(c net.Conn) string { return "tpgw " + c.LocalAddr().String() })
	if got, want := fetch(), "tpgw "+upAddr; got != want {
		t.Errorf("with a transparent listener: got %q, want %q", got, want)
	}
	tpLn.Close()

	remove(t, gw, inst)
	if got := fetch(); got != "upstream" {
		t.Errorf("after Remove: got %q, want the upstream", got)
	}
}
