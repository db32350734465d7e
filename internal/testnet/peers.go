package testnet

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tpgw/tpgw/internal/testenv"
)

// PeerStartTimeout bounds how long a peer may take to become ready.
const PeerStartTimeout = 10 * time.Second

// StartHTTPServer serves HTTP in the upstream namespace on 0.0.0.0:port and
// [::]:port until the test ends:
//
//	GET  /          the remote IP the server sees, e.g. "203.0.113.1\n"
//	GET  /bytes?n=N N bytes of 'x'
//	GET  /hold?ms=M "held\n", after M milliseconds (a slow server)
//	POST /echo      the request body
func (tp *Topology) StartHTTPServer(t testing.TB, port int) {
	t.Helper()
	lns, err := listenDualStack(tp.Upstream, port)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: upstreamHandler(), ReadHeaderTimeout: 10 * time.Second}
	var wg sync.WaitGroup
	for _, ln := range lns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = srv.Serve(ln) // returns http.ErrServerClosed after Close
		}()
	}
	t.Cleanup(func() {
		_ = srv.Close()
		wg.Wait()
	})
}

func upstreamHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		ap, err := netip.ParseAddrPort(r.RemoteAddr)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "text/plain")
		fmt.Fprintln(w, ap.Addr().Unmap())
	})
	mux.HandleFunc("GET /bytes", func(w http.ResponseWriter, r *http.Request) {
		n, err := strconv.ParseInt(r.URL.Query().Get("n"), 10, 64)
		if err != nil || n < 0 {
			http.Error(w, "n must be a non-negative integer", http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
		chunk := []byte(strings.Repeat("x", 64<<10))
		for n > 0 {
			m := min(n, int64(len(chunk)))
			if _, err := w.Write(chunk[:m]); err != nil {
				return
			}
			n -= m
		}
	})
	mux.HandleFunc("GET /hold", func(w http.ResponseWriter, r *http.Request) {
		ms, err := strconv.Atoi(r.URL.Query().Get("ms"))
		if err != nil || ms < 0 || ms > 60_000 {
			http.Error(w, "ms must be an integer from 0 to 60000", http.StatusBadRequest)
			return
		}
		select {
		case <-time.After(time.Duration(ms) * time.Millisecond):
		case <-r.Context().Done():
			return
		}
		w.Header().Set("Content-Type", "text/plain")
		fmt.Fprintln(w, "held")
	})
	mux.HandleFunc("POST /echo", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/octet-stream")
		if r.ContentLength >= 0 {
			w.Header().Set("Content-Length", strconv.FormatInt(r.ContentLength, 10))
		}
		_, _ = io.Copy(w, r.Body)
	})
	return mux
}

// listenDualStack opens TCP listeners on 0.0.0.0:port and [::]:port (v6 only)
// inside ns. MPTCP is off so peers behave like the plain TCP servers they stand for.
func listenDualStack(ns *NS, port int) ([]net.Listener, error) {
	var lns []net.Listener
	err := ns.Do(func() error {
		var lc net.ListenConfig
		lc.SetMultipathTCP(false)
		for _, network := range []string{"tcp4", "tcp6"} {
			ln, err := lc.Listen(context.Background(), network, ":"+strconv.Itoa(port))
			if err != nil {
				return err
			}
			lns = append(lns, ln)
		}
		return nil
	})
	if err != nil {
		for _, ln := range lns {
			ln.Close()
		}
		return nil, fmt.Errorf("testnet: %s: listen tcp port %d: %w", ns.Name, port, err)
	}
	return lns, nil
}

// StartUDPEcho echoes UDP datagrams in the upstream namespace on 0.0.0.0:port
// and [::]:port until the test ends. Each reply leaves from the address the
// datagram was sent to (IP_PKTINFO), as a connected UDP client and tpgw's
// transparent UDP replies require, even though the upstream owns several addresses.
func (tp *Topology) StartUDPEcho(t testing.TB, port int) {
	t.Helper()
	var conns []*net.UDPConn
	err := tp.Upstream.Do(func() error {
		for _, network := range []string{"udp4", "udp6"} {
			pc, err := net.ListenPacket(network, ":"+strconv.Itoa(port))
			if err != nil {
				return err
			}
			conn := pc.(*net.UDPConn)
			conns = append(conns, conn)
			if err := enablePktinfo(conn, network == "udp6"); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		for _, c := range conns {
			c.Close()
		}
		t.Fatalf("testnet: %s: udp echo on port %d: %v", tp.Upstream.Name, port, err)
	}
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			echoUDP(c)
		}()
	}
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
		wg.Wait()
	})
}

func enablePktinfo(conn *net.UDPConn, v6 bool) error {
	raw, err := conn.SyscallConn()
	if err != nil {
		return err
	}
	var sockErr error
	err = raw.Control(func(fd uintptr) {
		if v6 {
			sockErr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_RECVPKTINFO, 1)
		} else {
			sockErr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_PKTINFO, 1)
		}
	})
	return errors.Join(err, sockErr)
}

// echoUDP runs until conn is closed.
func echoUDP(conn *net.UDPConn) {
	buf := make([]byte, 64<<10)
	oob := make([]byte, 256)
	for {
		n, oobn, _, from, err := conn.ReadMsgUDPAddrPort(buf, oob)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		_, _, _ = conn.WriteMsgUDPAddrPort(buf[:n], replySource(oob[:oobn]), from)
	}
}

// replySource turns the received packet's destination (from IP_PKTINFO or
// IPV6_PKTINFO) into the control message that makes the reply leave from it.
func replySource(oob []byte) []byte {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil
	}
	for _, m := range msgs {
		switch {
		case m.Header.Level == unix.IPPROTO_IP && m.Header.Type == unix.IP_PKTINFO && len(m.Data) >= unix.SizeofInet4Pktinfo:
			var info unix.Inet4Pktinfo
			copy(info.Addr[:], m.Data[8:12]) // struct in_pktinfo: ifindex, spec_dst, addr
			return unix.PktInfo4(&unix.Inet4Pktinfo{Spec_dst: info.Addr})
		case m.Header.Level == unix.IPPROTO_IPV6 && m.Header.Type == unix.IPV6_PKTINFO && len(m.Data) >= unix.SizeofInet6Pktinfo:
			var info unix.Inet6Pktinfo
			copy(info.Addr[:], m.Data[:16]) // struct in6_pktinfo: addr, ifindex
			return unix.PktInfo6(&unix.Inet6Pktinfo{Addr: info.Addr})
		}
	}
	return nil
}

// StartSSServer runs shadowsocks-libev's ss-server in the proxy namespace on
// 0.0.0.0:port and [::]:port with UDP relay (-u) and the upstream's dnsmasq as
// its resolver for domain-name requests, and waits until the TCP port accepts.
func (tp *Topology) StartSSServer(t testing.TB, port int, password, method string) *Proc {
	t.Helper()
	requireTool(t, "ss-server")
	p := tp.Proxy.Start(t, "ss-server",
		"-s", "0.0.0.0", "-s", "::",
		"-p", strconv.Itoa(port),
		"-k", password,
		"-m", method,
		"-u",
		"-d", tp.UpstreamIP.String(),
		"-t", "60",
		"-v",
	)
	tp.waitPeer(t, p, "ss-server", port, tp.ProxyIP, tp.ProxyIP6)
	return p
}

// StartDNSMasq runs dnsmasq in the upstream namespace on 203.0.113.2:53,
// answering only the given records (name -> IP; several IPs separated by
// commas, e.g. "203.0.113.2,2001:db8:1::2" for A and AAAA) and refusing the
// rest: no upstream servers, no /etc/hosts, no config file. It waits until
// dnsmasq answers.
func (tp *Topology) StartDNSMasq(t testing.TB, records map[string]string) *Proc {
	t.Helper()
	return tp.StartDNSMasqArgs(t, records)
}

// StartDNSMasqArgs is StartDNSMasq with extra dnsmasq options, e.g.
// "--txt-record=name,text" or "--dns-rr=name,65,HEX" for other record types.
func (tp *Topology) StartDNSMasqArgs(t testing.TB, records map[string]string, extra ...string) *Proc {
	t.Helper()
	return startDNSMasq(t, tp.Upstream, tp.UpstreamIP, records, extra...)
}

// StartGatewayDNSMasq runs dnsmasq on the gateway's LAN address, port 53,
// as on an OpenWrt router (the LAN's resolver is the gateway itself), with
// the given options (e.g. "--address=/router.lan/192.168.77.1"), and waits
// until it answers.
func (tp *Topology) StartGatewayDNSMasq(t testing.TB, extra ...string) *Proc {
	t.Helper()
	return startDNSMasq(t, tp.Gateway, tp.GatewayLAN, nil, extra...)
}

func startDNSMasq(t testing.TB, ns *NS, listen netip.Addr, records map[string]string, extra ...string) *Proc {
	t.Helper()
	requireTool(t, "dnsmasq")
	dir := t.TempDir()
	args := []string{
		"-k", // stay in the foreground so the PID is the server's
		"--conf-file=/dev/null",
		"--no-resolv",
		"--no-hosts",
		"--user=root",
		"--pid-file=" + filepath.Join(dir, "dnsmasq.pid"),
		"--dhcp-leasefile=" + filepath.Join(dir, "dnsmasq.leases"),
		"--port=53",
		"--listen-address=" + listen.String(),
		"--bind-interfaces",
		"--log-facility=-",
		"--log-queries",
	}
	names := make([]string, 0, len(records))
	for name := range records {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		for ip := range strings.SplitSeq(records[name], ",") {
			ip = strings.TrimSpace(ip)
			if _, err := netip.ParseAddr(ip); err != nil {
				t.Fatalf("testnet: dnsmasq record %s: %q is not an IP address", name, ip)
			}
			args = append(args, "--address=/"+name+"/"+ip)
		}
	}
	args = append(args, extra...)
	p := ns.Start(t, "dnsmasq", args...)
	server := netip.AddrPortFrom(listen, 53)
	deadline := time.Now().Add(PeerStartTimeout)
	for {
		err := probeDNS(ns, server)
		if err == nil {
			return p
		}
		if p.exited() || time.Now().After(deadline) {
			t.Fatalf("testnet: dnsmasq not answering on %s: %v\n%s", server, err, p.describe())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// probeDNS sends one query from inside ns and succeeds on any reply.
func probeDNS(ns *NS, server netip.AddrPort) error {
	var conn net.Conn
	err := ns.Do(func() error {
		var err error
		conn, err = net.Dial("udp", server.String())
		return err
	})
	if err != nil {
		return err
	}
	defer conn.Close()
	// Header: id, flags (RD), 1 question; question: "probe.invalid." A IN.
	query := []byte{0x74, 0x70, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0}
	for _, label := range []string{"probe", "invalid"} {
		query = append(query, byte(len(label)))
		query = append(query, label...)
	}
	query = append(query, 0, 0, 1, 0, 1)
	if err := conn.SetDeadline(time.Now().Add(500 * time.Millisecond)); err != nil {
		return err
	}
	if _, err := conn.Write(query); err != nil {
		return err
	}
	reply := make([]byte, 512)
	n, err := conn.Read(reply)
	if err != nil {
		return err
	}
	if n < 12 || binary.BigEndian.Uint16(reply) != binary.BigEndian.Uint16(query) {
		return fmt.Errorf("malformed DNS reply (%d bytes)", n)
	}
	return nil
}

// Curl runs curl in the client namespace (-sS --max-time 10 --noproxy '*')
// with extra arguments before the URL and returns the response body.
func (tp *Topology) Curl(t testing.TB, url string, extra ...string) (string, error) {
	t.Helper()
	requireTool(t, "curl")
	args := append([]string{"-sS", "--max-time", "10", "--noproxy", "*"}, extra...)
	args = append(args, url)
	return tp.Client.Run(t, 15*time.Second, "curl", args...)
}

// WaitTCP connects from inside ns to addr ("ip:port") until it accepts, for
// at most timeout.
func WaitTCP(ns *NS, addr string, timeout time.Duration) error {
	return waitTCPWhileRunning(ns, nil, addr, timeout)
}

// waitTCPWhileRunning is WaitTCP that also gives up as soon as p (if any) exits.
func waitTCPWhileRunning(ns *NS, p *Proc, addr string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		err := ns.Do(func() error {
			conn, err := net.DialTimeout("tcp", addr, 500*time.Millisecond)
			if err == nil {
				conn.Close()
			}
			return err
		})
		if err == nil {
			return nil
		}
		if p != nil {
			if p.exited() {
				return fmt.Errorf("process exited while waiting for %s: %w", addr, err)
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("testnet: %s: %s not accepting after %v: %w", ns.Name, addr, timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// requireTool skips (fails under CI) when a program is missing, also looking
// in the sbin directories a test's PATH may lack.
func requireTool(t testing.TB, name string) {
	t.Helper()
	if _, err := lookTool(name); err != nil {
		testenv.RequireTools(t, name)
	}
}
