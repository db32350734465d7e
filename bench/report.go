package bench

import (
	"encoding/json"
	"fmt"
	"html"
	"math"
	"strings"
)

// Setups, in the order of the table's columns.
const (
	SetupK = "K"
	// SetupKCT is K with conntrack on (one stateful forward rule), as on a
	// router with a stateful firewall (OpenWrt's fw4): the reference for
	// what dns-bypass pays per packet beyond K. Only the TCP figures.
	SetupKCT     = "K+ct"
	SetupTPGW    = "tpgw"
	SetupMihomo  = "mihomo-tproxy"
	SetupTPGWSS  = "tpgw ss"
	SetupSSRedir = "ss-redir"
	// SetupBypass is tpgw with tpgw.dns-bypass: the client resolves a name
	// whose rule is DIRECT, gets its real address, and the flow to it is
	// forwarded by the kernel (MATCH sends everything else to ss).
	SetupBypass = "tpgw dns-bypass"
)

// Setups lists every setup in column order.
var Setups = []string{SetupK, SetupKCT, SetupTPGW, SetupMihomo, SetupTPGWSS, SetupSSRedir, SetupBypass}

// Report is one benchmark run.
type Report struct {
	Machine  Machine `json:"machine"`
	Started  string  `json:"started"` // RFC 3339
	Duration string  `json:"duration"`
	Reps     int     `json:"repetitions"`
	// Load is /proc/loadavg's 1-minute average at the start and the end:
	// other work on the host competes for the same cores.
	Load    [2]string `json:"load"`
	Figures []Figure  `json:"figures"`
	// Notes explain methods; NotMeasured lists what the run could not measure.
	Notes       []string `json:"notes,omitempty"`
	NotMeasured []string `json:"not_measured,omitempty"`
}

// Machine is where the run happened.
type Machine struct {
	Kernel string `json:"kernel"`
	CPU    string `json:"cpu"`
	Cores  int    `json:"cores"`
	Go     string `json:"go"`
	TPGW   string `json:"tpgw"`
	// CC is the TCP congestion control in the bench's namespaces, HostCC
	// the host's default (which new namespaces inherit unless CC is set).
	CC     string `json:"tcp_congestion_control"`
	HostCC string `json:"host_tcp_congestion_control"`
}

// Figure is one row of the table: a median per setup and the targets it is
// checked against.
type Figure struct {
	Key    string            `json:"key"`
	Name   string            `json:"name"`
	Unit   string            `json:"unit"`
	Values map[string]*Value `json:"values"`
	Checks []Check           `json:"checks,omitempty"`
}

// Value is the median of the runs of one setup; Median is null in JSON when
// every run failed.
type Value struct {
	Median JSONFloat   `json:"median"`
	Runs   []JSONFloat `json:"runs"`
}

// Check is one target of issue 5 and whether the run met it (by the
// medians). A ratio check also gives the ratio within each repetition,
// whose setups ran side by side: on a noisy host it shows whether a miss
// (or a hit) held in every repetition.
type Check struct {
	Target string      `json:"target"`
	Actual string      `json:"actual"`
	Met    bool        `json:"met"`
	PerRep []JSONFloat `json:"per_repetition,omitempty"`
}

// JSONFloat is a float64 that encodes NaN and ±Inf as null.
type JSONFloat float64

// MarshalJSON implements json.Marshaler.
func (f JSONFloat) MarshalJSON() ([]byte, error) {
	v := float64(f)
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return []byte("null"), nil
	}
	return json.Marshal(v)
}

// UnmarshalJSON implements json.Unmarshaler.
func (f *JSONFloat) UnmarshalJSON(b []byte) error {
	if string(b) == "null" {
		*f = JSONFloat(math.NaN())
		return nil
	}
	var v float64
	err := json.Unmarshal(b, &v)
	*f = JSONFloat(v)
	return err
}

// Figure returns the figure with key, or nil.
func (r *Report) Figure(key string) *Figure {
	for i := range r.Figures {
		if r.Figures[i].Key == key {
			return &r.Figures[i]
		}
	}
	return nil
}

// Median returns the median of setup, NaN when absent.
func (f *Figure) Median(setup string) float64 {
	if f == nil || f.Values[setup] == nil {
		return math.NaN()
	}
	return float64(f.Values[setup].Median)
}

func newValue(runs []float64) *Value {
	v := &Value{Median: JSONFloat(Median(runs))}
	for _, r := range runs {
		v.Runs = append(v.Runs, JSONFloat(r))
	}
	return v
}

// JSON returns the report as indented JSON.
func (r *Report) JSON() ([]byte, error) {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// formatValue prints a median with about three significant digits.
func formatValue(v float64) string {
	switch a := math.Abs(v); {
	case math.IsNaN(v):
		return "n/a"
	case a >= 100 || v == math.Trunc(v):
		return fmt.Sprintf("%.0f", v)
	case a >= 10:
		return fmt.Sprintf("%.1f", v)
	case a >= 0.1:
		return fmt.Sprintf("%.2f", v)
	default:
		return fmt.Sprintf("%.3f", v)
	}
}

// Markdown renders the table: one row per figure, one column per setup, and
// each target of issue 5 with the measured ratio and ✓ or ✗.
func (r *Report) Markdown() string {
	var b strings.Builder
	fmt.Fprintf(&b, "Machine: kernel %s, %s, %d cores; %s; tpgw %s; TCP congestion control %s (the host's default: %s).  \n",
		r.Machine.Kernel, r.Machine.CPU, r.Machine.Cores, r.Machine.Go, r.Machine.TPGW, r.Machine.CC, r.Machine.HostCC)
	fmt.Fprintf(&b, "Run: %s, %d interleaved repetitions (medians), %s; host load average %s at the start, %s at the end.\n\n",
		r.Started, r.Reps, r.Duration, r.Load[0], r.Load[1])
	b.WriteString("| Figure | Unit |")
	for _, s := range Setups {
		fmt.Fprintf(&b, " %s |", s)
	}
	b.WriteString(" Target (measured) | Met |\n|---|---|")
	for range Setups {
		b.WriteString("---:|")
	}
	b.WriteString("---|---|\n")
	for _, f := range r.Figures {
		fmt.Fprintf(&b, "| %s | %s |", f.Name, f.Unit)
		for _, s := range Setups {
			cell := "–"
			if v := f.Values[s]; v != nil {
				cell = formatValue(float64(v.Median))
			}
			fmt.Fprintf(&b, " %s |", cell)
		}
		var targets, met []string
		for _, c := range f.Checks {
			actual := c.Actual
			if len(c.PerRep) > 1 {
				actual += "; reps " + formatRatios(c.PerRep)
			}
			targets = append(targets, fmt.Sprintf("%s (%s)", c.Target, actual))
			if c.Met {
				met = append(met, "✓")
			} else {
				met = append(met, "✗")
			}
		}
		if len(targets) == 0 {
			targets, met = []string{"reported"}, []string{""}
		}
		fmt.Fprintf(&b, " %s | %s |\n", strings.Join(targets, "; "), strings.Join(met, " "))
	}
	b.WriteString("\n– = not applicable to that setup; n/a = could not be measured.\n")
	if len(r.Notes) > 0 {
		b.WriteString("\nNotes:\n\n")
		for _, n := range r.Notes {
			fmt.Fprintf(&b, "- %s\n", n)
		}
	}
	if len(r.NotMeasured) > 0 {
		b.WriteString("\nNot measured:\n\n")
		for _, n := range r.NotMeasured {
			fmt.Fprintf(&b, "- %s\n", n)
		}
	}
	return b.String()
}

// ratioCheck compares the medians of two setups (or two figures):
// num/den ≥ want (atLeast) or ≤ want.
func ratioCheck(target string, num, den, want float64, atLeast bool) Check {
	r := num / den
	if math.IsNaN(r) || math.IsInf(r, 0) {
		return Check{Target: target, Actual: "not measured"}
	}
	met := r >= want
	if !atLeast {
		met = r <= want
	}
	return Check{Target: target, Actual: fmt.Sprintf("%.2f×", r), Met: met}
}

// withPerRep adds to c the ratio num[i]/den[i] of each repetition, when
// both setups have one run per repetition (a failed start leaves some
// figures without a run, and then the runs cannot be paired).
func withPerRep(c Check, num, den *Value, reps int) Check {
	if num == nil || den == nil || len(num.Runs) != reps || len(den.Runs) != reps || c.Actual == "not measured" {
		return c
	}
	for i := range reps {
		c.PerRep = append(c.PerRep, JSONFloat(float64(num.Runs[i])/float64(den.Runs[i])))
	}
	return c
}

// formatRatios renders per-repetition ratios as "1.10/0.81/1.00" ("n/a"
// for a failed run).
func formatRatios(rs []JSONFloat) string {
	parts := make([]string, len(rs))
	for i, r := range rs {
		if v := float64(r); math.IsNaN(v) || math.IsInf(v, 0) {
			parts[i] = "n/a"
		} else {
			parts[i] = fmt.Sprintf("%.2f", v)
		}
	}
	return strings.Join(parts, "/")
}

// limitCheck compares one median with an absolute limit.
func limitCheck(target string, v, limit float64, atLeast bool, format string) Check {
	if math.IsNaN(v) {
		return Check{Target: target, Actual: "not measured"}
	}
	met := v >= limit
	if !atLeast {
		met = v <= limit
	}
	return Check{Target: target, Actual: fmt.Sprintf(format, v), Met: met}
}

// SVG draws the TCP throughput figures as grouped bars, each setup relative
// to K (K = 1.0), with the 0.9 target of a single DIRECT stream marked.
func (r *Report) SVG(keys []string) string {
	const (
		width, height = 920, 360
		left, right   = 60, 20
		top, bottom   = 40, 90
	)
	colors := map[string]string{
		SetupK: "#777777", SetupKCT: "#bbbbbb", SetupTPGW: "#1f77b4", SetupMihomo: "#ff7f0e", SetupTPGWSS: "#2ca02c", SetupSSRedir: "#d62728", SetupBypass: "#9467bd",
	}
	type bar struct {
		setup string
		ratio float64
	}
	var groups [][]bar
	var names []string
	maxRatio := 1.2
	for _, k := range keys {
		f := r.Figure(k)
		if f == nil {
			continue
		}
		base := f.Median(SetupK)
		var g []bar
		for _, s := range Setups {
			v := f.Median(s) / base
			if math.IsNaN(v) || math.IsInf(v, 0) {
				continue
			}
			g = append(g, bar{s, v})
			maxRatio = math.Max(maxRatio, v*1.1)
		}
		groups = append(groups, g)
		names = append(names, f.Name)
	}
	plotW, plotH := float64(width-left-right), float64(height-top-bottom)
	y := func(v float64) float64 { return float64(top) + plotH*(1-v/maxRatio) }
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n", width, height, width, height)
	fmt.Fprintf(&b, `<rect width="%d" height="%d" fill="white"/>`+"\n", width, height)
	fmt.Fprintf(&b, `<text x="%d" y="20" font-size="14">TCP throughput relative to kernel forwarding (K = 1.0), iperf3 medians — %s</text>`+"\n", left, html.EscapeString(r.Machine.Kernel))
	for _, t := range []float64{0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 3} {
		if t > maxRatio {
			break
		}
		fmt.Fprintf(&b, `<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#dddddd"/><text x="%d" y="%.1f" text-anchor="end">%.2f</text>`+"\n",
			left, width-right, y(t), y(t), left-6, y(t)+4, t)
	}
	fmt.Fprintf(&b, `<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#1f77b4" stroke-dasharray="4 3"/><text x="%d" y="%.1f" fill="#1f77b4" text-anchor="end">0.9 target</text>`+"\n",
		left, width-right, y(0.9), y(0.9), width-right, y(0.9)-3)
	if len(groups) > 0 {
		groupW := plotW / float64(len(groups))
		for i, g := range groups {
			x0 := float64(left) + groupW*float64(i) + groupW*0.1
			barW := groupW * 0.8 / float64(len(Setups))
			for _, br := range g {
				j := indexOf(Setups, br.setup)
				x := x0 + barW*float64(j)
				fmt.Fprintf(&b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"><title>%s: %.2f</title></rect>`+"\n",
					x, y(br.ratio), barW*0.9, y(0)-y(br.ratio), colors[br.setup], html.EscapeString(br.setup), br.ratio)
				fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle" font-size="9">%.2f</text>`+"\n", x+barW*0.45, y(br.ratio)-3, br.ratio)
			}
			fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle">%s</text>`+"\n", x0+groupW*0.4, y(0)+16, html.EscapeString(names[i]))
		}
	}
	lx := float64(left)
	for _, s := range Setups {
		fmt.Fprintf(&b, `<rect x="%.1f" y="%d" width="12" height="12" fill="%s"/><text x="%.1f" y="%d">%s</text>`+"\n",
			lx, height-30, colors[s], lx+16, height-20, html.EscapeString(s))
		lx += 120
	}
	b.WriteString("</svg>\n")
	return b.String()
}

func indexOf(xs []string, s string) int {
	for i, x := range xs {
		if x == s {
			return i
		}
	}
	return -1
}
