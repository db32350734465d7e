package e2e

import (
	"crypto/rand"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/metacubex/bbolt"

	"github.com/tpgw/tpgw/bench"
	"github.com/tpgw/tpgw/internal/testenv"
	"github.com/tpgw/tpgw/internal/testnet"
)

var fakeRange = netip.MustParsePrefix("198.18.0.0/16")

// dnsConfig is a fake-ip DNS block whose real answers come from dnsmasq in
// the upstream namespace.
const dnsConfig = `dns:
  enable: true
  listen: 0.0.0.0:1053
  enhanced-mode: fake-ip
  fake-ip-range: 198.18.0.1/16
  fake-ip-filter:
    - "+.direct.test"
  nameserver:
    - 203.0.113.2
`

func requireDNSPeers(t testing.TB) {
	t.Helper()
	requirePeers(t)
	testenv.RequireTools(t, "dig", "dnsmasq")
}

// dig runs dig in the client namespace and returns the +short answer lines.
func dig(t testing.TB, tp *testnet.Topology, args ...string) ([]string, error) {
	t.Helper()
	full := append([]string{"+short", "+time=3", "+tries=1"}, args...)
	out, err := tp.Client.Run(t, 15*time.Second, "dig", full...)
	if err != nil {
		return nil, err
	}
	var lines []string
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		if l = strings.TrimSpace(l); l != "" {
			lines = append(lines, l)
		}
	}
	return lines, nil
}

func digOne(t testing.TB, tp *testnet.Topology, args ...string) netip.Addr {
	t.Helper()
	lines, err := dig(t, tp, args...)
	if err != nil || len(lines) == 0 {
		t.Fatalf("dig %v: %v %v", args, lines, err)
	}
	a, err := netip.ParseAddr(lines[len(lines)-1])
	if err != nil {
		t.Fatalf("dig %v: answer %q is not an address", args, lines)
	}
	return a
}

// TestFakeIPDNS: client DNS to any server is answered by tpgw with fake IPs,
// over UDP and TCP; fake-ip-filter names get the real answer from dnsmasq;
// other query types are not SERVFAIL.
func TestFakeIPDNS(t *testing.T) {
	requireDNSPeers(t)
	tp := testnet.New(t)
	tp.StartDNSMasqArgs(t, map[string]string{"web.test": "203.0.113.2", "host.direct.test": "203.0.113.3"},
		"--txt-record=web.test,hello", "--mx-host=web.test,mail.web.test,10",
		"--dns-rr=web.test,65,00010000010003026832") // HTTPS: priority 1, target ".", alpn h2
	p := startTPGW(t, tp, writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"}, dnsConfig)))
	defer stopTPGW(t, p, syscall.SIGTERM)

	// The router's own addresses too (their UDP replies leave from the raw
	// socket), over IPv4 and IPv6.
	for _, server := range []string{"@203.0.113.2", "@192.168.77.1", "@9.9.9.9", "@fd77::1"} {
		for _, proto := range []string{"+notcp", "+tcp"} {
			a := digOne(t, tp, server, proto, "web.test", "A")
			if !fakeRange.Contains(a) {
				t.Errorf("dig %s %s web.test = %s, want a fake IP in %s", server, proto, a, fakeRange)
			}
		}
	}
	// The same name keeps its fake IP; another name gets another.
	a1 := digOne(t, tp, "@203.0.113.2", "web.test")
	a2 := digOne(t, tp, "@203.0.113.2", "other.test")
	if a1 != digOne(t, tp, "@203.0.113.2", "+tcp", "web.test") || a1 == a2 {
		t.Errorf("fake IPs not stable/distinct: %s %s", a1, a2)
	}
	if a := digOne(t, tp, "@203.0.113.2", "host.direct.test"); a != netip.MustParseAddr("203.0.113.3") {
		t.Errorf("fake-ip-filter name: got %s, want the real 203.0.113.3 from dnsmasq", a)
	}
	// Other types are forwarded to the real resolver (dnsmasq) and answered.
	// HTTPS for a fake-ip name gets an empty NOERROR from mihomo on purpose:
	// its address hints would bypass the fake IP.
	for _, q := range []struct{ qtype, want string }{
		{"MX", "10 mail.web.test."}, {"TXT", `"hello"`}, {"HTTPS", "ANSWER: 0"},
	} {
		out, err := tp.Client.Run(t, 15*time.Second, "dig", "+time=3", "+tries=1", "@203.0.113.2", "web.test", q.qtype)
		if err != nil || !strings.Contains(out, "status: NOERROR") || !strings.Contains(out, q.want) {
			t.Errorf("dig web.test %s: want NOERROR with %s: %v\n%s", q.qtype, q.want, err, out)
		}
	}
}

// bigTXT is a dnsmasq option for a TXT record of 12 strings of 250
// characters: its answer (about 3 KB) needs more than one 1500-byte packet.
var bigTXT = "--txt-record=big.web.test" + strings.Repeat(","+strings.Repeat("x", 250), 12)

// TestLargeUDPAnswers: an answer larger than the link's MTU, to a client that
// allows it (EDNS0 4096), arrives over UDP whole (fragmented), also when the
// query went to the router's own address, whose replies leave from a raw
// socket that cannot fragment (they fall back to a socket bound for the one
// reply).
func TestLargeUDPAnswers(t *testing.T) {
	requireDNSPeers(t)
	tp := testnet.New(t)
	tp.StartDNSMasqArgs(t, map[string]string{"web.test": "203.0.113.2"}, bigTXT, "--edns-packet-max=4096")
	p := startTPGW(t, tp, writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"}, dnsConfig)))
	defer stopTPGW(t, p, syscall.SIGTERM)
	for _, server := range []string{"@203.0.113.2", "@192.168.77.1", "@fd77::1"} {
		out, err := tp.Client.Run(t, 15*time.Second, "dig", "+time=3", "+tries=1", "+notcp", "+ignore", "+bufsize=4096",
			server, "big.web.test", "TXT")
		if err != nil || !strings.Contains(out, "status: NOERROR") || strings.Contains(out, " tc") ||
			strings.Count(out, strings.Repeat("x", 250)) != 12 {
			t.Errorf("dig %s big.web.test TXT over UDP: want the 12 strings, not truncated: %v\n%s", server, err, out)
		}
	}
}

// TestDomainRules: a request by name goes through the proxy its
// DOMAIN-SUFFIX rule names (the fake IP maps back to the name); a request by
// IP literal falls to MATCH,DIRECT.
func TestDomainRules(t *testing.T) {
	requireDNSPeers(t)
	tp := testnet.New(t)
	tp.StartHTTPServer(t, httpPort)
	tp.StartDNSMasq(t, map[string]string{"web.test": "203.0.113.2"})
	tp.StartSSServer(t, ssPort, ssPassword, ssMethod)
	p := startTPGW(t, tp, writeConfig(t, baseConfig(t, []string{"DOMAIN-SUFFIX,test,ss", "MATCH,DIRECT"}, dnsConfig)))
	defer stopTPGW(t, p, syscall.SIGTERM)

	// The client's resolver is the gateway (192.168.77.1), hijacked to tpgw.
	wantSeen(t, tp, "http://web.test:8080/", "198.51.100.2", "by name: DOMAIN-SUFFIX,test → ss")
	wantSeen(t, tp, "http://203.0.113.2:8080/", "203.0.113.1", "by IP literal: MATCH,DIRECT")
	if !strings.Contains(p.Output(), "web.test:8080 match DomainSuffix(test) using ss") {
		t.Errorf("log does not show the domain rule decision:\n%s", p.Output())
	}
}

// TestUDPEcho: 50 datagrams through tpgw, DIRECT and via ss-server's UDP
// relay; at least 96% come back, each from the address the client sent to.
func TestUDPEcho(t *testing.T) {
	requirePeers(t)
	tp := testnet.New(t)
	tp.StartUDPEcho(t, 7000)
	tp.StartSSServer(t, ssPort, ssPassword, ssMethod)
	for _, tc := range []struct{ name, rule, dst string }{
		{"DIRECT", "MATCH,DIRECT", "203.0.113.2:7000"},
		{"DIRECT v6", "MATCH,DIRECT", "[2001:db8:1::2]:7000"},
		{"ss", "MATCH,ss", "203.0.113.2:7000"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := startTPGW(t, tp, writeConfig(t, baseConfig(t, []string{tc.rule}, "")))
			defer stopTPGW(t, p, syscall.SIGTERM)
			got := udpEcho(t, tp.Client, netip.MustParseAddrPort(tc.dst), 50)
			if got < 48 {
				t.Fatalf("%d of 50 datagrams came back from %s, want ≥ 48", got, tc.dst)
			}
			t.Logf("%s: %d/50 echoed from %s", tc.name, got, tc.dst)
		})
	}
}

// udpEcho sends n datagrams from one client socket and counts the echoes
// that come back intact from dst itself.
func udpEcho(t testing.TB, ns *testnet.NS, dst netip.AddrPort, n int) int {
	t.Helper()
	var c *net.UDPConn
	network := "udp4"
	if dst.Addr().Is6() {
		network = "udp6"
	}
	if err := ns.Do(func() (err error) { c, err = net.ListenUDP(network, nil); return err }); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got := map[string]bool{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 2048)
		for {
			c.SetReadDeadline(time.Now().Add(3 * time.Second))
			k, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
			if from != dst {
				t.Errorf("echo came from %s, want %s", from, dst)
				continue
			}
			got[string(buf[:k])] = true
			if len(got) == n {
				return
			}
		}
	}()
	for i := 0; i < n; i++ {
		if _, err := c.WriteToUDPAddrPort([]byte(fmt.Sprintf("datagram-%03d", i)), dst); err != nil {
			t.Errorf("send: %v", err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	<-done
	return len(got)
}

// TestIperfUDP: iperf3 UDP at a fixed rate through tpgw DIRECT. The rate is
// one a loaded machine keeps (no loss here with both cores taken by busy
// loops; at 200 Mbit/s that load cost 5–8% of the datagrams): loss at
// higher rates, side by side with kernel forwarding, is make bench's to
// measure (bench/), not a test's.
func TestIperfUDP(t *testing.T) {
	tp, p := startIperfDirect(t)
	defer stopTPGW(t, p, syscall.SIGTERM)
	// Loss at a fixed rate depends on CPU left over on the machine; a busy
	// neighbour can cost a run, so the best of three counts (all are logged).
	best := 100.0
	for attempt := 1; attempt <= 3 && best >= 2; attempt++ {
		out, err := tp.Client.Run(t, 60*time.Second, "iperf3", "-c", "203.0.113.2", "-p", "5201", "-u", "-b", "50M", "-t", "5", "-l", "1400", "-J")
		if err != nil {
			t.Fatalf("iperf3: %v\n%s", err, out)
		}
		var res struct {
			End struct {
				Sum struct {
					LostPercent float64 `json:"lost_percent"`
					Packets     int     `json:"packets"`
					BitsPerSec  float64 `json:"bits_per_second"`
				} `json:"sum"`
			} `json:"end"`
		}
		if err := json.Unmarshal([]byte(out), &res); err != nil {
			t.Fatalf("iperf3 JSON: %v\n%s", err, out)
		}
		s := res.End.Sum
		t.Logf("run %d: iperf3 UDP -b 50M through tpgw DIRECT: %.1f Mbit/s, %d packets, %.2f%% lost", attempt, s.BitsPerSec/1e6, s.Packets, s.LostPercent)
		if s.Packets > 0 {
			best = min(best, s.LostPercent)
		}
	}
	if best >= 2 {
		t.Fatalf("UDP loss %.2f%% at best of 3 runs, want < 2%%", best)
	}
}

// fakeIPViaSS builds a topology with ss-server and dnsmasq (names resolve to
// the upstream) and a config whose *.test names get fake IPs and go via ss.
func fakeIPViaSS(t *testing.T, extra string, names ...string) (*testnet.Topology, string) {
	t.Helper()
	requireDNSPeers(t)
	tp := testnet.New(t)
	tp.StartHTTPServer(t, httpPort)
	records := map[string]string{}
	for _, n := range names {
		records[n] = "203.0.113.2"
	}
	tp.StartDNSMasq(t, records)
	tp.StartSSServer(t, ssPort, ssPassword, ssMethod)
	return tp, writeConfig(t, baseConfig(t, []string{"DOMAIN-SUFFIX,test,ss", "MATCH,DIRECT"}, dnsConfig+extra))
}

// handedOut records the fake IP each name got, and fails the test when a
// name gets an address handed to another name before or its own changes.
type handedOut struct {
	t   *testing.T
	tp  *testnet.Topology
	ips map[string]netip.Addr
}

func newHandedOut(t *testing.T, tp *testnet.Topology) *handedOut {
	return &handedOut{t: t, tp: tp, ips: map[string]netip.Addr{}}
}

func (h *handedOut) ask(name string) {
	h.t.Helper()
	ip := digOne(h.t, h.tp, name)
	if !fakeRange.Contains(ip) {
		h.t.Fatalf("%s = %s, not a fake IP", name, ip)
	}
	for other, o := range h.ips {
		if other != name && o == ip {
			h.t.Fatalf("%s got %s, which was handed to %s before", name, ip, other)
		}
	}
	if before, ok := h.ips[name]; ok && before != ip {
		h.t.Fatalf("%s = %s now, %s before", name, ip, before)
	}
	h.ips[name] = ip
}

// TestFakeIPSurvivesRestart: a fake IP handed out before a restart still maps
// to the same name after it.
func TestFakeIPSurvivesRestart(t *testing.T) {
	tp, cfg := fakeIPViaSS(t, "", "web.test", "second.test")

	p := startTPGW(t, tp, cfg)
	fake := digOne(t, tp, "web.test")
	if !fakeRange.Contains(fake) {
		t.Fatalf("web.test = %s, not a fake IP", fake)
	}
	stopTPGW(t, p, syscall.SIGTERM)

	p = startTPGW(t, tp, cfg)
	// A client that cached the answer connects to the fake IP directly.
	wantSeen(t, tp, "http://"+fake.String()+":8080/", "198.51.100.2", "cached fake IP still means web.test → ss")
	if again := digOne(t, tp, "web.test"); again != fake {
		t.Errorf("after restart web.test = %s, before %s", again, fake)
	}

	// The same after a crash: mappings are written as they are handed out.
	fake2 := digOne(t, tp, "second.test")
	p.Kill()
	p.Wait(10 * time.Second)
	p = startTPGW(t, tp, cfg)
	defer stopTPGW(t, p, syscall.SIGTERM)
	wantSeen(t, tp, "http://"+fake2.String()+":8080/", "198.51.100.2", "fake IP from before kill -9 still means second.test → ss")
}

// TestFakeIPNeverHandedTwice: a fake IP keeps meaning its name across a kill
// -9 and a reload, and a name first asked after either gets an address of its
// own. The first run is killed before any clean stop, so the pool's position
// was never saved by a shutdown.
func TestFakeIPNeverHandedTwice(t *testing.T) {
	tp, cfg := fakeIPViaSS(t, "", "one.test", "two.test")

	h := newHandedOut(t, tp)
	ask, handed := h.ask, h.ips
	p := startTPGW(t, tp, cfg)
	ask("one.test")
	p.Kill()
	if exited, _ := p.Wait(10 * time.Second); !exited {
		t.Fatal("tpgw survived SIGKILL")
	}

	p = startTPGW(t, tp, cfg)
	defer func() { stopTPGW(t, p, syscall.SIGTERM) }()
	wantSeen(t, tp, "http://"+handed["one.test"].String()+":8080/", "198.51.100.2", "fake IP from before kill -9 still means one.test → ss")
	ask("two.test")
	ask("three.test")
	ask("one.test")
	p.Kill()
	if exited, _ := p.Wait(10 * time.Second); !exited {
		t.Fatal("tpgw survived SIGKILL")
	}

	p = startTPGW(t, tp, cfg)
	ask("four.test")
	ask("two.test")
	ask("three.test")
	if err := p.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if err := waitLog(p, "msg=reloaded", 10*time.Second, 20*time.Millisecond); err != nil {
		t.Fatalf("reload: %v\n%s", err, p.Output())
	}
	ask("five.test")
	for _, name := range []string{"one.test", "two.test", "three.test", "four.test"} {
		ask(name)
	}
	wantSeen(t, tp, "http://"+handed["two.test"].String()+":8080/", "198.51.100.2", "fake IP from before the reload still means two.test → ss")
}

// TestFakeIPFlush: a dashboard's "flush fake-ip" (POST
// /cache/fakeip/flush) empties cache.db's mappings too, not only the pool
// tpgw keeps in memory: a mapping from before the flush does not come back
// with a restart, one from after it does.
func TestFakeIPFlush(t *testing.T) {
	tp, cfg := fakeIPViaSS(t, "external-controller: 127.0.0.1:9090\n", "gone1.test", "gone2.test", "kept.test")
	p := startTPGW(t, tp, cfg)
	digOne(t, tp, "gone1.test")
	gone2 := digOne(t, tp, "gone2.test")
	wantCtl(t, tp, "POST", "/cache/fakeip/flush", "", 204, "")
	kept := digOne(t, tp, "kept.test")
	stopTPGW(t, p, syscall.SIGTERM)

	// A clean stop folds the journal of new mappings into cache.db and
	// removes it.
	if _, err := os.Stat(filepath.Join(filepath.Dir(cfg), "cache.db.tpgw-journal")); !os.IsNotExist(err) {
		t.Errorf("the fake-ip journal after a clean stop: %v; want it removed", err)
	}
	db, err := bbolt.Open(filepath.Join(filepath.Dir(cfg), "cache.db"), 0o600, &bbolt.Options{Timeout: 5 * time.Second, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	err = db.View(func(tx *bbolt.Tx) error {
		bk := tx.Bucket([]byte("fakeip"))
		if bk == nil {
			t.Fatal("cache.db has no fakeip bucket")
		}
		for _, name := range []string{"gone1.test", "gone2.test"} {
			if v := bk.Get([]byte(name)); v != nil {
				t.Errorf("cache.db maps %s to %v after the flush", name, v)
			}
		}
		if v := bk.Get(gone2.AsSlice()); v != nil {
			t.Errorf("cache.db maps %v to %q after the flush", gone2, v)
		}
		if v := bk.Get([]byte("kept.test")); !slices.Equal(v, kept.AsSlice()) {
			t.Errorf("cache.db maps kept.test to %v, want %v", v, kept)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestFakeIPReloadWithoutStore: with store-fake-ip off (the OpenWrt
// package's default, which spares the flash), a reload keeps the mappings
// (mihomo copies them to the new pool) and the new pool goes on after the
// last address handed out instead of from the start of the range.
func TestFakeIPReloadWithoutStore(t *testing.T) {
	tp, cfg := fakeIPViaSS(t, "profile:\n  store-fake-ip: false\n", "one.test", "two.test")
	p := startTPGW(t, tp, cfg)
	defer func() { stopTPGW(t, p, syscall.SIGTERM) }()
	h := newHandedOut(t, tp)
	h.ask("one.test")
	h.ask("two.test")
	for i := range 2 {
		if err := p.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		if waitFor(t, 10*time.Second, func() (string, bool) {
			return "reloaded", strings.Count(p.Output(), "msg=reloaded") > i
		}) == "" {
			t.Fatalf("reload %d not in the log:\n%s", i+1, p.Output())
		}
		h.ask(fmt.Sprintf("new%d.test", len(h.ips)))
		for _, name := range []string{"one.test", "two.test"} {
			h.ask(name)
		}
	}
	wantSeen(t, tp, "http://"+h.ips["one.test"].String()+":8080/", "198.51.100.2", "fake IP from before the reloads still means one.test → ss")
}

// TestFakeIPRestartWithoutStore: with store-fake-ip off the mappings die
// with the process, but the next run does not hand the addresses of the last
// one out again (to names a client may have cached them for): neither after
// a clean stop nor after kill -9 (tpgw keeps the pool's position in its state
// directory).
func TestFakeIPRestartWithoutStore(t *testing.T) {
	tp, cfg := fakeIPViaSS(t, "profile:\n  store-fake-ip: false\n")
	h := newHandedOut(t, tp)
	p := startTPGW(t, tp, cfg)
	h.ask("a.test")
	h.ask("b.test")
	stopTPGW(t, p, syscall.SIGTERM)

	p = startTPGW(t, tp, cfg)
	h.ask("c.test")
	p.Kill()
	if exited, _ := p.Wait(10 * time.Second); !exited {
		t.Fatal("tpgw survived SIGKILL")
	}

	p = startTPGW(t, tp, cfg)
	defer func() { stopTPGW(t, p, syscall.SIGTERM) }()
	if err := waitLog(p, "position recovered after an unclean stop", 5*time.Second, 20*time.Millisecond); err != nil {
		t.Fatalf("after kill -9: %v\n%s", err, p.Output())
	}
	h.ask("d.test")
}

// TestDNSGarbage: 10,000 random and malformed datagrams to the hijacked DNS
// port, then a valid query is still answered.
func TestDNSGarbage(t *testing.T) {
	requireDNSPeers(t)
	tp := testnet.New(t)
	tp.StartDNSMasq(t, map[string]string{"web.test": "203.0.113.2"})
	p := startTPGW(t, tp, writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"}, dnsConfig)))
	defer stopTPGW(t, p, syscall.SIGTERM)

	var c *net.UDPConn
	if err := tp.Client.Do(func() (err error) { c, err = net.ListenUDP("udp4", nil); return err }); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	dst := netip.MustParseAddrPort("203.0.113.2:53")
	valid := []byte{0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3, 'w', 'e', 'b', 4, 't', 'e', 's', 't', 0, 0, 1, 0, 1}
	buf := make([]byte, 600)
	for i := 0; i < 10000; i++ {
		var pkt []byte
		switch i % 4 {
		case 0: // random bytes of random length
			rand.Read(buf)
			pkt = buf[:int(buf[0])+int(buf[1])%200]
		case 1: // truncated valid query
			pkt = valid[:i%len(valid)]
		case 2: // bit-flipped valid query
			pkt = append([]byte(nil), valid...)
			pkt[i%len(pkt)] ^= byte(1 << (i % 8))
		default: // header claiming many records, no body
			pkt = []byte{0, 1, 1, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
		}
		c.WriteToUDPAddrPort(pkt, dst)
	}
	start := time.Now()
	ans := waitFor(t, 20*time.Second, func() (string, bool) {
		lines, err := dig(t, tp, "@203.0.113.2", "web.test")
		if err != nil || len(lines) == 0 {
			return "", false
		}
		a, err := netip.ParseAddr(lines[0])
		return lines[0], err == nil && fakeRange.Contains(a)
	})
	t.Logf("valid query answered %v after the garbage", time.Since(start).Round(time.Millisecond))
	if ans == "" {
		t.Fatalf("after garbage: no fake-ip answer for web.test")
	}
	if exited, _ := p.Wait(0); exited {
		t.Fatalf("tpgw died:\n%s", p.Output())
	}
}

// TestDNSListenOneAddress: dns.listen on one address (127.0.0.1:1053, as in
// configs where dnsmasq forwards to mihomo) used to leave the hijack with no
// socket to hand queries to: LAN clients got real answers from their own
// server and no domain rule matched. The hijack now hands IPv4 queries to
// that address; IPv6 queries, with no socket of their family, are not
// hijacked but still answered (relayed to the server asked), and tpgw check
// and the start say so.
func TestDNSListenOneAddress(t *testing.T) {
	requireDNSPeers(t)
	for _, backend := range bothBackends {
		t.Run(backend, func(t *testing.T) {
			requireBackend(t, backend)
			tp := testnet.New(t)
			tp.StartDNSMasqArgs(t, map[string]string{"web.test": "203.0.113.2"}, "--listen-address="+tp.UpstreamIP6.String())
			cfg := writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"},
				strings.Replace(dnsConfig, "0.0.0.0:1053", "127.0.0.1:1053", 1)+tpgwSection(t, backend)))
			warning := `dns.listen is one address: the LAN's DNS queries over IPv6 are not hijacked`
			if code, _, stderr := tpgwCmd(t, tp.Gateway, "check", "-c", cfg); code != 0 || !strings.Contains(stderr, warning) {
				t.Errorf("tpgw check: exit %d, want 0 and a warning %q:\n%s", code, warning, stderr)
			}
			p := runTPGW(t, tp, cfg)
			if !strings.Contains(p.Output(), warning) {
				t.Errorf("run: no warning %q:\n%s", warning, p.Output())
			}
			for _, server := range []string{"@203.0.113.2", "@192.168.77.1"} {
				if a := digOne(t, tp, server, "web.test"); !fakeRange.Contains(a) {
					t.Errorf("dig %s web.test = %s, want a fake IP in %s", server, a, fakeRange)
				}
			}
			if a := digOne(t, tp, "@2001:db8:1::2", "web.test"); a != netip.MustParseAddr("203.0.113.2") {
				t.Errorf("dig over IPv6 = %s, want dnsmasq's real answer 203.0.113.2 (not hijacked, relayed)", a)
			}
			stopTPGW(t, p, syscall.SIGTERM)
		})
	}
}

// TestPingFakeIP: a client pings a name (a fake IP, since the name resolves
// through tpgw) and gets replies from that fake IP, answered by the gateway,
// with both backends. Before, the request was forwarded to the WAN with the
// fake IP as destination and lost there. A ping to a real address still
// reaches that address. Nothing of it is left after tpgw exits.
func TestPingFakeIP(t *testing.T) {
	requireDNSPeers(t)
	testenv.RequireTools(t, "ping")
	for _, backend := range bothBackends {
		t.Run(backend, func(t *testing.T) {
			requireBackend(t, backend)
			tp := testnet.New(t)
			tp.StartDNSMasq(t, map[string]string{"web.test": "203.0.113.2"})
			// Counts what reaches the upstream (the WAN side) addressed to the fake range.
			tp.Upstream.MustRun(t, "nft", "add table ip leak; add chain ip leak pre { type filter hook prerouting priority 0; }; add rule ip leak pre ip daddr 198.18.0.0/15 counter")
			before := testnet.Snapshot(t, tp.Gateway)
			p := startTPGW(t, tp, writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"}, dnsConfig+tpgwSection(t, backend))))

			fake := digOne(t, tp, "@192.168.77.1", "web.test")
			if !fakeRange.Contains(fake) {
				t.Fatalf("web.test = %s, want a fake IP", fake)
			}
			for _, dst := range []string{fake.String(), "web.test", "203.0.113.2"} {
				out, err := tp.Client.Run(t, 15*time.Second, "ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", dst)
				if err != nil || !strings.Contains(out, "3 received") || strings.Contains(out, "DUP!") {
					t.Errorf("ping %s: want 3 replies, no duplicates: %v\n%s", dst, err, out)
				}
				want := fake.String()
				if dst == "203.0.113.2" {
					want = dst
				}
				if !strings.Contains(out, "from "+want+":") {
					t.Errorf("ping %s: replies do not come from %s:\n%s", dst, want, out)
				}
			}
			if out := tp.Upstream.MustRun(t, "nft", "list chain ip leak pre"); !strings.Contains(out, "packets 0 ") {
				t.Errorf("pings to the fake IP reached the WAN side:\n%s", out)
			}
			stopTPGW(t, p, syscall.SIGTERM)
			sameKernelState(t, tp, before, "after SIGTERM")
		})
	}
}

// TestLocalNames: names only the LAN knows are not faked. A hijacked query
// for one (the router's "router.lan", a single-label name, a reverse lookup
// of a LAN address) is passed to the server the client asked, here dnsmasq
// on the gateway (OpenWrt's setup), over UDP and TCP, and a connection by
// such a name works; before, it got a fake IP that mihomo could not
// resolve. A name in mihomo's hosts stays mihomo's, other names get fake
// IPs as before, and a local name asked of another server gets that
// server's answer.
func TestLocalNames(t *testing.T) {
	requireDNSPeers(t)
	tp := testnet.New(t)
	tp.StartHTTPServer(t, httpPort)
	tp.StartDNSMasq(t, map[string]string{"web.test": "203.0.113.2"})
	tp.StartGatewayDNSMasq(t, "--local=/lan/", "--address=/router.lan/192.168.77.1", "--address=/nas.lan/203.0.113.2",
		"--address=/nas/203.0.113.2", "--ptr-record=2.77.168.192.in-addr.arpa,laptop.lan", "--server=203.0.113.2")
	cfg := baseConfig(t, []string{"MATCH,DIRECT"}, dnsConfig+"hosts:\n  printer.lan: 192.168.77.9\n")
	p := startTPGW(t, tp, writeConfig(t, cfg))
	defer stopTPGW(t, p, syscall.SIGTERM)

	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"@192.168.77.1", "router.lan"}, "192.168.77.1"},
		{[]string{"@192.168.77.1", "+tcp", "router.lan"}, "192.168.77.1"},
		{[]string{"@192.168.77.1", "nas"}, "203.0.113.2"},
		{[]string{"@192.168.77.1", "-x", "192.168.77.2"}, "laptop.lan."},
		{[]string{"@192.168.77.1", "printer.lan"}, "192.168.77.9"}, // mihomo's hosts
	} {
		lines, err := dig(t, tp, c.args...)
		if err != nil || len(lines) == 0 || lines[len(lines)-1] != c.want {
			t.Errorf("dig %v = %q, %v; want %s", c.args, lines, err, c.want)
		}
	}
	if a := digOne(t, tp, "@192.168.77.1", "web.test"); !fakeRange.Contains(a) {
		t.Errorf("dig web.test = %s, want a fake IP", a)
	}
	// dnsmasq in the upstream does not know router.lan: its answer, not a fake IP.
	out, err := tp.Client.Run(t, 15*time.Second, "dig", "+time=3", "+tries=1", "@203.0.113.2", "router.lan")
	if err != nil || strings.Contains(out, "198.18.") || !strings.Contains(out, "ANSWER: 0") {
		t.Errorf("dig @203.0.113.2 router.lan: want the upstream's empty answer, no fake IP: %v\n%s", err, out)
	}
	// By name, through tpgw: the real address, relayed DIRECT.
	wantSeen(t, tp, "http://nas.lan:8080/", "203.0.113.1", "a local name, DIRECT through tpgw")
}

// TestLocalNamesUnderLoad: many clients' queries for local names to the
// router's own address at once. Each goes to dnsmasq there while the replies
// to the others leave from that same address and port 53. Those replies used
// to leave from a socket bound to 192.168.77.1:53 for each send; one bound
// while a forward was on its way to dnsmasq took that datagram and closed
// unread, and 3 s later the client got SERVFAIL (about one answer in ten
// here, at 96 queries per second). Now no socket is bound there, and every
// query gets dnsmasq's own answer.
func TestLocalNamesUnderLoad(t *testing.T) {
	requireDNSPeers(t)
	testenv.RequireTools(t, "dnsperf")
	tp := testnet.New(t)
	tp.StartDNSMasq(t, map[string]string{"web.test": "203.0.113.2"})
	tp.StartGatewayDNSMasq(t, "--local=/lan/", "--address=/router.lan/192.168.77.1", "--address=/nas.lan/203.0.113.2")
	p := startTPGW(t, tp, writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"}, dnsConfig)))
	defer stopTPGW(t, p, syscall.SIGTERM)

	queries := filepath.Join(t.TempDir(), "queries.txt")
	if err := os.WriteFile(queries, []byte("nas.lan A\nnas.lan AAAA\nrouter.lan A\nrouter.lan AAAA\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := tp.Client.Run(t, 30*time.Second, "dnsperf", "-s", tp.GatewayLAN.String(), "-d", queries,
		"-l", "3", "-c", "8", "-q", "32", "-t", "4")
	res, perr := bench.ParseDNSPerf(out)
	if err != nil || perr != nil {
		t.Fatalf("dnsperf: %v, %v\n%s", err, perr, out)
	}
	// dnsmasq answers the A queries, and NXDOMAIN for AAAA under --local.
	codes := ""
	for _, l := range strings.Split(out, "\n") {
		if c, ok := strings.CutPrefix(strings.TrimSpace(l), "Response codes:"); ok {
			codes = c
		}
	}
	if res.Lost > 0 || res.Completed == 0 || strings.Contains(codes, "SERVFAIL") || !strings.Contains(codes, "NOERROR") {
		t.Fatalf("local names under load: %d answered, %d lost, response codes %q; want every query answered by dnsmasq, no SERVFAIL\n%s",
			res.Completed, res.Lost, codes, out)
	}
	t.Logf("%d queries for local names answered at %.0f/s, response codes %s", res.Completed, res.QPS, strings.TrimSpace(codes))
}

// TestUDPDropsLogged: datagrams to a fake IP that no name maps reach tpgw
// (the fake-ip range is diverted) and mihomo drops them, since it cannot
// tell where they go; tpgw says how many when it stops (and every 30 s
// while it runs), and the reason.
func TestUDPDropsLogged(t *testing.T) {
	tp := testnet.New(t)
	p := startTPGW(t, tp, writeConfig(t, baseConfig(t, []string{"MATCH,DIRECT"}, dnsConfig)))
	const sent = 20
	dst := netip.MustParseAddrPort("198.18.255.250:7000")
	if err := tp.Client.Do(func() error {
		c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(dst))
		if err != nil {
			return err
		}
		defer c.Close()
		for i := range sent {
			if _, err := fmt.Fprintf(c, "lost-%02d", i); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second) // mihomo drops each as it arrives
	stopTPGW(t, p, syscall.SIGTERM)
	out := p.Output()
	want := fmt.Sprintf(`msg="UDP datagrams dropped in the gateway since the last report" dropped=%d queue_full=0 unsent=%d total=%d`, sent, sent, sent)
	if !strings.Contains(out, want) {
		t.Fatalf("tpgw's log does not say %s:\n%s", want, out)
	}
}
