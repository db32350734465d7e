package bench

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/tpgw/tpgw/internal/testnet"
)

// The peers every setup talks to; the ss values are shared by tpgw's ss
// outbound, ss-redir and the ss-server.
const (
	tproxyPort = 7893
	ssPort     = 8388
	ssPassword = "tpgw-bench-password"
	ssMethod   = "chacha20-ietf-poly1305"
	iperfPort  = 5201
	httpPort   = 8080
	idlePort   = 9100
	startLimit = 30 * time.Second
	stopLimit  = 15 * time.Second
)

// gateway is one running setup in the gateway namespace.
type gateway struct {
	setup string
	pid   int             // the process charged with the gateway's CPU; 0 for K
	procs []*testnet.Proc // stopped in reverse order
	undo  func()          // for K: restores ip_forward
	// output is what the first process printed, once stop has ended it.
	output string
}

// config is the tpgw/mihomo config of the bench: rule decides DIRECT or ss.
// Logs stay at warning so per-flow log lines do not cost CPU in any setup.
func (r *runner) config(rule string, extra ...string) string {
	state := r.env.TempDir()
	rules := "  - " + rule
	for _, x := range extra {
		rules = "  - " + x + "\n" + rules
	}
	return fmt.Sprintf(`mode: rule
log-level: warning
ipv6: true
tproxy-port: %d
dns:
  enable: true
  listen: 0.0.0.0:1053
  enhanced-mode: fake-ip
  fake-ip-range: 198.18.0.1/16
  nameserver:
    - %s
proxies:
  - name: ss
    type: ss
    server: %s
    port: %d
    cipher: %s
    password: %s
    udp: true
rules:
%s
tpgw:
  state-dir: %s
  forward: true
  dns-hijack: true
  dns-bypass: %v
`, tproxyPort, r.tp.UpstreamIP, r.tp.ProxyIP, ssPort, ssMethod, ssPassword, rules, state, len(extra) > 0)
}

func (r *runner) writeConfig(rule string, extra ...string) (string, error) {
	p := filepath.Join(r.env.TempDir(), "config.yaml")
	return p, os.WriteFile(p, []byte(r.config(rule, extra...)), 0o600)
}

// start brings one setup up in the gateway namespace and waits until it serves.
func (r *runner) start(setup string) (*gateway, error) {
	g := &gateway{setup: setup}
	gw := r.tp.Gateway
	switch setup {
	case SetupK, SetupKCT:
		setForward := func(v string) {
			for _, k := range []string{"net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"} {
				gw.SetSysctl(r.env, k, v)
			}
		}
		setForward("1")
		g.undo = func() { setForward("0") }
		if setup == SetupKCT {
			// A ct expression in a table of the namespace turns conntrack
			// on for it: every forwarded packet is then tracked, as
			// behind a stateful firewall.
			if out, err := gw.Run(r.env, 10*time.Second, "nft", kctAdd); err != nil {
				g.stop()
				return nil, fmt.Errorf("bench: start %s: %w\n%s", setup, err, out)
			}
			g.undo = func() {
				if out, err := gw.Run(r.env, 10*time.Second, "nft", "delete", "table", "inet", kctTable); err != nil {
					r.logf("bench: remove %s's table: %v\n%s", setup, err, out)
				}
				setForward("0")
			}
		}
		return g, nil
	case SetupTPGW, SetupTPGWSS, SetupBypass:
		rule := "MATCH,DIRECT"
		var extra []string
		switch setup {
		case SetupTPGWSS:
			rule = "MATCH,ss"
		case SetupBypass:
			rule = "MATCH,ss"
			extra = []string{"DOMAIN-SUFFIX," + bypassDomain + ",DIRECT"}
		}
		cfg, err := r.writeConfig(rule, extra...)
		if err != nil {
			return nil, err
		}
		p := gw.Start(r.env, r.opts.TPGWBin, "run", "-c", cfg)
		g.procs = append(g.procs, p)
		if err := waitOutput(p, "gateway running"); err != nil {
			g.stop()
			return nil, fmt.Errorf("bench: start %s: %w", setup, err)
		}
		g.pid = p.Cmd.Process.Pid
		if setup == SetupBypass {
			if err := r.resolveBypassName(); err != nil {
				g.stop()
				return nil, err
			}
		}
	case SetupMihomo:
		cfg, err := r.writeConfig("MATCH,DIRECT")
		if err != nil {
			return nil, err
		}
		p := gw.Start(r.env, r.opts.HelperBin, "-c", cfg, "-state", r.env.TempDir())
		g.procs = append(g.procs, p)
		if err := waitOutput(p, "running"); err != nil {
			g.stop()
			return nil, fmt.Errorf("bench: start %s: %w", setup, err)
		}
		g.pid = p.Cmd.Process.Pid
	case SetupSSRedir:
		rules := gw.Start(r.env, r.opts.HelperBin, "-rules-only", "-state", r.env.TempDir())
		g.procs = append(g.procs, rules)
		if err := waitOutput(rules, "running"); err != nil {
			g.stop()
			return nil, fmt.Errorf("bench: start rules for %s: %w", setup, err)
		}
		// -T: TPROXY for TCP (the listener gets IP_TRANSPARENT and reads the
		// original destination from getsockname), the same rules as tpgw.
		p := gw.Start(r.env, "ss-redir", "-s", r.tp.ProxyIP.String(), "-p", fmt.Sprint(ssPort),
			"-b", "0.0.0.0", "-l", fmt.Sprint(tproxyPort), "-k", ssPassword, "-m", ssMethod, "-T", "-t", "60")
		g.procs = append(g.procs, p)
		if err := testnet.WaitTCP(gw, fmt.Sprintf("127.0.0.1:%d", tproxyPort), 10*time.Second); err != nil {
			g.stop()
			return nil, fmt.Errorf("bench: start ss-redir: %w\n%s", err, p.Output())
		}
		g.pid = p.Cmd.Process.Pid
	default:
		return nil, fmt.Errorf("bench: unknown setup %q", setup)
	}
	return g, nil
}

// stop ends the setup's processes by PID (SIGTERM, then SIGKILL) in reverse
// order of start, so rule helpers remove their rules last.
func (g *gateway) stop() {
	for i := len(g.procs) - 1; i >= 0; i-- {
		p := g.procs[i]
		if err := p.Signal(syscall.SIGTERM); err == nil {
			if exited, _ := p.Wait(stopLimit); !exited {
				p.Kill()
				p.Wait(stopLimit)
			}
		}
	}
	if len(g.procs) > 0 {
		g.output = g.procs[0].Output()
	}
	g.procs = nil
	if g.undo != nil {
		g.undo()
		g.undo = nil
	}
}

// kctTable holds K+ct's one rule, which kctAdd (one nft command line)
// adds.
const (
	kctTable = "tpgw_bench_ct"
	kctAdd   = "add table inet " + kctTable + "; " +
		"add chain inet " + kctTable + " forward { type filter hook forward priority filter; policy accept; }; " +
		"add rule inet " + kctTable + " forward ct state established,related accept"
)

// waitOutput waits until p prints marker, failing early if p exits.
func waitOutput(p *testnet.Proc, marker string) error {
	deadline := time.Now().Add(startLimit)
	for !strings.Contains(p.Output(), marker) {
		if exited, _ := p.Wait(0); exited {
			return fmt.Errorf("exited during start:\n%s", p.Output())
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no %q within %v:\n%s", marker, startLimit, p.Output())
		}
		time.Sleep(50 * time.Millisecond)
	}
	return nil
}

// bypassDomain is the name the dns-bypass setup resolves: dnsmasq in the
// upstream answers it with the iperf3 server's address.
const bypassDomain = "bench.test"

// bypassName is the record dnsmasq serves.
const bypassName = "iperf." + bypassDomain

// resolveBypassName asks the hijacked DNS for bypassName from the client, as
// an application would before connecting, and checks that the answer is the
// real address (so the address is now in the kernel's bypass set), not a
// fake IP.
func (r *runner) resolveBypassName() error {
	out, err := r.tp.Client.Run(r.env, 10*time.Second, "dig", "+short", "+time=2", "+tries=2", "@"+r.tp.UpstreamIP.String(), bypassName, "A")
	if err != nil {
		return fmt.Errorf("bench: resolve %s: %w", bypassName, err)
	}
	if got := strings.TrimSpace(out); got != r.tp.UpstreamIP.String() {
		return fmt.Errorf("bench: %s resolved to %q, want the real %v (dns-bypass)", bypassName, got, r.tp.UpstreamIP)
	}
	return nil
}
