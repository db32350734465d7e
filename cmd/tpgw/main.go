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

// errHelp is returned for -h or --help after a command: its usage goes to
// stdout and tpgw exits 0.
var errHelp = errors.New("help requested")

// configFlags are the flags of run, check and rules, in their help.
const configFlags = `  -c FILE   config file (a mihomo config with a tpgw: section)
  -v        debug logging
`

// commandUsage is the help of each command (tpgw CMD -h).
var commandUsage = map[string]string{
	"run": `Usage: tpgw run -c FILE [-v]
Runs the gateway: installs the kernel rules, serves the TPROXY relay and the
fake-ip DNS, and removes every rule, route and sysctl change on exit
(SIGTERM, SIGINT). SIGHUP reloads FILE without dropping established flows.

Flags:
` + configFlags,
	"check": `Usage: tpgw check -c FILE [-v]
Validates FILE (its mihomo part and its tpgw: section) and exits: 0 if tpgw
would start with it, 1 with the key and line of the first problem. Warnings
a start would give go to stderr; as root these include the host's firewall
chains that would drop what tpgw diverts.

Flags:
` + configFlags,
	"rules": `Usage: tpgw rules -c FILE [-v]
Prints the kernel rules, ip rules, routes and sysctls tpgw would install for
FILE on this host. Changes nothing.

Flags:
` + configFlags,
	"cleanup": `Usage: tpgw cleanup [-c FILE] [-v]
Removes the rules, routes and sysctl changes a crashed run left behind
(tpgw run does this itself at start). Refused while tpgw runs.

Flags:
  -c FILE   the config the crashed run used, for its tpgw.state-dir (without
            -c: /run/tpgw)
  -v        debug logging
`,
	"explain": `Usage: tpgw explain -c FILE --src ADDR[:PORT] --dst ADDR:PORT [--proto tcp|udp] [--in IFACE] [--host NAME]
Tells what happens to such a flow: which kernel rule takes it, and which
mihomo rule and outbound it meets. Changes nothing.

Flags:
  -c FILE          config file
  --src ADDR       the flow's source (a LAN client), optionally with :PORT
  --dst ADDR:PORT  the flow's destination
  --proto          tcp (default) or udp
  --in IFACE       the interface the flow comes in on
  --host NAME      the domain name behind --dst (as after a fake-ip lookup)
`,
}

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
		if errors.Is(err, errHelp) {
			fmt.Fprint(stdout, commandUsage[cmd])
			return 0
		}
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
		return parseError(cmd, err)
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

// parseError is the error for a command line that cmd's flags refused.
func parseError(cmd string, err error) error {
	if errors.Is(err, flag.ErrHelp) {
		return errHelp
	}
	return fmt.Errorf("%w: %v (tpgw %s -h shows the flags)", errUsage, err, cmd)
}

func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}
