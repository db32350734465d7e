package bench

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestMedian(t *testing.T) {
	nan := math.NaN()
	for _, tc := range []struct {
		in   []float64
		want float64
	}{
		{[]float64{3, 1, 2}, 2},
		{[]float64{4, 1, 3, 2}, 2.5},
		{[]float64{5}, 5},
		{[]float64{nan, 7, nan}, 7},
	} {
		if got := Median(tc.in); got != tc.want {
			t.Errorf("Median(%v) = %v, want %v", tc.in, got, tc.want)
		}
	}
	if got := Median(nil); !math.IsNaN(got) {
		t.Errorf("Median(nil) = %v, want NaN", got)
	}
	if got := Median([]float64{nan}); !math.IsNaN(got) {
		t.Errorf("Median(NaN) = %v, want NaN", got)
	}
}

func TestCPUPerGB(t *testing.T) {
	if got := CPUPerGB(1.5, 3e9); got != 0.5 {
		t.Errorf("CPUPerGB(1.5 s, 3 GB) = %v, want 0.5", got)
	}
	if got := CPUPerGB(1, 0); !math.IsNaN(got) {
		t.Errorf("CPUPerGB with no bytes = %v, want NaN", got)
	}
}

func TestParseStatCPU(t *testing.T) {
	// A command name with a space and a ')' must not shift the fields.
	stat := "1234 (tp gw) x) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 125 0 0 20 0 9 0 100 0 0"
	ut, st, err := parseStatCPU(stat)
	if err != nil || ut != 250 || st != 125 {
		t.Fatalf("parseStatCPU = %d, %d, %v; want 250, 125", ut, st, err)
	}
	if _, _, err := parseStatCPU("1234 (short) S 1"); err == nil {
		t.Fatal("short stat line: want an error")
	}
}

func TestParseHostCPU(t *testing.T) {
	// user nice system idle iowait irq softirq steal guest guest_nice
	stat := "cpu  100 5 40 9000 30 2 8 700 0 0\ncpu0 50 0 20 4500 15 1 4 350 0 0\nintr 1 2 3\n"
	busy, steal, err := parseHostCPU(stat)
	if err != nil || busy != 155 || steal != 700 {
		t.Fatalf("parseHostCPU = %d, %d, %v; want 155 (idle, iowait and steal left out), 700", busy, steal, err)
	}
	// A kernel that does not count steal has 7 fields.
	if busy, steal, err := parseHostCPU("cpu  100 5 40 9000 30 2 8\n"); err != nil || busy != 155 || steal != 0 {
		t.Errorf("parseHostCPU without steal = %d, %d, %v; want 155, 0", busy, steal, err)
	}
	for _, bad := range []string{"cpu0 1 2 3 4 5 6 7\n", "cpu  1 2 3\n", "cpu  1 x 3 4 5 6 7\n", "cpu  1 2 3 4 5 6 7 x\n"} {
		if _, _, err := parseHostCPU(bad); err == nil {
			t.Errorf("parseHostCPU(%q): want an error", bad)
		}
	}
	if busy, steal, err := HostCPUSeconds(); err != nil || busy <= 0 || steal < 0 {
		t.Errorf("HostCPUSeconds() = %v, %v, %v; want a positive busy time", busy, steal, err)
	}
}

func TestStealShare(t *testing.T) {
	if got := stealShare(2, 10, 2); got != 10 {
		t.Errorf("stealShare(2 s of 10 s on 2 cores) = %v, want 10 (%%)", got)
	}
	for _, c := range []struct{ steal, wall float64 }{{1, 0}, {math.NaN(), 10}} {
		if got := stealShare(c.steal, c.wall, 2); !math.IsNaN(got) {
			t.Errorf("stealShare(%v, %v, 2) = %v, want NaN", c.steal, c.wall, got)
		}
	}
}

func TestParseVmRSS(t *testing.T) {
	got, err := parseVmRSS(strings.NewReader("Name:\ttpgw\nVmPeak:\t  1 kB\nVmRSS:\t   54336 kB\nThreads: 9\n"))
	if err != nil || got != 54336 {
		t.Fatalf("parseVmRSS = %d, %v; want 54336", got, err)
	}
}

func TestParseIperf(t *testing.T) {
	tcp := `{"intervals":[{"sum":{"bytes":100,"omitted":true}},{"sum":{"bytes":1000}},{"sum":{"bytes":1000}}],
		"end":{"sum_received":{"bits_per_second":8000,"bytes":2000}}}`
	r, err := ParseIperf([]byte(tcp), false)
	if err != nil || r.BitsPerSec != 8000 || r.Bytes != 2100 {
		t.Fatalf("TCP: %+v, %v; want 8000 bit/s and 2100 bytes (omitted included)", r, err)
	}
	udp := `{"intervals":[{"sum":{"bytes":5000}}],"end":{"sum":{"bits_per_second":1e8,"bytes":5000,"lost_percent":2.5,"packets":400}}}`
	r, err = ParseIperf([]byte(udp), true)
	if err != nil || r.LostPercent != 2.5 || r.Packets != 400 || r.BitsPerSec != 1e8*0.975 {
		t.Fatalf("UDP: %+v, %v", r, err)
	}
	if _, err := ParseIperf([]byte(`{"error":"unable to connect to server"}`), false); err == nil || !strings.Contains(err.Error(), "unable to connect") {
		t.Fatalf("iperf3 error: got %v", err)
	}
}

const wrkOutput = `Running 3s test @ http://203.0.113.2:8080/
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   102.31us   40.00us   2.10ms   95.00%
  Latency Distribution
     50%   90.00us
     75%  110.00us
     90%  130.00us
     99%    1.20ms
  29000 requests in 3.00s, 3.40MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 2
Requests/sec:   9666.67
Transfer/sec:      1.13MB
`

func TestParseWrk(t *testing.T) {
	r, err := ParseWrk(wrkOutput)
	if err != nil {
		t.Fatal(err)
	}
	want := WrkResult{RequestsPerSec: 9666.67, P50: 90 * time.Microsecond, P99: 1200 * time.Microsecond, Errors: 6}
	if r != want {
		t.Fatalf("ParseWrk = %+v, want %+v", r, want)
	}
	if _, err := ParseWrk("unable to connect to 203.0.113.2:8080 Connection refused"); err == nil {
		t.Fatal("no Requests/sec: want an error")
	}
}

func TestParseDNSPerf(t *testing.T) {
	out := "Statistics:\n\n  Queries sent:         3893\n  Queries completed:    3881 (99.69%)\n  Queries lost:         12 (0.31%)\n\n  Queries per second:   1297.557672\n"
	r, err := ParseDNSPerf(out)
	if err != nil || r.QPS != 1297.557672 || r.LostPercent != 0.31 || r.Completed != 3881 || r.Lost != 12 {
		t.Fatalf("ParseDNSPerf = %+v, %v", r, err)
	}
	// The response codes, as dnsperf 2.11 prints them.
	for line, want := range map[string]int64{
		"  Response codes:       NOERROR 3881 (100.00%)\n":                 3881,
		"  Response codes:       NOERROR 2 (50.00%), REFUSED 2 (50.00%)\n": 2,
		"  Response codes:       REFUSED 2 (50.00%), NOERROR 7 (50.00%)\n": 7,
		"  Response codes:       REFUSED 3881 (100.00%)\n":                 0,
	} {
		r, err := ParseDNSPerf(out + line)
		if err != nil || r.NoError != want {
			t.Errorf("ParseDNSPerf(%q).NoError = %d, %v; want %d", line, r.NoError, err, want)
		}
	}
}

func TestParseUDPRcvbufErrors(t *testing.T) {
	snmp := "Ip: Forwarding DefaultTTL\nIp: 1 64\n" +
		"Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors\n" +
		"Udp: 140000 0 912 140001 907 0 5 0 0\n" +
		"UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors\n" +
		"UdpLite: 0 0 0 0 99 0 0 0 0\n"
	snmp6 := "Udp6InDatagrams                 \t12\nUdp6RcvbufErrors                \t3\nUdpLite6RcvbufErrors            \t77\n"
	for _, c := range []struct {
		in   string
		want int64
	}{{snmp, 907}, {snmp + snmp6, 910}} {
		if got, err := ParseUDPRcvbufErrors(c.in); err != nil || got != c.want {
			t.Errorf("ParseUDPRcvbufErrors = %d, %v; want %d", got, err, c.want)
		}
	}
	for _, bad := range []string{
		"",    // no Udp counters
		snmp6, // IPv6 only: not /proc/net/snmp
		"Udp: InDatagrams RcvbufErrors\nUdp: 1\n",   // a value short
		"Udp: InDatagrams RcvbufErrors\nUdp: 1 x\n", // not a number
		"Udp: InDatagrams SndbufErrors\nUdp: 1 2\n", // no RcvbufErrors
	} {
		if got, err := ParseUDPRcvbufErrors(bad); err == nil {
			t.Errorf("ParseUDPRcvbufErrors(%q) = %d, want an error", bad, got)
		}
	}
	// The host's own files parse.
	var host strings.Builder
	for _, f := range []string{"/proc/net/snmp", "/proc/net/snmp6"} {
		if b, err := os.ReadFile(f); err == nil {
			host.Write(b)
		}
	}
	if _, err := ParseUDPRcvbufErrors(host.String()); err != nil {
		t.Errorf("this host's counters: %v", err)
	}
}

func TestParseUDPDropsLog(t *testing.T) {
	const start = "time=2026-12-02T14:00:00Z level=INFO msg=\"gateway running\" backend=nftables\n"
	const stop = "time=2026-12-02T14:01:00Z level=INFO msg=stopping signal=terminated\n"
	const removed = "time=2026-12-02T14:01:00Z level=INFO msg=\"kernel rules removed\"\n"
	const held = "time=2026-12-02T14:01:00Z level=INFO msg=\"UDP datagrams held until their session's sender had room\" held=2210 gave_up=3\n"
	line := func(dropped, total int) string {
		return fmt.Sprintf("time=2026-12-02T14:00:30Z level=WARN msg=\"UDP datagrams dropped in the gateway since the last report\" dropped=%d queue_full=%d unsent=%d total=%d\n", dropped, dropped/4, dropped-dropped/4, total)
	}
	for _, c := range []struct {
		name string
		out  string
		want UDPDropsLog
	}{
		{"none dropped", start + stop + removed, UDPDropsLog{Complete: true}},
		{"the last line's total", start + line(700, 700) + stop + line(554, 1254) + removed, UDPDropsLog{Total: 1254, QueueFull: 175 + 138, Unsent: 525 + 416, Complete: true}},
		{"killed before the end", start + line(700, 700) + stop, UDPDropsLog{Total: 700, QueueFull: 175, Unsent: 525}},
		{"held", start + stop + held + line(3, 703) + removed, UDPDropsLog{Total: 703, Unsent: 3, Held: 2210, GaveUp: 3, Complete: true}},
	} {
		if got := ParseUDPDropsLog(c.out); got != c.want {
			t.Errorf("%s: ParseUDPDropsLog = %+v, want %+v", c.name, got, c.want)
		}
	}
}

func TestParseStraceSummary(t *testing.T) {
	out := `% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 97.10    0.120000          32      3731       402 splice
  2.00    0.002000          16        12           read
  0.90    0.001000          12         8           write
------ ----------- ----------- --------- --------- ----------------
100.00    0.123000          32      3751       402 total
`
	calls, err := ParseStraceSummary(out)
	if err != nil {
		t.Fatal(err)
	}
	if calls["splice"] != 3731 || calls["read"] != 12 || calls["write"] != 8 || len(calls) != 3 {
		t.Fatalf("ParseStraceSummary = %v", calls)
	}
	if _, err := ParseStraceSummary("strace: attach: ptrace(PTRACE_SEIZE, 1): Operation not permitted"); err == nil {
		t.Fatal("no summary: want an error")
	}
}

// sampleReport is a report with two repetitions of the TCP and CPU figures.
func sampleReport() *Report {
	s := samples{}
	for _, v := range []struct {
		setup string
		gbps  float64
		cpu   float64
	}{{SetupK, 10, math.NaN()}, {SetupKCT, 9.8, math.NaN()}, {SetupTPGW, 9.5, 0.2}, {SetupMihomo, 7, 0.4}, {SetupTPGWSS, 1.5, 2}, {SetupSSRedir, 0.8, 2.5}, {SetupBypass, 9.8, 0}} {
		for range 2 {
			for _, k := range TCPKeys {
				s.add(k, v.setup, v.gbps)
			}
			s.add("cpu_per_gb", v.setup, v.cpu)
			s.add("host_cpu_per_gb", v.setup, 0.5+v.gbps/10)
		}
	}
	rep := &Report{Machine: Machine{Kernel: "6.18", CPU: "Test CPU", Cores: 2, CC: "reno", HostCC: "bbr"}, Reps: 2}
	buildFigures(rep, s, 10000, 2)
	return rep
}

// TestPerRepetitionRatios: a ratio check gives the ratio within each
// repetition beside the medians' ratio, in the JSON and in the table, and
// none when the runs cannot be paired (a setup that failed to start has
// fewer runs).
func TestPerRepetitionRatios(t *testing.T) {
	s := samples{}
	for _, v := range []struct{ tpgw, mihomo float64 }{{5500, 5000}, {4050, 5000}, {5000, 5000}} {
		s.add("conn_rate", SetupTPGW, v.tpgw)
		s.add("conn_rate", SetupMihomo, v.mihomo)
		s.add("tcp1_up", SetupK, 10)
		s.add("tcp1_up", SetupTPGW, 9)
	}
	s.add("tcp1_up", SetupMihomo, 8) // one run of three
	s.add("idle_bulk", SetupK, 10)
	s.add("idle_bulk", SetupTPGW, 9)
	rep := &Report{Reps: 3}
	buildFigures(rep, s, 100, 3)

	c := rep.Figure("conn_rate").Checks[0]
	want := []float64{1.10, 0.81, 1.00}
	if !c.Met || c.Actual != "1.00×" || len(c.PerRep) != 3 {
		t.Fatalf("conn_rate check = %+v, want met at 1.00× with 3 per-repetition ratios", c)
	}
	for i, w := range want {
		if math.Abs(float64(c.PerRep[i])-w) > 1e-9 {
			t.Fatalf("per-repetition ratios %v, want %v", c.PerRep, want)
		}
	}
	md := rep.Markdown()
	if !strings.Contains(md, "tpgw ≥ mihomo-tproxy (1.00×; reps 1.10/0.81/1.00) | ✓ |") {
		t.Fatalf("table lacks the per-repetition ratios:\n%s", md)
	}
	if c := rep.Figure("tcp1_up").Checks[0]; len(c.PerRep) != 3 || float64(c.PerRep[0]) != 0.9 {
		t.Fatalf("tcp1_up tpgw/K check = %+v", c)
	}
	// tpgw ss has no runs: not measured, nothing to pair.
	if c := rep.Figure("tcp1_up").Checks[1]; c.PerRep != nil || c.Actual != "not measured" {
		t.Fatalf("unmeasured check = %+v, want no per-repetition ratios", c)
	}
	// The idle figures run once: no per-repetition ratios.
	if c := rep.Figure("idle_bulk").Checks[0]; c.PerRep != nil || c.Actual != "0.90×" {
		t.Fatalf("idle_bulk check = %+v", c)
	}
	b, err := json.Marshal(rep.Figure("conn_rate").Checks[0])
	if err != nil || !strings.Contains(string(b), `"per_repetition":[1.1`) {
		t.Fatalf("JSON of the check: %s, %v", b, err)
	}
}

func TestFiguresAndChecks(t *testing.T) {
	rep := sampleReport()
	f := rep.Figure("tcp1_up")
	if len(f.Checks) != 3 || !f.Checks[0].Met || f.Checks[0].Actual != "0.95×" || !f.Checks[1].Met ||
		!f.Checks[2].Met || f.Checks[2].Actual != "0.98×" {
		t.Fatalf("tcp1_up checks = %+v", f.Checks)
	}
	cpu := rep.Figure("cpu_per_gb")
	if !cpu.Checks[0].Met || cpu.Checks[0].Actual != "0.50×" {
		t.Fatalf("cpu checks = %+v", cpu.Checks)
	}
	if got := rep.Figure("host_cpu_added").Median(SetupTPGW); math.Abs(got-(-0.05)) > 1e-9 {
		t.Fatalf("host_cpu_added of tpgw = %v, want its whole-machine figure minus K's (-0.05)", got)
	}
	if v := rep.Figure("host_cpu_added").Values[SetupK]; v != nil {
		t.Fatalf("host_cpu_added has a K value %v", v.Median)
	}
	if c := rep.Figure("dns_qps_hijack").Checks[0]; c.Met || c.Actual != "not measured" {
		t.Fatalf("unmeasured DNS check = %+v, want not met and not measured", c)
	}
	if got := rep.Figure("idle_relayed").Name; !strings.Contains(got, "10000") {
		t.Fatalf("idle figure name %q does not name the connection count", got)
	}
}

// TestKnownNamesDNSBetterOf: the hijacked and direct DNS targets are checked
// on the better of the one- and two-thread medians, and on the one measured
// when the other is not.
func TestKnownNamesDNSBetterOf(t *testing.T) {
	for _, c := range []struct {
		name       string
		one, two   []float64
		met        bool
		wantActual string
	}{
		{"two threads better", []float64{88000, 90000}, []float64{120000, 130000}, true, "125000"},
		{"one thread better", []float64{104000, 106000}, []float64{70000, 75000}, true, "105000"},
		{"both short", []float64{80000, 82000}, []float64{90000, 92000}, false, "91000"},
		{"two threads not measured", []float64{101000, 103000}, nil, true, "102000"},
	} {
		s := samples{}
		for _, key := range []string{"dns_qps_hijack", "dns_qps_direct"} {
			for _, v := range c.one {
				s.add(key, SetupTPGW, v)
			}
			for _, v := range c.two {
				s.add(key+"2", SetupTPGW, v)
			}
		}
		rep := &Report{Reps: 2}
		buildFigures(rep, s, 100, 2)
		for _, key := range []string{"dns_qps_hijack", "dns_qps_direct"} {
			ch := rep.Figure(key).Checks[0]
			if ch.Met != c.met || ch.Actual != c.wantActual || !strings.Contains(ch.Target, "the better of one and two dnsperf threads") {
				t.Errorf("%s, %s: check = %+v, want met %v at %s", c.name, key, ch, c.met, c.wantActual)
			}
			if len(rep.Figure(key+"2").Checks) != 0 {
				t.Errorf("%s: the two-thread row of %s has a check of its own", c.name, key)
			}
		}
	}
}

func TestMarkdown(t *testing.T) {
	md := sampleReport().Markdown()
	for _, want := range []string{
		"kernel 6.18, Test CPU, 2 cores",
		"; TCP congestion control reno (the host's default: bbr).",
		"| Figure | Unit | K | K+ct | tpgw | mihomo-tproxy | tpgw ss | ss-redir | tpgw dns-bypass | Target (measured) | Met |",
		"| TCP 1 stream, upload | Gbit/s | 10 | 9.80 | 9.50 | 7 | 1.50 | 0.80 | 9.80 | tpgw ≥ 0.90×K (0.95×; reps 0.95/0.95); tpgw ss ≥ ss-redir (1.88×; reps 1.88/1.88); tpgw dns-bypass ≥ 0.97×K (0.98×; reps 0.98/0.98) | ✓ ✓ ✓ |",
		"| Gateway process CPU per GB (the 4 TCP runs) | CPU s/GB | n/a | n/a | 0.20 |",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("Markdown lacks %q:\n%s", want, md)
		}
	}
}

// TestCCNote: the notes say which congestion control the sockets used,
// the pinned one or the host's.
func TestCCNote(t *testing.T) {
	if n := ccNote("reno"); !strings.HasPrefix(n, "TCP congestion control: reno in every namespace of the run") {
		t.Errorf("ccNote(reno) = %q", n)
	}
	if n := ccNote(""); !strings.Contains(n, "inherited from the host's") {
		t.Errorf(`ccNote("") = %q`, n)
	}
	if !slices.Contains(methodNotes(Options{CC: "reno"}), ccNote("reno")) {
		t.Error("methodNotes lacks the congestion control")
	}
}

// TestCheckCC: a congestion control the host does not allow namespaces to
// choose is refused before any namespace is made, naming the list.
func TestCheckCC(t *testing.T) {
	for _, c := range []struct {
		cc, allowed string
		ok          bool
	}{
		{"reno", "", true},
		{"bbr", "reno bbr\n", true},
		{"cubic", "reno cubic", true},
		{"cubic", "reno bbr\n", false},
	} {
		err := checkCC(c.cc, c.allowed)
		if (err == nil) != c.ok {
			t.Errorf("checkCC(%q, %q) = %v, want ok=%v", c.cc, c.allowed, err, c.ok)
		}
		if err != nil && !strings.Contains(err.Error(), "tcp_allowed_congestion_control (reno bbr)") {
			t.Errorf("checkCC error %q does not name the allowed list", err)
		}
	}
}

func TestJSONNaNIsNull(t *testing.T) {
	b, err := sampleReport().JSON()
	if err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatalf("report JSON does not parse back: %v", err)
	}
	if !strings.Contains(string(b), `"median": null`) {
		t.Error("K's CPU per GB (NaN) should be null in JSON")
	}
	if got := back.Figure("tcp1_up").Median(SetupTPGW); got != 9.5 {
		t.Errorf("tcp1_up tpgw after a JSON round trip = %v, want 9.5", got)
	}
}

// TestConntrackNote: dns-bypass is compared with K+ct row by row, with the
// ratio of each repetition; without K+ct's runs there is no note.
func TestConntrackNote(t *testing.T) {
	rep := sampleReport()
	f := rep.Figure("tcp1_up")
	f.Values[SetupBypass] = newValue([]float64{9.0, 10.0})
	f.Values[SetupKCT] = newValue([]float64{10.0, 10.0})
	notes := conntrackNote(rep, 2)
	if len(notes) != 1 {
		t.Fatalf("notes = %q, want one", notes)
	}
	for _, want := range []string{"TCP 1 stream, upload 0.95× (reps 0.90/1.00)", "TCP 4 streams, download (-R) 1.00× (reps 1.00/1.00)"} {
		if !strings.Contains(notes[0], want) {
			t.Errorf("note lacks %q:\n%s", want, notes[0])
		}
	}
	for _, k := range TCPKeys {
		delete(rep.Figure(k).Values, SetupKCT)
	}
	if notes := conntrackNote(rep, 2); notes != nil {
		t.Errorf("without K+ct: notes = %q, want none", notes)
	}
}

func TestSVG(t *testing.T) {
	svg := sampleReport().SVG(TCPKeys)
	if !strings.HasPrefix(svg, "<svg ") || !strings.HasSuffix(svg, "</svg>\n") {
		t.Fatal("not an SVG document")
	}
	// 4 figures × 7 setups bars, plus 7 legend swatches and the background.
	if n := strings.Count(svg, "<rect "); n != 4*7+7+1 {
		t.Errorf("%d rects, want %d", n, 4*7+7+1)
	}
	if !strings.Contains(svg, "<title>tpgw: 0.95</title>") {
		t.Error("tpgw bar should be 0.95 of K")
	}
	if strings.Contains(svg, "NaN") {
		t.Error("SVG contains NaN")
	}
}

// TestAddedLatencyPaired: added latency is taken within each repetition
// (the setups ran side by side) and its median reported, with the runs; a
// setup short of runs falls back to the medians' difference. The note gives
// K's own p99 spread.
func TestAddedLatencyPaired(t *testing.T) {
	s := samples{}
	// The runs of the bench at 58b5a8c.
	for i, v := range []struct{ k50, t50, k99, t99 float64 }{{67, 164, 623, 547}, {75, 139, 197, 249}, {82, 138, 793, 245}} {
		s.add("lat_p50", SetupK, v.k50)
		s.add("lat_p50", SetupTPGW, v.t50)
		s.add("lat_p99", SetupK, v.k99)
		s.add("lat_p99", SetupTPGW, v.t99)
		if i == 0 {
			s.add("lat_p50", SetupMihomo, 150) // one run of three
		}
	}
	rep := &Report{Reps: 3}
	buildFigures(rep, s, 100, 3)
	p50 := rep.Figure("lat_added_p50").Values[SetupTPGW]
	if p50 == nil || p50.Median != 64 || len(p50.Runs) != 3 || p50.Runs[0] != 97 || p50.Runs[2] != 56 {
		t.Fatalf("added p50 of tpgw = %+v, want runs 97/64/56, median 64", p50)
	}
	if p99 := rep.Figure("lat_added_p99").Median(SetupTPGW); p99 != -76 {
		t.Fatalf("added p99 of tpgw = %v, want the median of -76, 52, -548", p99)
	}
	if m := rep.Figure("lat_added_p50").Values[SetupMihomo]; m == nil || m.Median != 150-75 || m.Runs != nil {
		t.Fatalf("added p50 of a setup with one run = %+v, want 150 minus K's median 75, no runs", m)
	}
	note := latencyNote(rep)
	if len(note) != 1 || !strings.Contains(note[0], "197–793 µs") {
		t.Fatalf("latency note = %q, want K's p99 spread 197–793 µs", note)
	}
}

// TestMissingTools: a run needs the programs of the parts it runs, and
// names each missing one with its package before it starts.
func TestMissingTools(t *testing.T) {
	without := func(absent ...string) func(string) bool {
		return func(tool string) bool { return !slices.Contains(absent, tool) }
	}
	for _, c := range []struct {
		only   []string
		absent []string
		want   []string
	}{
		{nil, nil, nil},
		{nil, []string{"wrk"}, []string{"wrk (Debian package wrk)"}},
		{[]string{"dns"}, []string{"wrk", "strace"}, nil},
		{[]string{"dns"}, []string{"dnsperf", "ss-redir"}, []string{"ss-redir (Debian package shadowsocks-libev)", "dnsperf (Debian package dnsperf)"}},
		{[]string{"idle"}, []string{"ss-redir", "dig", "ss"}, []string{"ss (Debian package iproute2)"}},
		{[]string{"splice"}, []string{"strace", "iperf3"}, []string{"iperf3 (Debian package iperf3)", "strace (Debian package strace)"}},
	} {
		got := missingTools(Options{Only: c.only}, without(c.absent...))
		if !slices.Equal(got, c.want) {
			t.Errorf("only %v, absent %v: missing %q, want %q", c.only, c.absent, got, c.want)
		}
	}
}

// TestBenchToolsInstalled: scripts/install-deps.sh (its bench part or the
// rest) checks every program the bench runs, under the same package.
func TestBenchToolsInstalled(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "scripts", "install-deps.sh"))
	if err != nil {
		t.Fatal(err)
	}
	checks := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 3 && f[0] == "check" {
			checks[f[1]] = f[2]
		}
	}
	for _, tool := range benchTools {
		pkg, ok := checks[tool.tool]
		if !ok || pkg != tool.pkg {
			t.Errorf("install-deps.sh checks %s as %q (found %v), the bench says package %s", tool.tool, pkg, ok, tool.pkg)
		}
	}
}

// TestUDPRuns: every UDP run has its rows, the fastest rate runs with
// iperf3's default buffers and with 4 MiB ones, uploading and once
// downloading (with 4 MiB buffers and the gateway's CPU), and each loss row
// carries the ≤ 1% target.
func TestUDPRuns(t *testing.T) {
	rows := map[string]bool{}
	for _, d := range figureDefs {
		rows[d.key] = true
	}
	s := samples{}
	var fastest, windowed, reverse int
	for _, u := range udpRuns {
		for _, key := range append([]string{u.key, u.cpu}, u.drops[:]...) {
			if key != "" && !rows[key] {
				t.Errorf("UDP run %+v: no row %q", u, key)
			}
		}
		if u.rate == udpRuns[len(udpRuns)-1].rate {
			fastest++
			if u.window != "" {
				windowed++
				if u.cpu == "" {
					t.Errorf("UDP run %+v with 4 MiB buffers measures no gateway CPU", u)
				}
			}
			if u.reverse {
				reverse++
				if u.window == "" {
					t.Errorf("the download %+v runs with iperf3's default buffers", u)
				}
			}
			if u.drops[0] == "" {
				t.Errorf("UDP run %+v at the fastest rate counts no receive-buffer drops", u)
			}
		}
		s.add(u.key, SetupTPGW, 0.5)
		s.add(u.key, SetupTPGW, 1.5)
		s.add(u.key, SetupTPGW, 3)
	}
	if fastest != 3 || windowed != 2 || reverse != 1 {
		t.Errorf("the fastest rate runs %d times, %d with -w, %d with -R; want 3, 2 and 1", fastest, windowed, reverse)
	}
	rep := &Report{Reps: 3}
	buildFigures(rep, s, 100, 3)
	for _, u := range udpRuns {
		f := rep.Figure(u.key)
		if len(f.Checks) != 1 || f.Checks[0].Target != "tpgw ≤ 1%" || f.Checks[0].Met || f.Checks[0].Actual != "1.50%" {
			t.Errorf("%s: checks = %+v, want one unmet tpgw ≤ 1%% at 1.50%%", u.key, f.Checks)
		}
	}
	// The kernel caps -w at rmem_max: the note gives this host's value.
	b, err := os.ReadFile("/proc/sys/net/core/rmem_max")
	if err != nil {
		t.Fatal(err)
	}
	want := "net.core.rmem_max, a host-wide setting a namespace cannot raise: " + strings.TrimSpace(string(b)) + " bytes here"
	if !slices.ContainsFunc(methodNotes(Options{}), func(n string) bool { return strings.Contains(n, want) }) {
		t.Errorf("no method note says %q", want)
	}
}

// TestRepOrderKeepsPairsAdjacent: every setup runs once a repetition, the
// setups a target compares run next to each other in every repetition, and
// each of a pair runs first in one repetition and second in the next.
func TestRepOrderKeepsPairsAdjacent(t *testing.T) {
	// The setups buildFigures' ratios and conntrackNote compare within a
	// repetition.
	comparedPairs := [][2]string{
		{SetupTPGW, SetupK}, {SetupBypass, SetupK}, {SetupTPGWSS, SetupSSRedir},
		{SetupTPGW, SetupMihomo}, {SetupBypass, SetupKCT},
	}
	if got, want := slices.Sorted(slices.Values(measureOrder)), slices.Sorted(slices.Values(Setups)); !slices.Equal(got, want) {
		t.Fatalf("measureOrder %v is not a permutation of Setups %v", measureOrder, Setups)
	}
	check := func(order []string, pairs [][2]string) {
		t.Helper()
		for _, p := range pairs {
			var firsts []string
			for rep := range 4 {
				o := repOrder(order, rep)
				i, j := slices.Index(o, p[0]), slices.Index(o, p[1])
				if i < 0 || j < 0 || (i-j != 1 && j-i != 1) {
					t.Errorf("repetition %d: %s and %s not adjacent in %v", rep+1, p[0], p[1], o)
					continue
				}
				firsts = append(firsts, o[min(i, j)])
			}
			if len(firsts) == 4 && (firsts[0] == firsts[1] || firsts[0] != firsts[2] || firsts[1] != firsts[3]) {
				t.Errorf("%s and %s: the first of the two by repetition was %v, want them in turn", p[0], p[1], firsts)
			}
		}
	}
	check(measureOrder, comparedPairs)
	check(idleOrder, [][2]string{{SetupTPGW, SetupK}, {SetupTPGW, SetupMihomo}})
	// repOrder must not reverse its argument in place.
	if o := repOrder(measureOrder, 1); o[0] != measureOrder[len(measureOrder)-1] || measureOrder[0] != SetupMihomo {
		t.Errorf("repOrder(measureOrder, 1) = %v, measureOrder now %v", o, measureOrder)
	}
}

// TestKmallocBytes: a pipe ring's allocation as the kernel rounds it: the
// default 16 slots in a 1 KiB slab, a 1 MiB pipe's 256 in 16 KiB of pages.
func TestKmallocBytes(t *testing.T) {
	for n, want := range map[int64]int64{16 * pipeSlotBytes: 1024, 256 * pipeSlotBytes: 16384, 1: 8, 90: 96, 100: 128, 8192: 8192, 8193: 16384, 2 * pipeSlotBytes: 96} {
		if got := kmallocBytes(n); got != want {
			t.Errorf("kmallocBytes(%d) = %d, want %d", n, got, want)
		}
	}
}
