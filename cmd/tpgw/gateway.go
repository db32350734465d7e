package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"syscall"

	"github.com/tpgw/tpgw/config"
	"github.com/tpgw/tpgw/dns"
	"github.com/tpgw/tpgw/engine"
	"github.com/tpgw/tpgw/netcfg"
	"github.com/tpgw/tpgw/relay"
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
	}
	if c.DNS.FakeIP() {
		o.FakeIPRange = c.DNS.FakeIPRange.Masked()
		if c.DNS.FakeIPRange6.IsValid() {
			o.FakeIPRange6 = c.DNS.FakeIPRange6.Masked()
		}
	}
	if c.DNS.Enable && g.DNSHijack {
		o.DNSPort = c.DNS.Listen.Port()
	}
	return o
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

func pickBackend(o cmdOpts, c *config.Config) (netcfg.Backend, error) {
	switch c.Gateway.Backend {
	case config.BackendIPTables:
		return nil, errors.New("tpgw.backend: iptables is not available yet in this version; use nftables or auto")
	case config.BackendAuto:
		o.log.Info("backend chosen", "backend", "nftables", "why", "auto: nftables is the only backend in this version")
	}
	return netcfg.NewNftables(o.log), nil
}

func runGateway(o cmdOpts) (err error) {
	c, err := config.Load(o.configPath)
	if err != nil {
		return err
	}
	plan, err := netcfg.BuildPlan(netcfgOptions(c))
	if err != nil {
		return err
	}
	backend, err := pickBackend(o, c)
	if err != nil {
		return err
	}
	if err := engine.Check(c.Raw, c.Dir()); err != nil {
		return err
	}
	log := o.log
	log.Info("starting", "config", o.configPath, "version", version, "on_failure", c.Gateway.OnFailure,
		"tproxy_port", c.TProxyPort, "mark", c.Gateway.Mark, "table", c.Gateway.Table)

	// Start-up order: engine, listeners, then kernel rules, so that a failure
	// before the last step has installed nothing; shutdown is the reverse.
	eng, err := engine.Start(c.Raw, engine.Options{HomeDir: c.Dir(), RoutingMark: c.RoutingMark, Logger: log})
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

	if c.DNS.Enable {
		srv, err := dns.Listen(c.DNS.Listen, eng, log)
		if err != nil {
			return err
		}
		go func() { serveErr <- srv.Serve() }()
		defer srv.Close()
		log.Info("dns server", "listen", srv.Addr().String(), "mode", c.DNS.EnhancedMode, "hijack", c.Gateway.DNSHijack)
	} else if c.Gateway.DNSHijack {
		log.Warn("tpgw.dns-hijack is on but the mihomo dns block is not enabled: client DNS is not hijacked")
	}

	installed, err := backend.Apply(plan, stateDir(c.Gateway.StateDir))
	if err != nil {
		return err
	}
	defer func() {
		if rerr := installed.Remove(); rerr != nil {
			log.Error("removing kernel rules", "err", rerr)
			if err == nil {
				err = rerr
			}
		} else {
			log.Info("kernel rules removed")
		}
	}()
	log.Info("gateway running", "backend", backend.Name(), "tproxy", tcp.Addr().String())

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	defer signal.Stop(sigs)
	for {
		select {
		case s := <-sigs:
			if s == syscall.SIGHUP {
				log.Warn("SIGHUP: reload is not supported yet; restart tpgw to apply a changed config")
				continue
			}
			log.Info("stopping", "signal", s.String())
			return nil
		case err := <-serveErr:
			return err
		}
	}
}

func checkConfig(o cmdOpts, stdout io.Writer) error {
	c, err := config.Load(o.configPath)
	if err != nil {
		return err
	}
	if _, err := netcfg.BuildPlan(netcfgOptions(c)); err != nil {
		return err
	}
	if err := engine.Check(c.Raw, c.Dir()); err != nil {
		return err
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
	_, err = io.WriteString(stdout, plan.String())
	return err
}

func cleanup(o cmdOpts, stdout io.Writer) error {
	base := config.DefaultStateDir
	if o.configPath != "" {
		c, err := config.Load(o.configPath)
		if err != nil {
			return err
		}
		base = c.Gateway.StateDir
	}
	if err := netcfg.Cleanup(o.log, stateDir(base)); err != nil {
		return err
	}
	fmt.Fprintln(stdout, "cleanup done")
	return nil
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
