// Command tpgw turns a Linux box into a transparent proxy gateway: the kernel
// diverts LAN traffic (netcfg) to tpgw's TPROXY listeners (relay), which hand
// each flow to the embedded mihomo core (engine).
//
// This file only parses the command line, wires the parts and handles signals.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
)

// Set with -ldflags "-X main.version=... -X main.commit=...".
var (
	version = "dev"
	commit  = "unknown"
)

const usage = `tpgw: a transparent proxy gateway (TPROXY + embedded mihomo)

Usage:
  tpgw run -c FILE       run the gateway (installs rules, removes them on exit)
  tpgw check -c FILE     validate the config file and exit
  tpgw rules -c FILE     print the kernel rules tpgw would install; changes nothing
  tpgw cleanup [-c FILE] remove rules, routes and sysctl changes left by a crashed run
  tpgw explain -c FILE --src A --dst B:PORT [--proto tcp|udp] [--in IFACE] [--host NAME]: what happens to such a flow
  tpgw version           print version information

Flags for run, check, rules, cleanup:
  -c FILE   config file (a mihomo config with a tpgw: section)
  -v        debug logging
`

func main() {
	os.Exit(realMain(os.Args[1:], os.Stdout, os.Stderr))
}

// errUsage marks command-line mistakes (exit code 2).
var errUsage = errors.New("usage")

func realMain(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	cmd, rest := args[0], args[1:]
	var err error
	switch cmd {
	case "run":
		err = withConfig(cmd, rest, stderr, true, func(o cmdOpts) error { return runGateway(o) })
	case "check":
		err = withConfig(cmd, rest, stderr, true, func(o cmdOpts) error { return checkConfig(o, stdout) })
	case "rules":
		err = withConfig(cmd, rest, stderr, true, func(o cmdOpts) error { return printRules(o, stdout) })
	case "cleanup":
		err = withConfig(cmd, rest, stderr, false, func(o cmdOpts) error { return cleanup(o, stdout) })
	case "explain":
		err = explainCmd(rest, stdout)
	case "watchdog":
		// Internal: started by `tpgw run` (see watchdog.go).
		err = runWatchdog(rest, stderr)
	case "version", "-version", "--version":
		printVersion(stdout)
		return 0
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "tpgw: unknown command %q\n%s", cmd, usage)
		return 2
	}
	if err != nil {
		if errors.Is(err, errUsage) {
			fmt.Fprintf(stderr, "tpgw %s: %s\n", cmd, strings.TrimPrefix(err.Error(), "usage: "))
			return 2
		}
		fmt.Fprintf(stderr, "tpgw %s: %s\n", cmd, oneLine(err.Error()))
		return 1
	}
	return 0
}

type cmdOpts struct {
	configPath string
	log        *slog.Logger
}

func withConfig(cmd string, args []string, stderr io.Writer, need bool, fn func(cmdOpts) error) error {
	fs := flag.NewFlagSet(cmd, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	cfgPath := fs.String("c", "", "config file")
	verbose := fs.Bool("v", false, "debug logging")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: unexpected argument %q", errUsage, fs.Arg(0))
	}
	if need && *cfgPath == "" {
		return fmt.Errorf("%w: -c FILE is required", errUsage)
	}
	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	return fn(cmdOpts{configPath: *cfgPath, log: log})
}

func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}
