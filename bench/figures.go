package bench

import (
	"fmt"
	"math"
	"os"
	"runtime"
	"strings"
	"time"
)

// figureDefs are the rows of the table, in order.
var figureDefs = []struct{ key, name, unit string }{
	{"tcp1_up", "TCP 1 stream, upload", "Gbit/s"},
	{"tcp1_down", "TCP 1 stream, download (-R)", "Gbit/s"},
	{"tcp4_up", "TCP 4 streams, upload", "Gbit/s"},
	{"tcp4_down", "TCP 4 streams, download (-R)", "Gbit/s"},
	{"cpu_per_gb", "Gateway process CPU per GB (the 4 TCP runs)", "CPU s/GB"},
	{"host_cpu_per_gb", "Whole-machine CPU per GB, same runs (iperf3 and servers included)", "CPU s/GB"},
	{"host_cpu_added", "Whole-machine CPU per GB over K's", "CPU s/GB"},
	{"host_steal", "Hypervisor steal, same runs: the share of the cores' time the host gave to other work while this guest's CPUs wanted to run", "%"},
	{"ss_server_cpu_per_gb", "ss-server CPU per GB, same runs (the proxy server both ss setups share)", "CPU s/GB"},
	{"ss_server_cores", "Cores ss-server kept busy in the 4-stream download", "cores"},
	{"conn_rate", "Short connections (wrk -c32, Connection: close)", "req/s"},
	{"conn_cpu", "Gateway process CPU per short connection, same runs", "µs"},
	{"lat_p50", "Request latency p50 (wrk -c1, keep-alive)", "µs"},
	{"lat_p99", "Request latency p99 (wrk -c1, keep-alive)", "µs"},
	{"lat_added_p50", "Added latency p50 (minus K)", "µs"},
	{"lat_added_p99", "Added latency p99 (minus K)", "µs"},
	{"udp_loss_50", "UDP 50 Mbit/s offered (1400 B), loss", "%"},
	{"udp_loss_100", "UDP 100 Mbit/s offered (1400 B), loss", "%"},
	{"udp_loss_300", "UDP 300 Mbit/s offered (1400 B), loss", "%"},
	{"udp_drop_gateway", "UDP 300 Mbit/s: datagrams dropped at full receive buffers in the gateway ns (tpgw's sockets)", "datagrams"},
	{"udp_drop_server", "UDP 300 Mbit/s: datagrams dropped at full receive buffers of iperf3's server", "datagrams"},
	{"udp_loss_300_buf", "UDP 300 Mbit/s offered, 4 MiB socket buffers at both iperf3 ends (-w 4M), loss", "%"},
	{"udp_drop_gateway_buf", "UDP 300 Mbit/s -w 4M: datagrams dropped at full receive buffers in the gateway ns", "datagrams"},
	{"udp_drop_server_buf", "UDP 300 Mbit/s -w 4M: datagrams dropped at full receive buffers of iperf3's server", "datagrams"},
	{"udp_loss_300_down", "UDP 300 Mbit/s download (-R: the upstream sends, tpgw's reply sockets carry it), -w 4M, loss", "%"},
	{"udp_drop_gateway_down", "UDP 300 Mbit/s -R -w 4M: datagrams dropped at full receive buffers in the gateway ns", "datagrams"},
	{"udp_drop_client_down", "UDP 300 Mbit/s -R -w 4M: datagrams dropped at full receive buffers of iperf3's client (the receiver)", "datagrams"},
	{"udp_cpu_up", "Gateway process CPU per GB, UDP 300 Mbit/s -w 4M upload", "CPU s/GB"},
	{"udp_cpu_down", "Gateway process CPU per GB, UDP 300 Mbit/s -R -w 4M download", "CPU s/GB"},
	{"udp_drop_process", "UDP, all five runs: datagrams the gateway process dropped itself (tpgw's log at its stop)", "datagrams"},
	{"dns_qps_new", "Fake-ip DNS, 50000 new names once (hijacked)", "qps"},
	{"dns_qps_hijack", "Fake-ip DNS, client → any server:53 (hijacked)", "qps"},
	{"dns_qps_hijack2", "Fake-ip DNS, hijacked, two dnsperf threads", "qps"},
	{"dns_qps_direct", "Fake-ip DNS, gateway → 127.0.0.1:1053", "qps"},
	{"dns_qps_direct2", "Fake-ip DNS, gateway → 127.0.0.1:1053, two dnsperf threads", "qps"},
	{"dns_lost_hijack", "Fake-ip DNS, hijacked: queries lost (no answer within dnsperf's 2 s)", "queries"},
	{"dns_per_core", "Fake-ip DNS, hijacked: queries per CPU-second of the gateway process", "qps/core"},
	{"dns_client_cores", "Fake-ip DNS, hijacked: cores dnsperf (the client) kept busy", "cores"},
	{"dns_gateway_cores", "Fake-ip DNS, hijacked: cores the gateway process kept busy", "cores"},
	{"idle_relayed", "Idle connections relayed to the upstream, of N", "count"},
	{"idle_rss", "RSS with those idle connections open", "MiB"},
	{"idle_fds", "Open fds, same", "count"},
	{"idle_pipes", "Pipes, same", "count"},
	{"idle_mem_per_conn", "Memory per idle connection: (RSS + pipes) / relayed", "KiB"},
	{"idle_bulk", "TCP 1 stream upload beside those idle connections", "Gbit/s"},
	{"splice_calls", "splice(2) calls during a 3 s upload (strace -f -c)", "calls"},
	{"rw_calls", "read/write/sendmsg-family calls, same upload", "calls"},
}

// report turns the samples into figures with their targets.
func (r *runner) report(started time.Time) *Report {
	rep := &Report{
		Machine:  machine(r.opts.TPGWBin, r.opts.CC),
		Started:  started.Format(time.RFC3339),
		Duration: time.Since(started).Round(time.Second).String(),
		Reps:     r.opts.Reps,
	}
	for setup, calls := range r.splice {
		var rw int64
		for _, sc := range []string{"read", "write", "readv", "writev", "recvfrom", "sendto", "recvmsg", "sendmsg"} {
			rw += calls[sc]
		}
		r.s.add("splice_calls", setup, float64(calls["splice"]))
		r.s.add("rw_calls", setup, float64(rw))
	}
	buildFigures(rep, r.s, r.opts.IdleConns, r.opts.Reps)
	rep.Notes = append(methodNotes(r.opts), r.notes...)
	rep.Notes = append(rep.Notes, latencyNote(rep)...)
	rep.Notes = append(rep.Notes, conntrackNote(rep, r.opts.Reps)...)
	rep.Notes = append(rep.Notes, spliceNotes(r.splice)...)
	rep.NotMeasured = notMeasured()
	return rep
}

// buildFigures fills rep.Figures from s and attaches the targets of issue 5;
// reps is the number of interleaved repetitions (a figure with fewer runs,
// such as one whose setup failed once, gets no per-repetition ratios).
func buildFigures(rep *Report, s samples, idleConns, reps int) {
	for _, d := range figureDefs {
		f := Figure{Key: d.key, Name: d.name, Unit: d.unit, Values: map[string]*Value{}}
		if idleConns > 0 {
			f.Name = replaceN(f.Name, idleConns)
		}
		for setup, runs := range s[d.key] {
			f.Values[setup] = newValue(runs)
		}
		rep.Figures = append(rep.Figures, f)
	}
	// Added latency and CPU: a setup's figure minus K's (addedValue).
	for _, p := range []struct{ added, abs string }{{"lat_added_p50", "lat_p50"}, {"lat_added_p99", "lat_p99"}, {"host_cpu_added", "host_cpu_per_gb"}} {
		abs, added := rep.Figure(p.abs), rep.Figure(p.added)
		for setup, v := range abs.Values {
			if setup != SetupK {
				added.Values[setup] = addedValue(v, abs.Values[SetupK], reps)
			}
		}
	}
	m := func(key, setup string) float64 { return rep.Figure(key).Median(setup) }
	check := func(key string, c Check) {
		f := rep.Figure(key)
		f.Checks = append(f.Checks, c)
	}
	// ratio checks setup num against setup den on figure key, by the medians
	// and within each repetition.
	ratio := func(key, target, num, den string, want float64, atLeast bool) {
		f := rep.Figure(key)
		c := ratioCheck(target, f.Median(num), f.Median(den), want, atLeast)
		check(key, withPerRep(c, f.Values[num], f.Values[den], reps))
	}
	for _, k := range TCPKeys {
		want := 0.90
		if k == "tcp4_up" || k == "tcp4_down" {
			want = 0.80
		}
		ratio(k, fmt.Sprintf("tpgw ≥ %.2f×K", want), SetupTPGW, SetupK, want, true)
		ratio(k, "tpgw ss ≥ ss-redir", SetupTPGWSS, SetupSSRedir, 1, true)
		ratio(k, "tpgw dns-bypass ≥ 0.97×K", SetupBypass, SetupK, 0.97, true)
	}
	ratio("cpu_per_gb", "tpgw ≤ 0.7×mihomo-tproxy", SetupTPGW, SetupMihomo, 0.7, false)
	ratio("cpu_per_gb", "tpgw ss ≤ ss-redir", SetupTPGWSS, SetupSSRedir, 1, false)
	ratio("conn_rate", "tpgw ≥ mihomo-tproxy", SetupTPGW, SetupMihomo, 1, true)
	for _, u := range udpRuns {
		check(u.key, limitCheck("tpgw ≤ 1%", m(u.key, SetupTPGW), 1, false, "%.2f%%"))
	}
	check("dns_qps_new", limitCheck("≥ 100k qps", m("dns_qps_new", SetupTPGW), 100000, true, "%.0f"))
	// Known names: what the server answers when the client is not the
	// limit, the better of one and two dnsperf threads (both rows shown).
	for _, key := range []string{"dns_qps_hijack", "dns_qps_direct"} {
		check(key, limitCheck("≥ 100k qps, the better of one and two dnsperf threads",
			betterOf(m(key, SetupTPGW), m(key+"2", SetupTPGW)), 100000, true, "%.0f"))
	}
	check("idle_mem_per_conn", limitCheck("tpgw ≤ 16 KiB", m("idle_mem_per_conn", SetupTPGW), 16, false, "%.1f KiB"))
	ratio("idle_bulk", "tpgw ≥ 0.8×K", SetupTPGW, SetupK, 0.8, true)
	check("splice_calls", limitCheck("tpgw DIRECT splices", m("splice_calls", SetupTPGW), 1, true, "%.0f calls"))
}

// betterOf is the larger of a and b that was measured (NaN if neither).
func betterOf(a, b float64) float64 {
	switch {
	case math.IsNaN(a):
		return b
	case math.IsNaN(b):
		return a
	}
	return max(a, b)
}

// addedValue is v minus K's k: within each repetition, whose setups ran
// side by side, and the median of those differences; the difference of the
// medians when the runs cannot be paired (a figure short of runs).
func addedValue(v, k *Value, reps int) *Value {
	if k == nil {
		return &Value{Median: JSONFloat(math.NaN())}
	}
	if len(v.Runs) != reps || len(k.Runs) != reps {
		return &Value{Median: v.Median - k.Median}
	}
	diffs := make([]float64, reps)
	for i := range reps {
		diffs[i] = float64(v.Runs[i]) - float64(k.Runs[i])
	}
	return newValue(diffs)
}

// conntrackNote gives dns-bypass's throughput against K+ct's, row by row:
// the part of its distance to K that conntrack explains.
func conntrackNote(rep *Report, reps int) []string {
	var parts []string
	for _, k := range TCPKeys {
		f := rep.Figure(k)
		c := withPerRep(ratioCheck("", f.Median(SetupBypass), f.Median(SetupKCT), 1, true), f.Values[SetupBypass], f.Values[SetupKCT], reps)
		if c.Actual == "not measured" {
			continue
		}
		part := fmt.Sprintf("%s %s", f.Name, c.Actual)
		if len(c.PerRep) > 1 {
			part += " (reps " + formatRatios(c.PerRep) + ")"
		}
		parts = append(parts, part)
	}
	if len(parts) == 0 {
		return nil
	}
	return []string{"tpgw dns-bypass against K+ct (kernel forwarding with conntrack, which dns-bypass cannot do without): " + strings.Join(parts, "; ") + ". Against K the target is checked above; these ratios say how much of the distance to K is conntrack's."}
}

// latencyNote says how far K's own p99 moved between repetitions: the
// noise that an added p99 is measured against.
func latencyNote(rep *Report) []string {
	k := rep.Figure("lat_p99").Values[SetupK]
	if k == nil || len(k.Runs) < 2 {
		return nil
	}
	lo, hi := math.Inf(1), math.Inf(-1)
	for _, r := range k.Runs {
		if x := float64(r); !math.IsNaN(x) {
			lo, hi = min(lo, x), max(hi, x)
		}
	}
	if math.IsInf(lo, 0) {
		return nil
	}
	return []string{fmt.Sprintf("Added latency: the setup's figure minus K's within each repetition, then the median of those. The p99 of one keep-alive connection over 3 s is set by the host's scheduling more than by the path: K's own p99 was %.0f–%.0f µs across the repetitions here, so an added p99 within that spread, or below zero, means the gateway's share was lost in that noise.", lo, hi)}
}

func replaceN(name string, n int) string {
	out := []byte{}
	for i := 0; i < len(name); i++ {
		if name[i] == 'N' && (i+1 == len(name) || name[i+1] == ' ') && (i == 0 || name[i-1] == ' ') {
			out = append(out, fmt.Sprint(n)...)
			continue
		}
		out = append(out, name[i])
	}
	return string(out)
}

// ccNote says which TCP congestion control the run's sockets used.
func ccNote(cc string) string {
	if cc == "" {
		return "TCP congestion control: every socket of the run used its namespace's default, inherited from the host's (see Machine); a pacing one (BBR) runs a timer per burst on every sender, K's included, and slows every setup by as much as that costs on this host."
	}
	return fmt.Sprintf("TCP congestion control: %s in every namespace of the run (net.ipv4.tcp_congestion_control, set by the bench whatever the host's default), so hosts with different defaults give comparable figures. On veths nothing is lost, and reno and cubic (the kernel's default) both grow their window until the receiver's limits it, without pacing; BBR, a default on some hosts, paces every sender, K's included, with a timer per burst (on one 2-core host it cut K to a quarter); tpgw-bench -cc \"\" keeps the host's.", cc)
}

func methodNotes(o Options) []string {
	return []string{
		fmt.Sprintf("Topology: client ns → gateway ns → upstream ns (iperf3 -s, Go HTTP server), ss-server in the proxy ns behind the upstream; veths only, IPv4. iperf3 -t %d -O 1 (TCP), -t %d (UDP); every setup of a repetition runs in turn, in the order %s and reversed in every second repetition, so that the setups each target compares run next to each other and each of the two first in turn.", o.Seconds, o.Seconds, strings.Join(measureOrder, ", ")),
		ccNote(o.CC),
		"K is kernel forwarding (ip_forward=1, no rules, so no conntrack). K+ct is K with one stateful rule in a forward chain (ct state established,related accept), which turns conntrack on for the namespace, as on a router with a stateful firewall (OpenWrt's fw4); it runs the TCP figures only. tpgw and mihomo-tproxy run MATCH,DIRECT; tpgw ss and ss-redir run MATCH,ss to the same ss-server (chacha20-ietf-poly1305). mihomo-tproxy and ss-redir get the same netcfg TPROXY plan as tpgw (nftables; without the DNS hijack).",
		"tpgw dns-bypass runs tpgw with tpgw.dns-bypass and the rules DOMAIN-SUFFIX,bench.test,DIRECT and MATCH,ss. Before its runs the client resolves iperf.bench.test through the hijacked DNS (dnsmasq in the upstream ns answers 203.0.113.2) and gets the real address, which tpgw puts in its kernel set; iperf3 then connects to that address, and the kernel forwards the flow past the TPROXY rules (the tpgw process uses no CPU for it). Each packet still goes through conntrack (the label that keeps a bypassed connection in the kernel lives there) and the first rule of tpgw's prerouting chain, which K does not pay and K+ct pays but for the rule.",
		"CPU per GB: utime+stime of the gateway process (/proc/PID/stat) over the four TCP runs divided by the payload moved (omitted seconds included). K's forwarding happens in softirq and is not attributable to a process (n/a).",
		"Whole-machine CPU per GB: busy time of all CPUs (/proc/stat: user, nice, system, irq, softirq; not idle, iowait or steal) over the same runs, divided by the same payload. It counts what the process figure cannot: softirq work (K's forwarding, the TCP receive path that runs in the sender's context) and the client and server, which cost the same per GB in every setup; the row below subtracts K's, leaving what the gateway path costs beyond forwarding. Other work on the machine adds to both.",
		"Hypervisor steal: the steal field of /proc/stat over the same runs, as a share of the time all " + fmt.Sprint(runtime.NumCPU()) + " cores had (wall time × cores). It is time this guest's CPUs had work to run and the host ran something else on them: a share of s% leaves the bench about (100-s)% of the cores it sees, and a share that moves between setups or repetitions moves their throughput with it. 0 where the kernel does not count steal (no hypervisor, or one that does not report it).",
		"ss-server: utime+stime of the one ss-server process (/proc/PID/stat), per GB over the four TCP runs and in cores (CPU seconds over the iperf3 run's wall time) for the 4-stream download. It is one thread: at 1.0 core the ss rows measure ss-server, and its cost per byte depends on the gateway's side of the connection too (on veths its sends run the gateway kernel's receive of each segment in its own context, and how the sender's congestion control paces them moves that work between its thread and the timer's softirq).",
		"Memory per idle connection follows issue 5: (VmRSS + estimated kernel memory of the process's pipes) / connections relayed. The idle connections wait in the upstream's accept queue (never accepted), so only the gateway holds descriptors for them; the gateway inherits RLIMIT_NOFILE " + fmt.Sprint(nofileLimit()) + " from the bench. Pipe memory is estimated from each pipe's capacity (F_GETPIPE_SZ: 40 B per slot) plus 1.5 KiB of inode/file structures; empty pipes hold no data pages. Socket buffers of the relayed sockets are not counted (K has them too).",
		fmt.Sprintf("Idle connections: %s in turn (reversed in every second repetition), %d interleaved repetitions like the rest (medians); each time the gateway starts afresh and the upstream listens anew.", strings.Join(idleOrder, ", "), o.Reps),
		"UDP: iperf3 -u -l 1400 at each rate, loss as the receiver counts it (sequence numbers). The fastest rate runs three times: uploading with iperf3's default socket buffers (the server's holds about 90 such datagrams), and uploading and downloading (-R: the upstream sends, and its datagrams reach the client through tpgw's reply sockets, with the original destination as their source) with 4 MiB ones at both ends (-w 4M, which iperf3's server applies as well; the kernel caps a socket's buffer at net.core.rmem_max, a host-wide setting a namespace cannot raise: " + rmemMax() + " here). Around those runs the bench reads the UDP RcvbufErrors of the gateway namespace and of the receiver's (/proc/net/snmp and snmp6, each namespace's own): datagrams the kernel dropped because a socket's receive buffer was full, at tpgw's sockets or at iperf3's receiving end. tpgw also counts the datagrams it dropped itself (mihomo's queues full, or released unsent) and logs the total when it stops, which the bench reads: over the five runs, nearly all at the fastest rate. What is left of a loss happened on the way (veths and qdiscs). The two runs with 4 MiB buffers also give the gateway process's CPU per GB (utime+stime over the payload iperf3 counted), as for TCP.",
		"Short connections: wrk -t2 -c32 -d5s with Connection: close, i.e. one TCP connection per request. Latency: wrk -t1 -c1 -d3s --latency on one keep-alive connection.",
		"DNS: dnsperf with -c 4 -T 1 -q 500. First one pass (-n 1) over 50000 A names never asked before (each allocates a fake IP, which a persisted pool writes to the journal of cache.db before the answer leaves; every repetition's gateway starts with an empty pool, so no address is reused), then -l 5 over 1000 other names, known after their first round (500 queries outstanding: with fewer, a loaded 2-core host measures round-trip latency, not the server): hijacked = from the client to the upstream's address port 53, answered by tpgw; direct = from inside the gateway ns to 127.0.0.1:1053 (netcfg's input guard keeps LAN clients off 1053). Each of those two runs once more with two dnsperf threads (-T 2): on some 2-core hosts one thread is the limit (the gateway then keeps well under a core busy) and two drive the server harder, its reads and writes of up to 32 datagrams each carrying more; on others two threads take the cores the gateway needs and get less. Their targets are checked on the better of the two medians; the cores rows are the one-thread hijacked run's. Cores kept busy: CPU seconds (dnsperf's from its rusage, the gateway's from /proc) over the run's wall time; on veths the kernel work of delivering a datagram runs in the sender's context, so dnsperf's share includes the gateway kernel's receive of each query, and the gateway's the client kernel's receive of each answer.",
		"Target (measured): a ratio target gives the ratio of the two medians, which decides ✓ or ✗, then (reps a/b/c) the ratio within each repetition, whose setups ran side by side: a target met in some repetitions and missed in others is within the noise of this host; one missed in every repetition is not.",
		"The 2 cores are shared by the client tools, the gateway, the servers and ss-server; other work on the host adds noise. The figures compare setups within this run, not across machines.",
	}
}

func spliceNotes(calls map[string]map[string]int64) []string {
	var notes []string
	for _, setup := range []string{SetupTPGW, SetupMihomo, SetupTPGWSS} {
		c, ok := calls[setup]
		if !ok {
			continue
		}
		verdict := "does not splice"
		if c["splice"] > 0 {
			verdict = "splices"
		}
		notes = append(notes, fmt.Sprintf("Splice check, %s: %d splice, %d read, %d write, %d readv/writev, %d sendmsg/recvmsg/sendto/recvfrom calls during a 3 s iperf3 upload under strace → %s.",
			setup, c["splice"], c["read"], c["write"], c["readv"]+c["writev"], c["sendmsg"]+c["recvmsg"]+c["sendto"]+c["recvfrom"], verdict))
	}
	return notes
}

func notMeasured() []string {
	return []string{
		"Flow offload (nf_flow_table) of dns-bypass connections, which would skip conntrack: this kernel has no nf_flow_table.",
		"IPv6 paths, UDP through the shadowsocks path, and ss-redir's UDP relay.",
		"The kernel memory of socket buffers.",
	}
}

// rmemMax returns net.core.rmem_max in bytes as the kernel gives it, which
// caps iperf3's -w: below 4 MiB the -w run gets less than its name says.
func rmemMax() string {
	b, err := os.ReadFile("/proc/sys/net/core/rmem_max")
	if err != nil {
		return "unknown (" + err.Error() + ")"
	}
	return strings.TrimSpace(string(b)) + " bytes"
}
