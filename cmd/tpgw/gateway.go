package main

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tpgw/tpgw/config"
	"github.com/tpgw/tpgw/dns"
	"github.com/tpgw/tpgw/engine"
	"github.com/tpgw/tpgw/netcfg"
	"github.com/tpgw/tpgw/relay"
)

// The DNS server's UDP reader answers fake IPs itself (dns.InstantEngine),
// also with dns-bypass on (dns.BypassChecker).
var (
	_ dns.InstantEngine = (*engine.Engine)(nil)
	_ dns.BypassChecker = (*engine.Engine)(nil)
)

// netcfgOptions maps the config onto what netcfg needs.
func netcfgOptions(c *config.Config) netcfg.Options {
	g := c.Gateway
	o := netcfg.Options{
		Interfaces:  g.Interfaces,
		Mark:        g.Mark,
		Table:       g.Table,
		RoutingMark: c.RoutingMark,
		TProxyPort:  c.TProxyPort,
		Bypass:      g.Bypass,
		BypassSrc:   g.BypassSrc,
		IPv6:        g.IPv6 && c.IPv6,
		Forward:     g.Forward,
		OnFailure:   g.OnFailure,
		ProxySelf:   g.ProxySelf,
		DNSBypass:   g.DNSBypass,
	}
	if c.DNS.FakeIP() {
		o.FakeIPRange = c.DNS.FakeIPRange.Masked()
		if c.DNS.FakeIPRange6.IsValid() {
			o.FakeIPRange6 = c.DNS.FakeIPRange6.Masked()
		}
	}
	if c.DNS.Enable && g.DNSHijack {
		o.DNSPort = c.DNS.Listen.Port()
		o.DNSAddr = c.DNS.Listen.Addr()
	}
	return o
}

// hostPlan is the plan to install on this host, for a start or a reload:
// the config's, with IPv6 as the host has it (fitIPv6), after a warning about
// interfaces the host lacks.
func hostPlan(c *config.Config, log *slog.Logger) (*netcfg.Plan, error) {
	opts := netcfgOptions(c)
	if err := fitIPv6(&opts, log); err != nil {
		return nil, err
	}
	warnMissingInterfaces(c.Gateway.Interfaces, log)
	warnIPv6Off(c, log)
	warnNotIntercepted(opts, log)
	warnDNSFamily(opts, log)
	warnFakeIPOverlap(opts, log)
	warnMarkRulesAhead(opts, log)
	return netcfg.BuildPlan(opts)
}

// warnMarkRulesAhead warns about ip rules of the host that route the packets
// tpgw marks before its own rule does (mwan3 on OpenWrt with two WANs marks
// with 0x3f00): the diverted packets would never reach the relay.
func warnMarkRulesAhead(o netcfg.Options, log *slog.Logger) {
	rules, err := netcfg.MarkRulesAhead(o.Mark)
	if err != nil {
		log.Debug("cannot list the host's ip rules", "err", err)
		return
	}
	if len(rules) > 0 {
		log.Warn(fmt.Sprintf("ip rules before tpgw's (priority %d) match its mark %#x: the packets it diverts would follow them, not reach tpgw; pick a tpgw.mark they do not match", netcfg.RulePriority, o.Mark),
			"key", "tpgw.mark", "rules", strings.Join(rules, "; "))
	}
}

// warnFakeIPOverlap warns when a network of this host lies in the fake-ip
// range: tpgw intercepts that range ahead of every bypass, and mihomo takes
// a destination in it for a fake IP, which maps to no name, so the flows of
// the LAN to that network's hosts fail.
func warnFakeIPOverlap(o netcfg.Options, log *slog.Logger) {
	nets, err := netcfg.NetworksOverlapping(o.FakeIPRange, o.FakeIPRange6)
	if err != nil {
		log.Debug("cannot list the host's networks", "err", err)
		return
	}
	for _, n := range nets {
		key, fake := "dns.fake-ip-range", o.FakeIPRange
		if n.Prefix.Addr().Is6() {
			key, fake = "dns.fake-ip-range6", o.FakeIPRange6
		}
		log.Warn(key+" overlaps a network of this host: flows to its hosts are intercepted and taken for fake IPs, which map to no name, so they fail; "+
			"pick a range that no network here uses", "key", key, "range", fake, "network", n.Iface+":"+n.Prefix.String())
	}
}

// warnIPv6Off warns when mihomo's ipv6: false turns tpgw's IPv6
// interception off with it (the engine would not dial IPv6 for the flows):
// the LAN's IPv6 flows are then not intercepted, nor dropped with
// on-failure: closed, and leave unproxied wherever the host routes IPv6.
func warnIPv6Off(c *config.Config, log *slog.Logger) {
	if c.Gateway.IPv6 && !c.IPv6 {
		log.Warn("ipv6: false turns tpgw's IPv6 interception off: the LAN's IPv6 flows are not intercepted and leave unproxied where this host routes IPv6; set tpgw.ipv6: false to say it is meant", "key", "ipv6")
	}
}

// warnNotIntercepted warns about the host's global IPv6 networks that a
// plan with no tpgw.interfaces leaves alone (netcfg.NotIntercepted): a LAN
// numbered from the ISP's prefix would send its IPv6 flows out unproxied.
func warnNotIntercepted(o netcfg.Options, log *slog.Logger) {
	nets, err := netcfg.NotIntercepted(o)
	if err != nil {
		log.Debug("cannot list the host's networks", "err", err)
		return
	}
	if len(nets) == 0 {
		return
	}
	var list []string
	for _, n := range nets {
		list = append(list, n.Iface+":"+n.Prefix.String())
	}
	log.Warn("tpgw.interfaces is empty, so only flows from LAN sources (private, ULA and link-local addresses) are intercepted: "+
		"IPv6 clients numbered from these global prefixes are not, and their IPv6 flows leave unproxied; if they are LAN clients, "+
		"list their interfaces in tpgw.interfaces", "key", "tpgw.interfaces", "networks", strings.Join(list, ","))
}

// warnDNSFamily warns when the DNS server listens on one address of one
// family (dns.listen: 127.0.0.1:1053) while tpgw intercepts both: hijacked
// queries of that family are handed to it, the other family's are not
// hijacked, for want of a socket (they go out as they are, through the
// relay).
func warnDNSFamily(o netcfg.Options, log *slog.Logger) {
	a := o.DNSAddr.Unmap()
	if o.DNSPort == 0 || !a.IsValid() || a.IsUnspecified() || !o.IPv6 {
		return
	}
	other := "IPv6"
	if a.Is6() {
		other = "IPv4"
	}
	log.Warn("dns.listen is one address: the LAN's DNS queries over "+other+" are not hijacked (no socket of tpgw's listens for them); listen on [::] to take both, tpgw's input guard still keeps the WAN out",
		"key", "dns.listen", "listen", netip.AddrPortFrom(a, o.DNSPort))
}

// fitIPv6 matches the plan's IPv6 to what the host has. tpgw diverts IPv6
// flows through a local route on lo, which the kernel refuses while lo has
// IPv6 disabled: the start failed with "permission denied". With IPv6 off on
// every interface (a common setting) no IPv6 flow can pass, so tpgw
// intercepts IPv4 only and says so. With it on elsewhere, IPv6 flows would
// pass unproxied: the start fails and names the setting.
func fitIPv6(o *netcfg.Options, log *slog.Logger) error {
	if !o.IPv6 {
		return nil
	}
	h, err := netcfg.ProbeIPv6()
	if err != nil {
		return fmt.Errorf("netcfg: IPv6 settings: %w", err)
	}
	switch {
	case !h.Kernel:
		log.Info("IPv6: this kernel has none (booted with ipv6.disable=1); intercepting IPv4 only")
	case !h.LoDisabled:
		return nil
	case len(h.Enabled) == 0:
		log.Info("IPv6 is disabled on every interface (net.ipv6.conf.*.disable_ipv6=1); intercepting IPv4 only")
	default:
		return fmt.Errorf("IPv6 is disabled on lo (net.ipv6.conf.lo.disable_ipv6=1) but on for %s: "+
			"tpgw diverts IPv6 flows through a local route on lo, so they would pass unproxied; "+
			"set net.ipv6.conf.lo.disable_ipv6=0, or ipv6: false (or tpgw.ipv6: false) to leave IPv6 alone",
			strings.Join(h.Enabled, ", "))
	}
	o.IPv6 = false
	return nil
}

// warnMissingInterfaces names the tpgw.interfaces that are not on this host.
// The rules match interface names, so one that appears later (a bridge, a
// PPP link, a Wi-Fi device) is intercepted from then on. But a typo let the
// LAN's flows pass unproxied without a word.
func warnMissingInterfaces(names []string, log *slog.Logger) {
	var missing []string
	for _, name := range names {
		if _, err := net.InterfaceByName(name); err != nil {
			missing = append(missing, name)
		}
	}
	if len(missing) == 0 {
		return
	}
	var here []string
	if ifs, err := net.Interfaces(); err == nil {
		for _, i := range ifs {
			if i.Flags&net.FlagLoopback == 0 {
				here = append(here, i.Name)
			}
		}
	}
	log.Warn("tpgw.interfaces: not on this host (yet); flows arriving on them are intercepted once they exist, "+
		"flows on other interfaces are not", "missing", strings.Join(missing, ","), "interfaces_here", strings.Join(here, ","))
}

// stateDir is where netcfg records the sysctl values it changed, one file
// per network namespace (sysctls under /proc/sys/net are per namespace, and
// several gateways may run on one host in different namespaces).
func stateDir(base string) string {
	if base == "" {
		base = config.DefaultStateDir
	}
	id := "unknown"
	if fi, err := os.Stat("/proc/self/ns/net"); err == nil {
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			id = strconv.FormatUint(st.Ino, 10)
		}
	}
	return filepath.Join(base, "netns-"+id)
}

// stateDirWritable tells, before anything starts, whether the state
// directory can be written. A start that found out only when it wrote its
// sysctl record had started the engine and the listeners already; and under
// the systemd unit (ProtectSystem=strict) only /etc/tpgw and /run/tpgw can
// be written.
func stateDirWritable(c *config.Config) error {
	dir := c.Gateway.StateDir
	if dir == "" {
		dir = config.DefaultStateDir
	}
	fail := func(format string, args ...any) error {
		return &config.Error{File: c.Path, Line: c.Gateway.StateDirLine, Key: "tpgw.state-dir", Msg: fmt.Sprintf(format, args...)}
	}
	// The nearest directory that exists is where a start creates the rest.
	probe := dir
	for {
		fi, err := os.Stat(probe)
		if err == nil {
			if !fi.IsDir() {
				return fail("%s cannot be made a directory: %s is a file", dir, probe)
			}
			break
		}
		parent := filepath.Dir(probe)
		if (!errors.Is(err, fs.ErrNotExist) && !errors.Is(err, unix.ENOTDIR)) || parent == probe {
			return fail("%s: %v", dir, err)
		}
		probe = parent
	}
	err := unix.Access(probe, unix.W_OK)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.EROFS):
		return fail("%s cannot be written: %s is on a read-only file system (under the systemd unit, ProtectSystem=strict leaves only /etc/tpgw and /run/tpgw writable: use one of those, or add it to ReadWritePaths)", dir, probe)
	default:
		return fail("%s cannot be written: %s: %v", dir, probe, err)
	}
}

// gateway is a running tpgw: the engine, the listeners and the kernel rules.
type gateway struct {
	cfg       *config.Config
	eng       *engine.Engine
	installed *netcfg.Installed
	bypass    *dns.Bypass // nil unless tpgw.dns-bypass
	dns       *dns.Server // nil unless the mihomo dns block is enabled
	ping      *pinger     // answers pings to the IPv4 fake-ip range
	log       *slog.Logger
	verifyErr string // the last error of verifyRules, logged once
	// inputs is the engine's DecisionInputs as last seen, and inputsMoved
	// says it changed then (watchDecisionInputs).
	inputs      string
	inputsMoved bool
	udpDrops    engine.UDPDrops // the engine's drop counts when last logged
}

func runGateway(o cmdOpts) (err error) {
	// SIGHUP is caught from the first moment: a reload (from systemd or a
	// script) that arrived while tpgw was starting would otherwise kill it,
	// SIGHUP's default action. The main loop below handles it once the
	// gateway runs. SIGTERM and SIGINT keep their default until just before
	// the kernel rules go in, so a start that hangs (a provider download)
	// can still be stopped; from then on they stop the gateway in order.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGHUP)
	defer signal.Stop(sigs)
	c, err := config.Load(o.configPath)
	if err != nil {
		return err
	}
	if err := requirePrivileges(); err != nil {
		return err
	}
	if err := stateDirWritable(c); err != nil {
		return err
	}
	log := o.log
	// Before anything that touches the kernel, even the backend probe.
	lock, err := holdGateway(log)
	if err != nil {
		return err
	}
	defer lock.Close()
	plan, err := hostPlan(c, log)
	if err != nil {
		return err
	}
	if err := engine.Check(c.Raw, c.Dir()); err != nil {
		return err
	}
	backend, why, err := backendFor(c, log)
	if err != nil {
		return err
	}
	log.Info("starting", "config", o.configPath, "version", version, "backend", backend.Name(), "why", why,
		"on_failure", c.Gateway.OnFailure, "on_failure_means", failureMeaning(c.Gateway.OnFailure),
		"tproxy_port", c.TProxyPort, "mark", c.Gateway.Mark, "table", c.Gateway.Table, "proxy_self", c.Gateway.ProxySelf,
		"ipv6", plan.Options.IPv6)

	// Start-up order: engine, listeners, then kernel rules, so that a failure
	// before the last step has installed nothing; shutdown is the reverse,
	// except that the relayed TCP flows are reset before the rules go.
	// The external-controller's reload and mode switches run on the main
	// loop below, like SIGHUP, once the gateway is running.
	requests := make(chan func())
	onLoop := func(fn func()) error {
		done := make(chan struct{})
		select {
		case requests <- func() { fn(); close(done) }:
		case <-time.After(10 * time.Second):
			return errors.New("tpgw is starting or stopping")
		}
		<-done
		return nil
	}
	var gw *gateway
	hooks := engine.ControllerHooks{
		Reload: func() error {
			var rerr error
			if err := onLoop(func() { rerr = gw.reloadLogged(o.configPath, "external-controller") }); err != nil {
				return err
			}
			return rerr
		},
		DecisionsChanged: func() {
			if err := onLoop(func() { gw.decisionsChanged("external-controller: mode, sniffing or a rule changed") }); err != nil {
				log.Warn("external-controller: mode, sniffing or a rule changed while tpgw is not running", "err", err)
			}
		},
	}
	eng, err := engine.Start(c.Raw, engine.Options{HomeDir: c.Dir(), RoutingMark: c.RoutingMark, Logger: log, Controller: hooks,
		StateDir: stateDir(c.Gateway.StateDir)})
	if err != nil {
		return err
	}
	defer eng.Close()

	tcp, err := relay.ListenTCP(fmt.Sprintf(":%d", c.TProxyPort), eng, log)
	if err != nil {
		return err
	}
	eng.SetInboundAddr(tcp.Addr())
	serveErr := make(chan error, 3)
	go func() { serveErr <- tcp.Serve() }()
	defer tcp.Close()

	udp, err := relay.ListenUDP(fmt.Sprintf(":%d", c.TProxyPort), eng,
		relay.UDPOptions{IdleTimeout: c.Gateway.UDPTimeout, MaxSessions: c.Gateway.UDPMaxSessions}, log)
	if err != nil {
		return err
	}
	go func() { serveErr <- udp.Serve() }()
	defer udp.Close()

	var bypass *dns.Bypass
	var bypassSet lateBypassSet
	var dnsEngine dns.Engine = eng
	if c.Gateway.DNSBypass {
		bypass = dns.NewBypass(eng, eng, &bypassSet, log)
		dnsEngine = bypass
	}
	var dnsSrv *dns.Server
	if c.DNS.Enable {
		srv, err := dns.Listen(c.DNS.Listen, dnsEngine, log)
		if err != nil {
			return err
		}
		dnsSrv = srv
		// Names only the LAN knows go to the server the client asked.
		srv.ForwardLocalNames(c.RoutingMark, eng.InHosts)
		go func() { serveErr <- srv.Serve() }()
		defer srv.Close()
		log.Info("dns server", "listen", srv.Addr().String(), "mode", c.DNS.EnhancedMode, "hijack", c.Gateway.DNSHijack)
	} else if c.Gateway.DNSHijack {
		log.Warn("tpgw.dns-hijack is on but the mihomo dns block is not enabled: client DNS is not hijacked")
	}

	ping := &pinger{log: log}
	ping.sync(plan.Options.FakeIPRange)
	defer ping.close()

	// With on-failure open, a watchdog outside this process removes the
	// divert rules if tpgw dies, so LAN traffic flows directly. It starts
	// before the rules go in, so there is no moment with rules and no watchdog.
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	var wd *watchdog
	if c.Gateway.OnFailure == config.FailOpen {
		wd, err = startWatchdog(log)
		if err != nil {
			return err
		}
	}
	installed, err := backend.Apply(plan, stateDir(c.Gateway.StateDir))
	if err != nil {
		wd.stop()
		return err
	}
	defer func() {
		// The watchdog stops last, after Remove, but before this process
		// exits (a clean exit must not look like a crash): killed while it
		// removes its rules (procd's term_timeout, an xtables lock wait),
		// tpgw still leaves the LAN's traffic flowing directly.
		defer wd.stop()
		// The relayed TCP flows end with a reset while the rules still
		// bring the clients' packets to their sockets: each client learns
		// at once that its stream was cut, and no socket lingers (see
		// relay.TCPListener.Abort). New flows in the moment before the
		// rules go find no listener: nftables' tproxy then lets them pass
		// to the kernel's forwarding, iptables' TPROXY drops them and the
		// client's retry goes direct.
		_ = tcp.Abort()
		eng.AbortFlows()
		if rerr := installed.Remove(); rerr != nil {
			log.Error("removing kernel rules", "err", rerr)
			if err == nil {
				err = rerr
			}
		} else {
			log.Info("kernel rules removed")
		}
	}()
	inputs := ""
	if bypass != nil {
		set, err := installed.DNSBypassSet()
		if err != nil {
			return err
		}
		// What the first decisions are made with (watchDecisionInputs).
		inputs = eng.DecisionInputs()
		bypassSet.attach(set)
		defer func() { bypassSet.attach(nil); set.Close() }()
		log.Info("dns-bypass on: names DIRECT for certain get real answers, forwarded by the kernel", "sets", "inet tpgw "+netcfg.SetDNSBypass4+", "+netcfg.SetDNSBypass6)
	}
	log.Info("gateway running", "backend", backend.Name(), "tproxy", tcp.Addr().String())

	gw = &gateway{cfg: c, eng: eng, installed: installed, bypass: bypass, dns: dnsSrv, ping: ping, log: log, inputs: inputs}
	verify := time.NewTicker(verifyEvery(backend.Name()))
	defer verify.Stop()
	drops := time.NewTicker(udpDropsEvery)
	defer drops.Stop()
	defer gw.logUDPDrops() // those since the last line
	defer gw.logUDPHeld()
	for {
		select {
		case <-verify.C:
			gw.verifyRules()
			gw.watchDecisionInputs()
		case <-drops.C:
			gw.logUDPDrops()
		case s := <-sigs:
			if s == syscall.SIGHUP {
				_ = gw.reloadLogged(o.configPath, "SIGHUP")
				continue
			}
			log.Info("stopping", "signal", s.String())
			return nil
		case fn := <-requests:
			fn()
		case err := <-serveErr:
			return err
		}
	}
}

// verifyEvery is how often the kernel rules are checked: a flush of the
// ruleset by something else (a firewall restart) lets the LAN's flows out
// unproxied until then. nftables is read over netlink; iptables costs one
// iptables-save run per family.
func verifyEvery(backend string) time.Duration {
	if backend == config.BackendIPTables {
		return 5 * time.Second
	}
	return 2 * time.Second
}

// udpDropsEvery is how often datagrams the gateway dropped are reported:
// one line for all of a burst's, not one per datagram.
const udpDropsEvery = 30 * time.Second

// logUDPDrops says how many TPROXYed datagrams the engine dropped since it
// last said so (none: nothing). Between these and the listener, whose
// socket buffer the kernel counts (UDP RcvbufErrors in /proc/net/snmp), a
// datagram the gateway lost is never silent.
func (gw *gateway) logUDPDrops() {
	d := gw.eng.UDPDrops()
	if d.Total() == gw.udpDrops.Total() {
		return
	}
	last := gw.udpDrops
	gw.udpDrops = d
	// queue_full: mihomo's UDP worker for their source had no room for
	// 10 ms; unsent: their session's sender queue was full, the session
	// was closing, or their destination had no address.
	gw.log.Warn("UDP datagrams dropped in the gateway since the last report",
		"dropped", d.Total()-last.Total(),
		"queue_full", d.QueueFull-last.QueueFull,
		"unsent", d.Unsent-last.Unsent,
		"total", d.Total())
}

// logUDPHeld says, at stop, how many TPROXYed datagrams the relay held
// until mihomo's sender queue of their session had room, rather than let
// mihomo drop them (engine/udpgate.go): how often its cores were too busy
// for a session's sender to keep up.
func (gw *gateway) logUDPHeld() {
	if w := gw.eng.UDPSenderWaits(); w.Held > 0 {
		gw.log.Info("UDP datagrams held until their session's sender had room", "held", w.Held, "gave_up", w.GaveUp)
	}
}

// verifyRules puts back kernel rules that something else removed, and says so.
func (gw *gateway) verifyRules() {
	restored, err := gw.installed.Verify()
	if err != nil {
		if msg := err.Error(); msg != gw.verifyErr {
			gw.log.Error("checking the kernel rules", "err", err)
			gw.verifyErr = msg
		}
		return
	}
	gw.verifyErr = ""
	if len(restored) > 0 {
		gw.log.Warn("kernel rules were removed by something else (a firewall restart?); put back", "restored", strings.Join(restored, ", "))
		// The dns-bypass sets came back empty; answers cached for them must go too.
		gw.decisionsChanged("kernel rules put back")
	}
}

// reloadLogged reloads and logs a failure.
func (gw *gateway) reloadLogged(path, by string) error {
	err := gw.reload(path)
	if err != nil {
		gw.log.Error("reload failed; still running with the previous config", "by", by, "err", err)
	}
	return err
}

// watchDecisionInputs empties the dns-bypass sets once the rule providers'
// contents or the geodata files have changed (an update by interval, a
// file provider's watcher, geo-auto-update): names decided DIRECT with the
// old ones may not be now. It waits for one check with no further change,
// so that a geodata update that writes several files, then loads them, is
// over before the sets are emptied.
func (gw *gateway) watchDecisionInputs() {
	if gw.bypass == nil {
		return
	}
	in := gw.eng.DecisionInputs()
	switch {
	case in != gw.inputs:
		gw.inputs, gw.inputsMoved = in, true
	case gw.inputsMoved:
		gw.inputsMoved = false
		gw.decisionsChanged("rule providers or geodata updated")
	}
}

// decisionsChanged drops what was decided under the old rules, mode or
// sniffing: the dns-bypass sets (their flows would skip the new decision)
// and the DNS reply cache.
func (gw *gateway) decisionsChanged(why string) {
	if gw.bypass != nil {
		if err := gw.bypass.Flush(); err != nil {
			gw.log.Warn("emptying the dns-bypass sets", "why", why, "err", err)
		}
	}
	if gw.dns != nil {
		gw.dns.FlushCache()
	}
	gw.log.Info("decisions changed: dns-bypass sets and DNS reply cache emptied", "why", why)
}

func failureMeaning(policy string) string {
	if policy == config.FailClosed {
		return "if tpgw dies, intercepted LAN traffic is dropped until it is back"
	}
	return "if tpgw dies, LAN traffic and DNS flow directly"
}

// reload applies a changed config file (SIGHUP): the engine gets the new
// mihomo part and the kernel rules are replaced in one step. Listeners stay,
// so established flows continue. Settings that would need new listeners or a
// new backend (ports, backend) keep their running values until a restart.
func (gw *gateway) reload(path string) error {
	c, err := config.Load(path)
	if err != nil {
		return err
	}
	old := gw.cfg
	if err := refuseReload(old, c); err != nil {
		return err
	}
	if c.TProxyPort != old.TProxyPort || c.DNS.Listen != old.DNS.Listen || c.Gateway.DNSBypass != old.Gateway.DNSBypass {
		gw.log.Warn("reload: tproxy-port, dns.listen and tpgw.dns-bypass changes need a restart; keeping the running ones")
		c.TProxyPort, c.DNS.Listen, c.Gateway.DNSBypass = old.TProxyPort, old.DNS.Listen, old.Gateway.DNSBypass
	}
	if c.Gateway.Backend != old.Gateway.Backend || c.Gateway.StateDir != old.Gateway.StateDir || c.Gateway.OnFailure != old.Gateway.OnFailure {
		gw.log.Warn("reload: backend, state-dir and on-failure changes need a restart; keeping the running ones")
		c.Gateway.Backend, c.Gateway.StateDir, c.Gateway.OnFailure = old.Gateway.Backend, old.Gateway.StateDir, old.Gateway.OnFailure
	}
	if c.Gateway.UDPTimeout != old.Gateway.UDPTimeout || c.Gateway.UDPMaxSessions != old.Gateway.UDPMaxSessions {
		// The UDP relay's session table is made once, at the start.
		gw.log.Warn("reload: tpgw.udp-timeout and tpgw.udp-max-sessions changes need a restart; keeping the running ones")
		c.Gateway.UDPTimeout, c.Gateway.UDPMaxSessions = old.Gateway.UDPTimeout, old.Gateway.UDPMaxSessions
	}
	plan, err := hostPlan(c, gw.log)
	if err != nil {
		return err
	}
	if err := engine.Check(c.Raw, c.Dir()); err != nil {
		return err
	}
	if err := gw.eng.Reload(c.Raw, c.RoutingMark); err != nil {
		return err
	}
	if err := gw.installed.Update(plan); err != nil {
		// The kernel keeps the running rules (or gets them back at the next
		// check): the engine goes back to the running config too, or the two
		// would disagree (a new fake-ip range, say) until the next reload.
		if rerr := gw.eng.Reload(old.Raw, old.RoutingMark); rerr != nil {
			err = errors.Join(err, fmt.Errorf("engine back to the running config: %w", rerr))
		}
		// Names may have been decided under the new rules meanwhile, and
		// the sets may be the new table's, emptied.
		gw.decisionsChanged("reload failed: back to the running config")
		return fmt.Errorf("reload: kernel rules: %w", err)
	}
	// The new rules may send some of the bypassed names elsewhere. The new
	// table's sets start empty; Flush also makes answers decided before now
	// stay out of them.
	gw.decisionsChanged("reload")
	gw.ping.sync(plan.Options.FakeIPRange)
	gw.cfg = c
	gw.log.Info("reloaded", "config", path, "bypass", len(c.Gateway.Bypass), "rules_changed", true)
	return nil
}

// refuseReload names the changes a reload cannot apply while the running
// one's values are kept: mihomo's part goes to the engine as the file has it,
// so the two would disagree. dns.enable turned off stops mihomo's DNS while
// the hijack, kept, sends it every query; a new routing-mark (routing-mark,
// or proxy-self, which brings one) exempts the new mark while the engine's
// open sockets carry the old one, and their packets would be diverted into
// the relay. A restart applies them.
func refuseReload(old, c *config.Config) error {
	switch {
	case c.DNS.Enable != old.DNS.Enable:
		return fmt.Errorf("reload: dns.enable changed to %v: that needs a restart", c.DNS.Enable)
	case c.RoutingMark != old.RoutingMark:
		return fmt.Errorf("reload: the routing-mark changed from %#x to %#x (routing-mark, or proxy-self, which sets one): that needs a restart", old.RoutingMark, c.RoutingMark)
	}
	return nil
}

// chooseBackend is netcfg.ChooseBackend; a test stands in for a host whose
// nftables cannot be used.
var chooseBackend = netcfg.ChooseBackend

// backendFor is the backend a start with c uses on this host. dns-bypass
// needs nftables: the config refuses it with backend iptables, and here it is
// refused when auto falls back to iptables.
func backendFor(c *config.Config, log *slog.Logger) (netcfg.Backend, string, error) {
	backend, why, err := chooseBackend(c.Gateway.Backend, log)
	if err != nil {
		return nil, "", err
	}
	if c.Gateway.DNSBypass && backend.Name() != config.BackendNftables {
		return nil, "", fmt.Errorf("tpgw.dns-bypass needs the nftables backend, and %s (%s)", backend.Name(), why)
	}
	return backend, why, nil
}

func checkConfig(o cmdOpts, stdout io.Writer) error {
	c, err := config.Load(o.configPath)
	if err != nil {
		return err
	}
	// The plan a start would install here, with the same warnings.
	plan, err := hostPlan(c, o.log)
	if err != nil {
		return err
	}
	if err := engine.Check(c.Raw, c.Dir()); err != nil {
		return err
	}
	// And, as root, the backend a start would pick here (the config alone
	// cannot tell what auto gives), and what it would say of the host's
	// firewall.
	if os.Geteuid() == 0 {
		if err := stateDirWritable(c); err != nil {
			return err
		}
		if _, _, err := backendFor(c, o.log); err != nil {
			return err
		}
		netcfg.WarnHostFirewall(o.log, plan)
	}
	fmt.Fprintf(stdout, "%s: ok\n", o.configPath)
	return nil
}

func printRules(o cmdOpts, stdout io.Writer) error {
	c, err := config.Load(o.configPath)
	if err != nil {
		return err
	}
	plan, err := netcfg.BuildPlan(netcfgOptions(c))
	if err != nil {
		return err
	}
	_, err = io.WriteString(stdout, plan.Render(rulesBackend(c.Gateway.Backend)))
	return err
}

// rulesBackend is the backend whose commands `tpgw rules` prints: the
// configured one, or for auto the one a run would pick here (nftables when
// that cannot be probed, e.g. without root).
func rulesBackend(name string) string {
	if name != config.BackendAuto {
		return name
	}
	if os.Geteuid() == 0 {
		if b, _, err := netcfg.ChooseBackend(name, slog.New(slog.DiscardHandler)); err == nil {
			return b.Name()
		}
	}
	return config.BackendNftables
}

func cleanup(o cmdOpts, stdout io.Writer) error {
	if err := requirePrivileges(); err != nil {
		return err
	}
	if err := refuseIfRunning(); err != nil {
		return err
	}
	// A watchdog of a tpgw that died removes the divert rules as this does.
	if err := waitWatchdog(o.log); err != nil {
		return err
	}
	base := config.DefaultStateDir
	if o.configPath != "" {
		c, err := config.Load(o.configPath)
		if err != nil {
			return err
		}
		base = c.Gateway.StateDir
		if keep, why := keepAfterFailure(c.Gateway.OnFailure, os.Getenv("SERVICE_RESULT")); keep {
			fmt.Fprintln(stdout, "cleanup skipped: "+why)
			return nil
		}
	}
	if err := netcfg.Cleanup(o.log, stateDir(base)); err != nil {
		return err
	}
	fmt.Fprintln(stdout, "cleanup done")
	return nil
}

// keepAfterFailure: systemd runs the unit's ExecStopPost (tpgw cleanup) after
// a crash too, before it restarts the service, and tells it how the service
// ended in SERVICE_RESULT ("success" for a stop). With on-failure: closed,
// the rules a crashed tpgw left must stay until it is back: removing them
// would let the LAN's traffic out unproxied meanwhile. The next start cleans
// them up, and so does `tpgw cleanup` run by hand.
func keepAfterFailure(policy, serviceResult string) (bool, string) {
	if policy != config.FailClosed || serviceResult == "" || serviceResult == "success" {
		return false, ""
	}
	return true, "on-failure: closed and the service failed (SERVICE_RESULT=" + serviceResult +
		"): its rules stay, so intercepted LAN traffic is dropped until tpgw is back; run `tpgw cleanup` to remove them"
}

func printVersion(w io.Writer) {
	mihomo := "unknown"
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, d := range bi.Deps {
			if d.Path == "github.com/metacubex/mihomo" {
				mihomo = d.Version
			}
		}
	}
	fmt.Fprintf(w, "tpgw %s (commit %s, %s, mihomo %s, %s/%s)\n", version, commit, runtime.Version(), mihomo, runtime.GOOS, runtime.GOARCH)
}

// pinger runs the relay's PingResponder for the IPv4 fake-ip range the plan
// routes pings to. Answering is a courtesy: when the raw socket cannot be
// opened, tpgw warns and runs on (pings to fake IPs then go unanswered).
type pinger struct {
	log  *slog.Logger
	resp *relay.PingResponder
	done chan struct{}
}

// sync starts the responder for fake (the plan's IPv4 fake-ip range; zero
// when fake-ip is off) or moves it there.
func (p *pinger) sync(fake netip.Prefix) {
	switch {
	case !fake.IsValid():
		return // no ping rule in the plan: nothing reaches the responder
	case p.resp != nil:
		if err := p.resp.SetPrefix(fake); err != nil {
			p.log.Warn("pings to fake IPs: cannot follow the new fake-ip-range", "range", fake, "err", err)
		}
		return
	}
	resp, err := relay.ListenPing(fake, p.log)
	if err != nil {
		p.log.Warn("pings to fake IPs go unanswered", "err", err)
		return
	}
	p.resp, p.done = resp, make(chan struct{})
	go func() {
		defer close(p.done)
		if err := resp.Serve(); err != nil {
			p.log.Warn("pings to fake IPs go unanswered", "err", err)
		}
	}()
}

func (p *pinger) close() {
	if p.resp != nil {
		p.resp.Close()
		<-p.done
	}
}
