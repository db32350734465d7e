package bench

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// IperfResult is what the bench takes from `iperf3 -J`.
type IperfResult struct {
	BitsPerSec float64 // received rate over the measured (not omitted) seconds
	// Bytes is the payload moved in every interval, omitted ones included:
	// the gateway spent CPU on those too.
	Bytes       int64
	LostPercent float64 // UDP only
	Packets     int64   // UDP only
}

// ParseIperf reads the JSON report of an iperf3 client run.
func ParseIperf(out []byte, udp bool) (IperfResult, error) {
	var doc struct {
		Error     string `json:"error"`
		Intervals []struct {
			Sum struct {
				Bytes int64 `json:"bytes"`
			} `json:"sum"`
		} `json:"intervals"`
		End struct {
			SumReceived struct {
				BitsPerSec float64 `json:"bits_per_second"`
				Bytes      int64   `json:"bytes"`
			} `json:"sum_received"`
			Sum struct {
				BitsPerSec  float64 `json:"bits_per_second"`
				Bytes       int64   `json:"bytes"`
				LostPercent float64 `json:"lost_percent"`
				Packets     int64   `json:"packets"`
			} `json:"sum"`
		} `json:"end"`
	}
	if err := json.Unmarshal(out, &doc); err != nil {
		return IperfResult{}, fmt.Errorf("bench: iperf3 JSON: %w", err)
	}
	if doc.Error != "" {
		return IperfResult{}, fmt.Errorf("bench: iperf3: %s", doc.Error)
	}
	var r IperfResult
	for _, iv := range doc.Intervals {
		r.Bytes += iv.Sum.Bytes
	}
	if udp {
		s := doc.End.Sum
		r.BitsPerSec, r.LostPercent, r.Packets = s.BitsPerSec*(1-s.LostPercent/100), s.LostPercent, s.Packets
		if r.Bytes == 0 {
			r.Bytes = s.Bytes
		}
	} else {
		r.BitsPerSec = doc.End.SumReceived.BitsPerSec
		if r.Bytes == 0 {
			r.Bytes = doc.End.SumReceived.Bytes
		}
	}
	if r.Bytes == 0 {
		return r, errors.New("bench: iperf3 moved no bytes")
	}
	return r, nil
}

// WrkResult is what the bench takes from `wrk --latency`.
type WrkResult struct {
	RequestsPerSec float64
	P50, P99       time.Duration // zero without --latency
	Errors         int64         // socket errors of all kinds plus non-2xx/3xx responses
}

// ParseWrk reads wrk's text report.
func ParseWrk(out string) (WrkResult, error) {
	var r WrkResult
	found := false
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		f := strings.Fields(line)
		switch {
		case strings.HasPrefix(line, "Requests/sec:") && len(f) == 2:
			v, err := strconv.ParseFloat(f[1], 64)
			if err != nil {
				return r, fmt.Errorf("bench: wrk requests/sec %q: %w", f[1], err)
			}
			r.RequestsPerSec, found = v, true
		case len(f) == 2 && (f[0] == "50%" || f[0] == "99%"):
			d, err := parseWrkDuration(f[1])
			if err != nil {
				return r, err
			}
			if f[0] == "50%" {
				r.P50 = d
			} else {
				r.P99 = d
			}
		case strings.HasPrefix(line, "Socket errors:"):
			// Socket errors: connect 0, read 12, write 0, timeout 0
			for _, part := range strings.Split(strings.TrimPrefix(line, "Socket errors:"), ",") {
				kv := strings.Fields(part)
				if len(kv) == 2 {
					n, _ := strconv.ParseInt(kv[1], 10, 64)
					r.Errors += n
				}
			}
		case strings.HasPrefix(line, "Non-2xx or 3xx responses:") && len(f) == 5:
			n, _ := strconv.ParseInt(f[4], 10, 64)
			r.Errors += n
		}
	}
	if !found {
		return r, errors.New("bench: wrk printed no Requests/sec")
	}
	return r, nil
}

// parseWrkDuration reads wrk's "812.00us", "1.23ms", "2.00s", "1.00m".
func parseWrkDuration(s string) (time.Duration, error) {
	units := []struct {
		suffix string
		unit   time.Duration
	}{{"us", time.Microsecond}, {"ms", time.Millisecond}, {"s", time.Second}, {"m", time.Minute}}
	for _, u := range units {
		if v, ok := strings.CutSuffix(s, u.suffix); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				break
			}
			return time.Duration(f * float64(u.unit)), nil
		}
	}
	return 0, fmt.Errorf("bench: wrk duration %q", s)
}

// DNSPerfResult is what the bench takes from dnsperf.
type DNSPerfResult struct {
	QPS         float64
	LostPercent float64
	Completed   int64 // queries answered
	Lost        int64 // queries not answered within dnsperf's timeout
	NoError     int64 // answers with rcode NOERROR
}

// ParseDNSPerf reads dnsperf's statistics.
func ParseDNSPerf(out string) (DNSPerfResult, error) {
	var r DNSPerfResult
	found := false
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if v, ok := strings.CutPrefix(line, "Queries per second:"); ok {
			q, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err != nil {
				return r, fmt.Errorf("bench: dnsperf qps %q: %w", v, err)
			}
			r.QPS, found = q, true
		}
		// Queries completed:    3881 (99.69%)
		if v, ok := strings.CutPrefix(line, "Queries completed:"); ok {
			if f := strings.Fields(v); len(f) > 0 {
				r.Completed, _ = strconv.ParseInt(f[0], 10, 64)
			}
		}
		// Response codes:       NOERROR 3881 (100.00%), NXDOMAIN 3 (0.01%)
		if v, ok := strings.CutPrefix(line, "Response codes:"); ok {
			if _, after, ok := strings.Cut(v, "NOERROR "); ok {
				if f := strings.Fields(after); len(f) > 0 {
					r.NoError, _ = strconv.ParseInt(f[0], 10, 64)
				}
			}
		}
		// Queries lost:         12 (0.01%)
		if v, ok := strings.CutPrefix(line, "Queries lost:"); ok {
			if f := strings.Fields(v); len(f) > 0 {
				r.Lost, _ = strconv.ParseInt(f[0], 10, 64)
			}
			if i, j := strings.IndexByte(v, '('), strings.IndexByte(v, '%'); i >= 0 && j > i {
				r.LostPercent, _ = strconv.ParseFloat(v[i+1:j], 64)
			}
		}
	}
	if !found {
		return r, errors.New("bench: dnsperf printed no queries per second")
	}
	return r, nil
}

// ParseStraceSummary reads the table of `strace -c` into calls per syscall.
func ParseStraceSummary(out string) (map[string]int64, error) {
	calls := map[string]int64{}
	inTable := false
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		line := sc.Text()
		f := strings.Fields(line)
		switch {
		case len(f) >= 2 && f[0] == "%" && f[1] == "time":
			inTable = true
		case !inTable || strings.HasPrefix(line, "---") || len(f) < 5:
		case f[len(f)-1] == "total":
			inTable = false
		default:
			// % time, seconds, usecs/call, calls, [errors], syscall
			n, err := strconv.ParseInt(f[3], 10, 64)
			if err != nil {
				return nil, fmt.Errorf("bench: strace summary line %q", line)
			}
			calls[f[len(f)-1]] += n
		}
	}
	if !inTable && len(calls) == 0 && !strings.Contains(out, "% time") {
		return nil, errors.New("bench: no strace -c summary")
	}
	return calls, nil
}

// ParseUDPRcvbufErrors sums the UDP datagrams a namespace's kernel dropped
// because a socket's receive buffer was full: Udp's RcvbufErrors in
// /proc/net/snmp (a header line of names, then one of values) and
// Udp6RcvbufErrors in /proc/net/snmp6, given one after the other in out.
func ParseUDPRcvbufErrors(out string) (int64, error) {
	var sum int64
	found := false
	var header []string
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		switch {
		case len(f) == 0:
		case f[0] == "Udp:" && header == nil:
			header = f
		case f[0] == "Udp:":
			if len(f) != len(header) {
				return 0, fmt.Errorf("bench: /proc/net/snmp: Udp has %d names and %d values", len(header), len(f))
			}
			i := indexOf(header, "RcvbufErrors")
			if i < 0 {
				return 0, errors.New("bench: /proc/net/snmp: no Udp RcvbufErrors")
			}
			n, err := strconv.ParseInt(f[i], 10, 64)
			if err != nil {
				return 0, fmt.Errorf("bench: /proc/net/snmp: Udp RcvbufErrors %q: %w", f[i], err)
			}
			sum, found = sum+n, true
			header = nil
		case f[0] == "Udp6RcvbufErrors" && len(f) == 2:
			n, err := strconv.ParseInt(f[1], 10, 64)
			if err != nil {
				return 0, fmt.Errorf("bench: /proc/net/snmp6: Udp6RcvbufErrors %q: %w", f[1], err)
			}
			sum += n
		}
	}
	if !found {
		return 0, errors.New("bench: /proc/net/snmp has no Udp counters")
	}
	return sum, nil
}

// udpDropsMsg is the message of tpgw's log line on the datagrams it dropped
// (cmd/tpgw, logUDPDrops), whose total= is the count since it started.
const udpDropsMsg = `msg="UDP datagrams dropped in the gateway since the last report"`

// udpHeldMsg is the message of tpgw's line, at its stop, on the datagrams
// its relay held until mihomo's sender of their session had room
// (cmd/tpgw, logUDPHeld).
const udpHeldMsg = `msg="UDP datagrams held until their session's sender had room"`

// UDPDropsLog is what a stopped tpgw run logged about the datagrams it
// dropped itself.
type UDPDropsLog struct {
	Total     int64 // since it started: the total= of its last drop line (0 without one)
	QueueFull int64 // of those: mihomo's worker queue full (the lines' queue_full= summed)
	Unsent    int64 // released by mihomo unsent (unsent= summed)
	Held      int64 // held until their session's sender had room (held=)
	GaveUp    int64 // of those: none within tpgw's wait (gave_up=)
	// Complete: its stop was logged to the end ("kernel rules removed",
	// which comes after the last drop line), so a missing line means none
	// were dropped.
	Complete bool
}

// ParseUDPDropsLog reads the output of a tpgw run that has stopped.
func ParseUDPDropsLog(out string) UDPDropsLog {
	var d UDPDropsLog
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		drops, held := strings.Contains(line, udpDropsMsg), strings.Contains(line, udpHeldMsg)
		if !drops && !held {
			continue
		}
		for _, f := range strings.Fields(line) {
			k, v, ok := strings.Cut(f, "=")
			if !ok {
				continue
			}
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				continue
			}
			switch {
			case drops && k == "total":
				d.Total = n
			case drops && k == "queue_full":
				d.QueueFull += n
			case drops && k == "unsent":
				d.Unsent += n
			case held && k == "held":
				d.Held = n
			case held && k == "gave_up":
				d.GaveUp = n
			}
		}
	}
	d.Complete = strings.Contains(out, "kernel rules removed")
	return d
}
