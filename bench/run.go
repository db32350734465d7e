package bench

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tpgw/tpgw/internal/tbenv"
	"github.com/tpgw/tpgw/internal/testnet"
)

// Options configure Run.
type Options struct {
	TPGWBin   string // bin/tpgw
	HelperBin string // bench/cmd/mihomo-tproxy
	Reps      int    // interleaved repetitions (medians are taken over them)
	Seconds   int    // iperf3 -t of each TCP/UDP run (plus one omitted second for TCP)
	IdleConns int    // idle connections held open for the memory figures
	// Only, when not empty, limits the run to these parts: "tcp", "http",
	// "udp", "dns" (the interleaved figures of each setup), "idle", "splice".
	Only []string
	// CC is the TCP congestion control of every namespace of the run
	// (net.ipv4.tcp_congestion_control), "" for what they inherit from the
	// host. New namespaces take the host's default, and a pacing one (BBR)
	// runs a timer per burst on every sender, K's included: on one 2-core
	// host it cut K to a quarter. Pinning it makes runs on different hosts
	// comparable. A namespace other than the host's may only choose from
	// net.ipv4.tcp_allowed_congestion_control, which always has reno.
	CC  string
	Log io.Writer
}

// part reports whether the run includes part.
func (o Options) part(name string) bool {
	return len(o.Only) == 0 || slices.Contains(o.Only, name)
}

// perSetup reports whether o runs a part that starts every setup in turn.
func (o Options) perSetup() bool {
	return o.part("tcp") || o.part("http") || o.part("udp") || o.part("dns")
}

// runner holds one benchmark run.
type runner struct {
	env   *tbenv.Env
	opts  Options
	tp    *testnet.Topology
	s     samples
	notes []string
	// failures counts measurements that failed; each leaves a NaN run.
	failures int
	queries  string // dnsperf input file
	// newPasses counts the passes over new names (each asks names of its own).
	newPasses int
	idle      *idleServer
	splice    map[string]map[string]int64 // setup -> syscall -> calls
	ssPID     int                         // ss-server's, for its CPU figures
	log       io.Writer
}

// tcpCases are the iperf3 TCP figures.
var tcpCases = []struct {
	key, name string
	args      []string
}{
	{"tcp1_up", "TCP 1 stream, upload", nil},
	{"tcp1_down", "TCP 1 stream, download (-R)", []string{"-R"}},
	{"tcp4_up", "TCP 4 streams, upload", []string{"-P", "4"}},
	{"tcp4_down", "TCP 4 streams, download (-R)", []string{"-P", "4", "-R"}},
}

// TCPKeys are the throughput figures drawn in the SVG.
var TCPKeys = []string{"tcp1_up", "tcp1_down", "tcp4_up", "tcp4_down"}

// udpRuns are the UDP figures: iperf3 -u at fixed rates. The fastest rate
// runs three times: uploading with iperf3's default socket buffers, and
// uploading and downloading (-R) with 4 MiB ones at both of its ends (-w,
// which iperf3's server applies too; the kernel caps it at
// net.core.rmem_max, which the method note gives), each with the
// receive-buffer drops around it. On a machine whose cores the receiver
// shares with the gateway, the default buffer (about 90 datagrams of 1400
// B) overflows whenever the receiver is not run for a few milliseconds;
// with 4 MiB what is left of a loss is the path's. The download's
// datagrams leave tpgw through its reply sockets (the original
// destination's address as their source), the upload's through mihomo's
// outbound socket; the runs with 4 MiB buffers also give the gateway
// process's CPU per GB of each direction.
var udpRuns = []udpRun{
	{key: "udp_loss_50", rate: 50},
	{key: "udp_loss_100", rate: 100},
	{key: "udp_loss_300", rate: 300, drops: [2]string{"udp_drop_gateway", "udp_drop_server"}},
	{key: "udp_loss_300_buf", rate: 300, window: "4M", drops: [2]string{"udp_drop_gateway_buf", "udp_drop_server_buf"}, cpu: "udp_cpu_up"},
	{key: "udp_loss_300_down", rate: 300, window: "4M", reverse: true, drops: [2]string{"udp_drop_gateway_down", "udp_drop_client_down"}, cpu: "udp_cpu_down"},
}

// udpRun is one iperf3 -u run: its figure, rate (Mbit/s offered), socket
// buffer (-w; "" for iperf3's default), direction (reverse: -R, the
// upstream sends), if counted the figures of the datagrams dropped at full
// receive buffers of the gateway namespace and of iperf3's receiving end
// during it, and if measured the figure of the gateway process's CPU per
// GB.
type udpRun struct {
	key     string
	rate    int
	window  string
	reverse bool
	drops   [2]string
	cpu     string
}

// benchTools are the programs a run uses, each with the part that needs it
// ("" for every run: the topology's servers start whatever the parts;
// "setups" for the parts that start every setup in turn) and the Debian
// package that has it.
var benchTools = []struct{ part, tool, pkg string }{
	{"", "ip", "iproute2"},
	{"", "nft", "nftables"},
	{"", "iperf3", "iperf3"},
	{"", "ss-server", "shadowsocks-libev"},
	{"", "dnsmasq", "dnsmasq-base"},
	{"setups", "ss-redir", "shadowsocks-libev"},
	{"setups", "dig", "dnsutils"},
	{"http", "wrk", "wrk"},
	{"dns", "dnsperf", "dnsperf"},
	{"idle", "ss", "iproute2"},
	{"splice", "strace", "strace"},
}

// missingTools names, with their packages, the programs that the parts
// opts selects need and that has does not find, so that a run fails before
// its namespaces instead of measuring n/a for minutes.
func missingTools(opts Options, has func(string) bool) []string {
	var missing []string
	for _, t := range benchTools {
		var needed bool
		switch t.part {
		case "":
			needed = true
		case "setups":
			needed = opts.perSetup()
		default:
			needed = opts.part(t.part)
		}
		if needed && !has(t.tool) {
			missing = append(missing, fmt.Sprintf("%s (Debian package %s)", t.tool, t.pkg))
		}
	}
	return missing
}

// Run builds the topology, measures every setup and returns the report. The
// namespaces and every process it started are gone when it returns, also on
// error; a report with what was measured is returned together with an error.
func Run(opts Options) (*Report, error) {
	if opts.Log == nil {
		opts.Log = io.Discard
	}
	if opts.Reps < 1 {
		opts.Reps = 1
	}
	if opts.Seconds < 1 {
		opts.Seconds = 5
	}
	if missing := missingTools(opts, testnet.HasTool); len(missing) > 0 {
		return nil, fmt.Errorf("bench: missing programs: %s; scripts/install-deps.sh bench installs them (make bench runs it)", strings.Join(missing, ", "))
	}
	if opts.CC != "" {
		allowed, _ := os.ReadFile("/proc/sys/net/ipv4/tcp_allowed_congestion_control")
		if err := checkCC(opts.CC, string(allowed)); err != nil {
			return nil, err
		}
	}
	started := time.Now()
	loadStart := loadAverage()
	// The client's idle sockets live in this process and the gateway
	// inherits the limit. Raising the hard limit needs CAP_SYS_RESOURCE; when
	// that is missing, the soft limit Go already raised to the hard one stays.
	lim := syscall.Rlimit{Cur: 1 << 17, Max: 1 << 17}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		fmt.Fprintf(opts.Log, "note: RLIMIT_NOFILE stays %d (raise: %v)\n", nofileLimit(), err)
	}
	env := tbenv.New("tpgw-bench", opts.Log)
	env.CloseOnSignal()
	defer env.Close()
	r := &runner{env: env, opts: opts, s: samples{}, splice: map[string]map[string]int64{}, log: opts.Log}
	err := env.Do(r.run)
	if env.Interrupted() {
		env.Close() // waits for the signal handler's Close
		select {}   // which then exits, with status 130
	}
	rep := r.report(started)
	rep.Load = [2]string{loadStart, loadAverage()}
	return rep, err
}

// measureOrder is the order of the setups in a repetition. Each pair a
// target or note compares (buildFigures' ratios, conntrackNote; listed in
// TestRepOrderKeepsPairsAdjacent) runs next to each other: the host's speed
// drifts over minutes (K moved from 45-50 to 40-45 Gbit/s between two
// repetitions of one run), and with the order rotated, as before, K ran
// first and dns-bypass last, four minutes later, in a repetition where
// dns-bypass's ratios to K were then its lowest, in two runs in a row.
var measureOrder = []string{SetupMihomo, SetupTPGW, SetupK, SetupBypass, SetupKCT, SetupSSRedir, SetupTPGWSS}

// idleOrder is measureOrder for the idle-connection figures.
var idleOrder = []string{SetupMihomo, SetupTPGW, SetupK}

// repOrder is order for repetition rep: as given in the even repetitions,
// reversed in the odd ones, so that neighbours stay neighbours and each of
// a pair runs first in turn (a rotation would part the pair that straddles
// the list's end).
func repOrder(order []string, rep int) []string {
	o := slices.Clone(order)
	if rep%2 == 1 {
		slices.Reverse(o)
	}
	return o
}

func (r *runner) logf(format string, a ...any) {
	fmt.Fprintf(r.log, "%s  "+format+"\n", append([]any{time.Now().Format("15:04:05")}, a...)...)
}

func (r *runner) run() {
	r.logf("building namespaces")
	r.tp = testnet.New(r.env)
	tp := r.tp
	prepareNamespaces(r.env, tp, r.opts.CC)
	tp.StartHTTPServer(r.env, httpPort)
	r.ssPID = tp.StartSSServer(r.env, ssPort, ssPassword, ssMethod).Cmd.Process.Pid
	srv := tp.Upstream.Start(r.env, "iperf3", "-s", "-p", strconv.Itoa(iperfPort))
	if err := testnet.WaitTCP(tp.Upstream, fmt.Sprintf("127.0.0.1:%d", iperfPort), 10*time.Second); err != nil {
		r.env.Fatalf("iperf3 -s: %v\n%s", err, srv.Output())
	}
	r.queries = r.writeQueries("host", 1000)
	tp.StartDNSMasq(r.env, map[string]string{bypassName: tp.UpstreamIP.String()})
	r.idle = r.startIdleServer()

	for rep := 0; rep < r.opts.Reps && r.opts.perSetup(); rep++ {
		for _, setup := range repOrder(measureOrder, rep) {
			r.logf("repetition %d/%d: %s", rep+1, r.opts.Reps, setup)
			r.measureSetup(setup)
		}
	}
	// The idle figures are interleaved too: K's bulk upload beside the idle
	// connections moved by a third between runs when it was measured once.
	for rep := 0; rep < r.opts.Reps && r.opts.part("idle"); rep++ {
		for _, setup := range repOrder(idleOrder, rep) {
			r.logf("%d idle connections, repetition %d/%d: %s", r.opts.IdleConns, rep+1, r.opts.Reps, setup)
			r.measureIdle(setup)
		}
	}
	for _, setup := range []string{SetupTPGW, SetupMihomo, SetupTPGWSS} {
		if !r.opts.part("splice") {
			break
		}
		r.logf("splice check: %s", setup)
		r.measureSplice(setup)
	}
}

// noteOnce adds a note to the report unless it is there already (a
// repeated measurement finds the same thing each time).
func (r *runner) noteOnce(note string) {
	if !slices.Contains(r.notes, note) {
		r.notes = append(r.notes, note)
	}
}

func (r *runner) fail(what string, err error) {
	r.failures++
	r.logf("FAILED %s: %v", what, err)
	r.notes = append(r.notes, fmt.Sprintf("failed: %s: %v", what, firstLine(err.Error())))
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}

// measureSetup runs every figure that applies to setup once.
func (r *runner) measureSetup(setup string) {
	g, err := r.start(setup)
	if err != nil {
		r.fail("start "+setup, err)
		for _, c := range tcpCases {
			r.s.add(c.key, setup, math.NaN())
		}
		return
	}
	defer g.stop()
	if r.opts.part("tcp") {
		r.measureTCP(g)
	}
	if r.opts.part("http") && (setup == SetupK || setup == SetupTPGW || setup == SetupMihomo) {
		r.measureHTTP(g)
	}
	udp := r.opts.part("udp") && (setup == SetupK || setup == SetupTPGW)
	if udp {
		r.measureUDP(g)
	}
	if r.opts.part("dns") && setup == SetupTPGW {
		r.measureDNS(g)
	}
	if udp && setup == SetupTPGW {
		// tpgw logs the datagrams it dropped itself when it stops; its
		// DNS server's queries do not pass that path.
		g.stop()
		if d := ParseUDPDropsLog(g.output); d.Complete {
			r.s.add("udp_drop_process", setup, float64(d.Total))
			r.logf("  UDP: %d datagrams dropped inside tpgw over its UDP runs (its log at stop): %d with mihomo's worker queue full, %d released unsent; %d held until their session's sender had room, %d of them not within tpgw's wait",
				d.Total, d.QueueFull, d.Unsent, d.Held, d.GaveUp)
		} else {
			r.fail(setup+" UDP drops", errors.New("tpgw did not log its stop to the end (no \"kernel rules removed\")"))
			r.s.add("udp_drop_process", setup, math.NaN())
		}
	}
}

func (r *runner) iperf(extra ...string) (IperfResult, error) {
	args := append([]string{"-c", r.tp.UpstreamIP.String(), "-p", strconv.Itoa(iperfPort), "-J",
		"-t", strconv.Itoa(r.opts.Seconds)}, extra...)
	out, err := r.tp.Client.Run(r.env, time.Duration(r.opts.Seconds+30)*time.Second, "iperf3", args...)
	res, perr := ParseIperf([]byte(out), slicesContains(extra, "-u"))
	if perr != nil {
		return res, errors.Join(err, perr)
	}
	return res, nil
}

func slicesContains(xs []string, s string) bool { return indexOf(xs, s) >= 0 }

// cpu returns the gateway process's CPU seconds; NaN for K (softirq work is
// not attributed to any process).
func (g *gateway) cpu() float64 { return pidCPU(g.pid) }

// ssServerCPU returns ss-server's CPU seconds.
func (r *runner) ssServerCPU() float64 { return pidCPU(r.ssPID) }

// pidCPU returns the CPU seconds of process pid, NaN for pid 0 or when
// they cannot be read.
func pidCPU(pid int) float64 {
	if pid == 0 {
		return math.NaN()
	}
	v, err := ProcCPUSeconds(pid)
	if err != nil {
		return math.NaN()
	}
	return v
}

func (r *runner) measureTCP(g *gateway) {
	var cpu, host, steal, ssCPU, wallSum float64
	var bytes int64
	viaSS := g.setup == SetupTPGWSS || g.setup == SetupSSRedir
	for _, c := range tcpCases {
		before, ssBefore, start := g.cpu(), r.ssServerCPU(), time.Now()
		hostBefore, stealBefore := hostCPU()
		res, err := r.iperf(append([]string{"-O", "1"}, c.args...)...)
		after, ssAfter, wall := g.cpu(), r.ssServerCPU(), time.Since(start)
		hostAfter, stealAfter := hostCPU()
		if err != nil {
			r.fail(fmt.Sprintf("%s %s", g.setup, c.name), err)
			r.s.add(c.key, g.setup, math.NaN())
			continue
		}
		r.s.add(c.key, g.setup, res.BitsPerSec/1e9)
		cpu += after - before
		host += hostAfter - hostBefore
		steal += stealAfter - stealBefore
		wallSum += wall.Seconds()
		bytes += res.Bytes
		ssCPU += ssAfter - ssBefore
		if viaSS && c.key == "tcp4_down" {
			r.s.add("ss_server_cores", g.setup, (ssAfter-ssBefore)/wall.Seconds())
		}
		line := fmt.Sprintf("  %-28s %6.2f Gbit/s  cpu %.2fs  host cpu %.2fs  steal %.2fs", c.name, res.BitsPerSec/1e9, after-before, hostAfter-hostBefore, stealAfter-stealBefore)
		if viaSS {
			line += fmt.Sprintf("  ss-server cpu %.2fs", ssAfter-ssBefore)
		}
		r.logf("%s", line)
	}
	if viaSS {
		r.s.add("ss_server_cpu_per_gb", g.setup, CPUPerGB(ssCPU, bytes))
	}
	// K: NaN, shown as n/a (its forwarding runs in softirq, in no process).
	r.s.add("cpu_per_gb", g.setup, CPUPerGB(cpu, bytes))
	r.s.add("host_cpu_per_gb", g.setup, CPUPerGB(host, bytes))
	r.s.add("host_steal", g.setup, stealShare(steal, wallSum, runtime.NumCPU()))
}

// stealShare is steal seconds as a percentage of the CPU time cores CPUs
// had over wall seconds; NaN without a wall time or a steal figure.
func stealShare(steal, wall float64, cores int) float64 {
	if wall <= 0 || cores <= 0 || math.IsNaN(steal) {
		return math.NaN()
	}
	return 100 * steal / (wall * float64(cores))
}

// hostCPU is HostCPUSeconds, NaN (no figure) when /proc/stat cannot be read.
func hostCPU() (busy, steal float64) {
	busy, steal, err := HostCPUSeconds()
	if err != nil {
		return math.NaN(), math.NaN()
	}
	return busy, steal
}

func (r *runner) measureHTTP(g *gateway) {
	url := fmt.Sprintf("http://%s:%d/", r.tp.UpstreamIP, httpPort)
	const rateSeconds = 5
	before := g.cpu()
	out, err := r.tp.Client.Run(r.env, 30*time.Second, "wrk", "-t2", "-c32", fmt.Sprintf("-d%ds", rateSeconds), "-H", "Connection: close", url)
	cpu := g.cpu() - before
	if res, perr := ParseWrk(out); err != nil || perr != nil {
		r.fail(g.setup+" wrk connection rate", errors.Join(err, perr))
		r.s.add("conn_rate", g.setup, math.NaN())
	} else {
		r.s.add("conn_rate", g.setup, res.RequestsPerSec)
		// The gateway's CPU over the run (wrk's start and end included,
		// when the gateway idles) per connection wrk completed.
		perConn := cpu / (res.RequestsPerSec * rateSeconds) * 1e6
		if !math.IsNaN(cpu) && res.RequestsPerSec > 0 {
			r.s.add("conn_cpu", g.setup, perConn)
		}
		r.logf("  connections/s %.0f (errors %d), gateway %.1f µs of CPU each", res.RequestsPerSec, res.Errors, perConn)
	}
	out, err = r.tp.Client.Run(r.env, 30*time.Second, "wrk", "-t1", "-c1", "-d3s", "--latency", url)
	if res, perr := ParseWrk(out); err != nil || perr != nil || res.P50 == 0 {
		if err == nil && perr == nil {
			perr = errors.New("wrk printed no latency percentiles")
		}
		r.fail(g.setup+" wrk latency", errors.Join(err, perr))
		r.s.add("lat_p50", g.setup, math.NaN())
		r.s.add("lat_p99", g.setup, math.NaN())
	} else {
		r.s.add("lat_p50", g.setup, float64(res.P50)/float64(time.Microsecond))
		r.s.add("lat_p99", g.setup, float64(res.P99)/float64(time.Microsecond))
		r.logf("  latency p50 %v p99 %v", res.P50, res.P99)
	}
}

func (r *runner) measureUDP(g *gateway) {
	for _, u := range udpRuns {
		label := fmt.Sprintf("UDP %d Mbit/s", u.rate)
		args := []string{"-u", "-b", fmt.Sprintf("%dM", u.rate), "-l", "1400"}
		receiver := r.tp.Upstream
		if u.reverse {
			label += " -R"
			args = append(args, "-R")
			receiver = r.tp.Client
		}
		if u.window != "" {
			label += " -w " + u.window
			args = append(args, "-w", u.window)
		}
		what := g.setup + " " + label
		// Where the losses go: full receive buffers of the gateway's
		// sockets (tpgw's listener or outbound sockets; none with K, which
		// forwards) and of iperf3's receiving end. The counters are each
		// namespace's, where nothing else receives UDP meanwhile.
		var drops []*udpDrops
		if u.drops[0] != "" {
			drops = []*udpDrops{{key: u.drops[0], ns: r.tp.Gateway}, {key: u.drops[1], ns: receiver}}
		}
		for _, d := range drops {
			if d.before, d.err = udpRcvbufErrors(d.ns); d.err != nil {
				r.fail(what, d.err)
			}
		}
		cpuBefore := g.cpu()
		res, err := r.iperf(args...)
		cpu := g.cpu() - cpuBefore
		if err != nil {
			r.fail(what, err)
			r.s.add(u.key, g.setup, math.NaN())
			continue
		}
		r.s.add(u.key, g.setup, res.LostPercent)
		line := fmt.Sprintf("  %s: %.2f%% lost of %d", label, res.LostPercent, res.Packets)
		if u.cpu != "" {
			r.s.add(u.cpu, g.setup, CPUPerGB(cpu, res.Bytes))
			if !math.IsNaN(cpu) {
				line += fmt.Sprintf(", gateway cpu %.2fs", cpu)
			}
		}
		r.logf("%s", line)
		var counted []string
		for _, d := range drops {
			if d.err != nil {
				continue
			}
			after, err := udpRcvbufErrors(d.ns)
			if err != nil {
				r.fail(what, err)
				continue
			}
			r.s.add(d.key, g.setup, float64(after-d.before))
			counted = append(counted, fmt.Sprintf("%s %d", d.key, after-d.before))
		}
		if len(counted) > 0 {
			r.logf("  %s: dropped at full receive buffers: %s", label, strings.Join(counted, ", "))
		}
	}
}

// udpDrops is one namespace's count of UDP receive-buffer drops around a
// run.
type udpDrops struct {
	key    string
	ns     *testnet.NS
	before int64
	err    error
}

// udpRcvbufErrors is ParseUDPRcvbufErrors of namespace ns's counters, read
// by a thread in ns (/proc/thread-self/net is that thread's namespace's).
// snmp6 is absent from a kernel without IPv6.
func udpRcvbufErrors(ns *testnet.NS) (int64, error) {
	var out []byte
	if err := ns.Do(func() error {
		b, err := os.ReadFile("/proc/thread-self/net/snmp")
		if err != nil {
			return err
		}
		out = b
		if b6, err := os.ReadFile("/proc/thread-self/net/snmp6"); err == nil {
			out = append(out, b6...)
		} else if !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		return nil
	}); err != nil {
		return 0, fmt.Errorf("bench: udp counters of %s: %w", ns.Name, err)
	}
	return ParseUDPRcvbufErrors(string(out))
}

// newNamesPerPass is how many new names one pass asks: a second or more of
// the steady state. A pass of 10000 lasted a quarter of a second here, in
// which the pass's own start (workers, their stacks and the heap growing)
// weighed as much as the rate. The pool has 65k addresses: later passes
// come round its range and reuse addresses, as a gateway that runs for long
// does.
const newNamesPerPass = 50000

// writeQueries writes n distinct A queries for dnsperf, named prefix0...;
// fake-ip answers each from its pool, so no upstream resolver is involved.
func (r *runner) writeQueries(prefix string, n int) string {
	var b strings.Builder
	for i := range n {
		fmt.Fprintf(&b, "%s%d.bench.example A\n", prefix, i)
	}
	p := filepath.Join(r.env.TempDir(), prefix+"queries.txt")
	if err := os.WriteFile(p, []byte(b.String()), 0o644); err != nil {
		r.env.Fatal(err)
	}
	return p
}

func (r *runner) measureDNS(g *gateway) {
	for _, c := range []struct {
		key    string
		ns     *testnet.NS
		server string
		port   string
		extra  []string
	}{
		// One pass over names never asked before: each allocates a fake
		// IP, written to cache.db before its answer leaves.
		{"dns_qps_new", r.tp.Client, r.tp.UpstreamIP.String(), "53", []string{"-n", "1", "-c", "4", "-q", "500", "-T", "1"}},
		// Any server's port 53 from the client: hijacked by the rules.
		{"dns_qps_hijack", r.tp.Client, r.tp.UpstreamIP.String(), "53", []string{"-l", "5", "-c", "4", "-q", "500", "-T", "1"}},
		// The same with two dnsperf threads (and for direct below): one
		// thread is the limit of the figure above on some 2-core hosts, two
		// fight the gateway for the cores on others (see methodNotes).
		{"dns_qps_hijack2", r.tp.Client, r.tp.UpstreamIP.String(), "53", []string{"-l", "5", "-c", "4", "-q", "500", "-T", "2"}},
		// The server itself, from inside the gateway (the input guard keeps
		// LAN clients off port 1053).
		{"dns_qps_direct", r.tp.Gateway, "127.0.0.1", "1053", []string{"-l", "5", "-c", "4", "-q", "500", "-T", "1"}},
		{"dns_qps_direct2", r.tp.Gateway, "127.0.0.1", "1053", []string{"-l", "5", "-c", "4", "-q", "500", "-T", "2"}},
	} {
		queries := r.queries
		if c.key == "dns_qps_new" {
			r.newPasses++
			queries = r.writeQueries(fmt.Sprintf("new%d-", r.newPasses), newNamesPerPass)
		}
		args := append([]string{"-s", c.server, "-p", c.port, "-d", queries, "-t", "2"}, c.extra...)
		before, start := g.cpu(), time.Now()
		out, clientCPU, err := c.ns.RunCPU(r.env, 60*time.Second, "dnsperf", args...)
		cpu, wall := g.cpu()-before, time.Since(start).Seconds()
		res, perr := ParseDNSPerf(out)
		if perr == nil && res.NoError*10 < res.Completed*9 {
			// tpgw answers every one of these names with a fake IP; other
			// answers (dnsmasq's REFUSED) mean the queries missed it.
			perr = fmt.Errorf("bench: only %d of %d dnsperf answers are NOERROR: the queries did not reach tpgw's fake-ip DNS", res.NoError, res.Completed)
		}
		if err != nil || perr != nil {
			r.fail(g.setup+" "+c.key, errors.Join(err, perr))
			r.s.add(c.key, g.setup, math.NaN())
			continue
		}
		r.s.add(c.key, g.setup, res.QPS)
		r.logf("  %s %.0f qps (%d lost, %.2f%%), gateway cpu %.2fs", c.key, res.QPS, res.Lost, res.LostPercent, cpu)
		clientCores, gatewayCores := clientCPU.Seconds()/wall, cpu/wall
		if c.key == "dns_qps_hijack2" {
			r.logf("  hijacked, two dnsperf threads: dnsperf kept %.2f cores busy, the gateway %.2f", clientCores, gatewayCores)
		}
		if c.key != "dns_qps_hijack" {
			continue
		}
		r.s.add("dns_lost_hijack", g.setup, float64(res.Lost))
		r.s.add("dns_client_cores", g.setup, clientCores)
		r.s.add("dns_gateway_cores", g.setup, gatewayCores)
		r.logf("  hijacked: dnsperf kept %.2f cores busy, the gateway %.2f", clientCores, gatewayCores)
		if cpu > 0 && res.Completed > 0 {
			// What the server could answer with a whole core: the figure
			// above is bounded by dnsperf, which shares the 2 cores.
			r.s.add("dns_per_core", g.setup, float64(res.Completed)/cpu)
		}
	}
}

// measureSplice counts the syscalls of the gateway process during a short
// single-stream upload with strace -c (which slows it down: the counts, not
// the throughput, are the result).
func (r *runner) measureSplice(setup string) {
	g, err := r.start(setup)
	if err != nil {
		r.fail("splice check: start "+setup, err)
		return
	}
	defer g.stop()
	var ierr error
	calls, err := CountSyscalls(g.pid, RelaySyscalls, r.env.TempDir(), func() error {
		_, ierr = r.iperf("-t", "3")
		return nil
	})
	if ierr != nil {
		r.fail("splice check: iperf3 "+setup, ierr)
	}
	if err != nil {
		r.fail("splice check: "+setup, err)
		return
	}
	r.splice[setup] = calls
	r.logf("  syscalls: %v", calls)
}

// prepareNamespaces sets the sysctls of the run in tp's namespaces, before
// any socket of the run exists: cc ("" to keep the inherited default) as
// every namespace's TCP congestion control, which a TCP socket takes from its
// namespace when it is made (Options.CC); no TIME_WAIT state; a wide port
// range where connections start. The connection-rate runs open ~100k
// connections a minute, more than a port range holds: a later run reuses
// ports whose last connection is still in TIME_WAIT on the side that closed
// first, and its SYNs stall (1 s retransmits), so each run was slower than
// the one before and a late K run could hang.
func prepareNamespaces(t testing.TB, tp *testnet.Topology, cc string) {
	for _, ns := range []*testnet.NS{tp.Client, tp.Gateway} {
		ns.SetSysctl(t, "net.ipv4.ip_local_port_range", "1024 65000")
	}
	for _, ns := range []*testnet.NS{tp.Client, tp.Gateway, tp.Upstream, tp.Proxy} {
		ns.SetSysctl(t, "net.ipv4.tcp_max_tw_buckets", "0")
		if cc != "" {
			ns.SetSysctl(t, "net.ipv4.tcp_congestion_control", cc)
		}
	}
}

// Machine describes the host the run is on.
func machine(tpgwBin, cc string) Machine {
	m := Machine{Cores: runtime.NumCPU(), Go: runtime.Version(), CPU: "unknown", TPGW: "unknown", HostCC: "unknown"}
	if b, err := os.ReadFile("/proc/sys/net/ipv4/tcp_congestion_control"); err == nil {
		m.HostCC = strings.TrimSpace(string(b))
	}
	m.CC = cc
	if cc == "" {
		m.CC = m.HostCC
	}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		m.Kernel = unix.ByteSliceToString(u.Release[:])
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "model name"); ok {
				m.CPU = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
				break
			}
		}
	}
	if out, err := exec.Command(tpgwBin, "version").Output(); err == nil {
		m.TPGW = strings.TrimSpace(string(out))
	}
	return m
}

// checkCC says why a namespace other than the host's cannot take cc as its
// default congestion control, given the host's
// net.ipv4.tcp_allowed_congestion_control (nil when it can). Reno is always
// allowed; the list is the host's, which the bench does not change.
func checkCC(cc, allowed string) error {
	if cc == "reno" || slices.Contains(strings.Fields(allowed), cc) {
		return nil
	}
	return fmt.Errorf("bench: -cc %s: a namespace other than the host's may only choose from net.ipv4.tcp_allowed_congestion_control (%s)", cc, strings.TrimSpace(allowed))
}

// loadAverage is the 1-minute load average of the host.
func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if f := strings.Fields(string(b)); err == nil && len(f) > 0 {
		return f[0]
	}
	return "unknown"
}
