package main

import (
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"

	"github.com/tpgw/tpgw/config"
	"github.com/tpgw/tpgw/dns"
	"github.com/tpgw/tpgw/engine"
	"github.com/tpgw/tpgw/netcfg"
)

// explainArgs is one `tpgw explain` command line.
type explainArgs struct {
	configPath string
	flow       netcfg.Flow
	srcPort    bool   // --src had a port
	host       string // --host: the name behind the destination, as mihomo sees it after the fake-ip lookup
}

func parseExplainArgs(args []string) (explainArgs, error) {
	fs := flag.NewFlagSet("explain", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	cfgPath := fs.String("c", "", "config file")
	src := fs.String("src", "", "source address, optionally with :PORT")
	dst := fs.String("dst", "", "destination ADDR:PORT")
	proto := fs.String("proto", "tcp", "tcp or udp")
	in := fs.String("in", "", "input interface")
	host := fs.String("host", "", "domain name of the destination")
	if err := fs.Parse(args); err != nil {
		return explainArgs{}, parseError("explain", err)
	}
	usageErr := func(format string, a ...any) (explainArgs, error) {
		return explainArgs{}, fmt.Errorf("%w: "+format, append([]any{errUsage}, a...)...)
	}
	switch {
	case fs.NArg() > 0:
		return usageErr("unexpected argument %q", fs.Arg(0))
	case *cfgPath == "":
		return usageErr("-c FILE is required")
	case *src == "":
		return usageErr("--src ADDR is required")
	case *dst == "":
		return usageErr("--dst ADDR:PORT is required")
	case *proto != "tcp" && *proto != "udp":
		return usageErr("--proto %q: must be tcp or udp", *proto)
	}
	a := explainArgs{configPath: *cfgPath, host: *host}
	a.flow.Proto = *proto
	a.flow.InIface = *in
	d, err := netip.ParseAddrPort(*dst)
	if err != nil {
		return usageErr("--dst %q: want ADDR:PORT, e.g. 203.0.113.3:80 or [2001:db8::3]:443", *dst)
	}
	a.flow.Dst = netip.AddrPortFrom(d.Addr().Unmap(), d.Port())
	if s, err := netip.ParseAddrPort(*src); err == nil {
		a.flow.Src, a.srcPort = netip.AddrPortFrom(s.Addr().Unmap(), s.Port()), true
	} else if s, err := netip.ParseAddr(*src); err == nil {
		a.flow.Src = netip.AddrPortFrom(s.Unmap(), 0)
	} else {
		return usageErr("--src %q: want ADDR or ADDR:PORT", *src)
	}
	if a.flow.Src.Addr().Is4() != a.flow.Dst.Addr().Is4() {
		return usageErr("--src %s and --dst %s are of different address families", a.flow.Src.Addr(), a.flow.Dst.Addr())
	}
	return a, nil
}

// explainCmd is `tpgw explain`: what the kernel rules, then mihomo's rules, do
// with one flow. It only evaluates the config: nothing is installed or dialed,
// so it needs no root.
func explainCmd(args []string, stdout io.Writer) error {
	a, err := parseExplainArgs(args)
	if err != nil {
		return err
	}
	c, err := config.Load(a.configPath)
	if err != nil {
		return err
	}
	local, err := localAddrs()
	if err != nil {
		return err
	}
	return explain(c, a, local, stdout)
}

// localAddrs are the addresses of this host: flows to them are delivered
// locally rather than intercepted (fib daddr type local).
func localAddrs() ([]netip.Addr, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, fmt.Errorf("local addresses: %w", err)
	}
	var out []netip.Addr
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(n.IP); ok {
				out = append(out, ip.Unmap())
			}
		}
	}
	return out, nil
}

func explain(c *config.Config, a explainArgs, local []netip.Addr, w io.Writer) error {
	plan, err := netcfg.BuildPlan(netcfgOptions(c))
	if err != nil {
		return err
	}
	f := a.flow
	if f.InIface == "" {
		// A LAN flow: with no interfaces configured the LAN is recognised by
		// source address, and any interface name will do.
		f.InIface = "eth0"
		if len(plan.Options.Interfaces) > 0 {
			f.InIface = plan.Options.Interfaces[0]
		}
	}
	src := f.Src.String()
	if !a.srcPort {
		src = f.Src.Addr().String()
	}
	host := ""
	if a.host != "" {
		host = " (" + a.host + ")"
	}
	fmt.Fprintf(w, "flow: %s %s → %s%s in %s\n", f.Proto, src, f.Dst, host, f.InIface)

	e := plan.Explain(f, local)
	fmt.Fprintf(w, "kernel: %s\n", e)
	if o := plan.Options; o.DNSBypass && e.Outcome == netcfg.OutcomeTProxy && e.Port == o.TProxyPort {
		set := netcfg.SetDNSBypass4
		if f.Dst.Addr().Is6() {
			set = netcfg.SetDNSBypass6
		}
		fmt.Fprintf(w, "dns-bypass: assumed not in @%s; while the fake-ip DNS has put %s there (a name DIRECT for certain, for its TTL) the kernel forwards the flow instead (nft list set inet %s %s)\n",
			set, f.Dst.Addr(), netcfg.TableName, set)
	}
	if e.Outcome != netcfg.OutcomeTProxy {
		return nil
	}
	o := plan.Options
	switch {
	case o.DNSPort != 0 && e.Port == o.DNSPort:
		kind := "DNS server"
		if c.DNS.FakeIP() {
			kind = "fake-ip DNS server"
		}
		if a.host != "" && dns.IsLocalName(a.host) {
			fmt.Fprintf(w, "dns: %s is a name only the LAN knows: tpgw's %s on :%d passes the query on to %s, the server asked, and its answer back\n",
				a.host, kind, e.Port, f.Dst)
			break
		}
		fmt.Fprintf(w, "dns: answered by tpgw's %s on :%d\n", kind, e.Port)
	case e.Port == o.TProxyPort:
		dst := f.Dst
		fake := (o.FakeIPRange.IsValid() && o.FakeIPRange.Contains(dst.Addr())) ||
			(o.FakeIPRange6.IsValid() && o.FakeIPRange6.Contains(dst.Addr()))
		if fake {
			if a.host == "" {
				fmt.Fprintf(w, "mihomo: %s is a fake IP: the name it stands for is known only to the running tpgw; pass --host NAME\n", dst.Addr())
				break
			}
			// mihomo replaces a fake IP by its name and forgets the address.
			dst = netip.AddrPortFrom(netip.Addr{}, dst.Port())
		}
		d, err := engine.ExplainFlow(c.Raw, c.Dir(), f.Proto, f.Src, a.host, dst)
		if err != nil {
			return err
		}
		fmt.Fprintf(w, "mihomo: %s\n", d)
	}
	if e.IfDown != nil {
		fmt.Fprintf(w, "if tpgw is down: %s\n", e.IfDown)
	}
	return nil
}
