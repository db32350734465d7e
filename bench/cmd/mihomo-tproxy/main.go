// Command mihomo-tproxy is the "mihomo's own tproxy inbound" setup of the
// benchmark: the same embedded mihomo as tpgw (engine.Start with
// MihomoTProxy, so mihomo serves tproxy-port itself instead of tpgw's relay)
// behind the same netcfg TPROXY rules as tpgw. With -rules-only it installs
// just the rules, for another TPROXY program (ss-redir -T) on the same port.
// It removes its rules on SIGTERM/SIGINT. Not for production use.
package main

import (
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/tpgw/tpgw/engine"
	"github.com/tpgw/tpgw/netcfg"
)

func main() {
	cfgPath := flag.String("c", "", "mihomo/tpgw config with tproxy-port (not needed with -rules-only)")
	stateDir := flag.String("state", "/run/tpgw-bench", "where netcfg records the sysctls it changes")
	rulesOnly := flag.Bool("rules-only", false, "install the TPROXY rules only, no mihomo")
	port := flag.Uint("tproxy-port", uint(netcfg.DefaultTProxyPort), "TPROXY port the rules divert to (must match the config's tproxy-port)")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	if err := run(*cfgPath, *stateDir, *rulesOnly, uint16(*port), log); err != nil {
		fmt.Fprintln(os.Stderr, "mihomo-tproxy:", err)
		os.Exit(1)
	}
}

func run(cfgPath, stateDir string, rulesOnly bool, port uint16, log *slog.Logger) error {
	if !rulesOnly {
		raw, err := os.ReadFile(cfgPath)
		if err != nil {
			return err
		}
		abs, err := filepath.Abs(cfgPath)
		if err != nil {
			return err
		}
		eng, err := engine.Start(raw, engine.Options{HomeDir: filepath.Dir(abs), Logger: log, MihomoTProxy: true})
		if err != nil {
			return err
		}
		defer eng.Close()
	}
	// tpgw's defaults (mark and table 666, IPv6, forwarding, fake-ip range),
	// without the DNS hijack: mihomo's DNS listener is off in the engine.
	opts := netcfg.DefaultOptions()
	opts.TProxyPort = port
	opts.DNSPort = 0
	opts.FakeIPRange = netip.MustParsePrefix("198.18.0.0/16")
	plan, err := netcfg.BuildPlan(opts)
	if err != nil {
		return err
	}
	installed, err := netcfg.NewNftables(log).Apply(plan, stateDir)
	if err != nil {
		return err
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	fmt.Println("running")
	<-sigs
	return installed.Remove()
}
