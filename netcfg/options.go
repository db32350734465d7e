package netcfg

import (
	"errors"
	"fmt"
	"math"
	"net/netip"
	"slices"
	"strings"
)

// Defaults used by DefaultOptions; the config package owns the user-facing defaults.
const (
	DefaultMark       uint32 = 666
	DefaultTable             = 666
	DefaultTProxyPort uint16 = 7893
	DefaultDNSPort    uint16 = 1053
)

// DefaultFakeIPRange is mihomo's default fake-ip range.
var DefaultFakeIPRange = netip.MustParsePrefix("198.18.0.1/16")

// Options are the settings a Plan is built from. BuildPlan applies no defaults:
// zero ports, marks and tables are errors (use DefaultOptions as a start).
type Options struct {
	Interfaces  []string // LAN ingress interfaces; empty = LAN sources on every interface except lo
	Mark        uint32   // fwmark put on TPROXYed packets
	Table       int      // policy routing table
	RoutingMark uint32   // SO_MARK the engine puts on its own sockets; 0 = none. Packets with it are never intercepted.
	TProxyPort  uint16   // TCP+UDP TPROXY listener
	DNSPort     uint16   // fake-ip DNS port; 0 = no DNS hijack
	// DNSAddr is the DNS listener's address when it is not a wildcard (say
	// dns.listen: 127.0.0.1:1053): hijacked queries are handed to the socket
	// on it, and those of the other family are not hijacked (no socket of
	// theirs listens). Zero for a wildcard listener.
	DNSAddr      netip.Addr
	FakeIPRange  netip.Prefix   // v4 fake-ip range: always intercepted, never bypassed; may be zero
	FakeIPRange6 netip.Prefix   // v6 fake-ip range; may be zero
	Bypass       []netip.Prefix // extra destination CIDRs bypassed (added to the built-in reserved list), v4 and v6 mixed
	BypassSrc    []netip.Prefix // source CIDRs bypassed
	IPv6         bool           // also intercept IPv6
	Forward      bool           // set net.ipv4.ip_forward=1 (and net.ipv6.conf.all.forwarding=1 with IPv6) while running
	// OnFailure is what happens to LAN traffic when tpgw dies with its rules in
	// place: "open" (or "") lets it flow directly, "closed" drops it. See doc.go.
	OnFailure string
	// ProxySelf sends the gateway's own outbound TCP/UDP through the relay too.
	// It needs RoutingMark, which keeps the engine's own sockets out of the loop.
	ProxySelf bool
	// LANSources are source CIDRs intercepted in addition to the built-in
	// private ranges (LANSourceRanges), when Interfaces is empty.
	LANSources []netip.Prefix
	// DNSBypass adds the dynamic sets dns_bypass4/6 and the rules that
	// return their destinations (and connections labelled ConnLabelDNSBypass)
	// to the kernel. nftables only. See doc.go.
	DNSBypass bool
}

// On-failure policies.
const (
	OnFailureOpen   = "open"
	OnFailureClosed = "closed"
)

// DefaultOptions returns the options of a default tpgw config: all interfaces,
// mark and table 666, TPROXY on 7893, DNS hijack to 1053, IPv6 and forwarding on.
func DefaultOptions() Options {
	return Options{
		Mark:        DefaultMark,
		Table:       DefaultTable,
		TProxyPort:  DefaultTProxyPort,
		DNSPort:     DefaultDNSPort,
		FakeIPRange: DefaultFakeIPRange,
		IPv6:        true,
		Forward:     true,
	}
}

// Reserved routing tables the plan must never take over: unspec, default, main, local.
var reservedTables = []int{0, 253, 254, 255}

// ifNameSize is IFNAMSIZ including the terminating NUL.
const ifNameSize = 16

// validate checks o and returns a normalized copy: prefixes masked, interface
// names sorted and de-duplicated. Errors name the option and the value.
func (o Options) validate() (Options, error) {
	var errs []error
	bad := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("netcfg: "+format, args...))
	}
	if o.Mark == 0 {
		bad("mark must not be 0")
	}
	if o.RoutingMark != 0 && o.RoutingMark == o.Mark {
		bad("routing-mark %#x must differ from mark %#x", o.RoutingMark, o.Mark)
	}
	switch o.OnFailure {
	case "":
		o.OnFailure = OnFailureOpen
	case OnFailureOpen, OnFailureClosed:
	default:
		bad("on-failure %q: must be %q or %q", o.OnFailure, OnFailureOpen, OnFailureClosed)
	}
	if o.ProxySelf && o.RoutingMark == 0 {
		bad("proxy-self needs a routing-mark: without it the engine's own connections would loop back into tpgw")
	}
	if o.Table < 1 || o.Table > math.MaxInt32 || slices.Contains(reservedTables, o.Table) {
		bad("table %d: must be in 1..%d and not 253 (default), 254 (main) or 255 (local)", o.Table, math.MaxInt32)
	}
	if o.TProxyPort == 0 {
		bad("tproxy port must not be 0")
	}
	if o.DNSAddr = o.DNSAddr.Unmap(); o.DNSAddr.IsUnspecified() {
		o.DNSAddr = netip.Addr{}
	}
	names := make([]string, 0, len(o.Interfaces))
	for _, n := range o.Interfaces {
		if n == "" || len(n) >= ifNameSize || strings.ContainsAny(n, "\"\\/ \t\n*+") {
			bad("interface %q: not a valid interface name", n)
			continue
		}
		names = append(names, n)
	}
	slices.Sort(names)
	o.Interfaces = slices.Compact(names)

	checkPrefix := func(key string, p netip.Prefix, want4 bool) netip.Prefix {
		if !p.IsValid() {
			return p
		}
		if want4 && !p.Addr().Is4() {
			bad("%s %s: must be an IPv4 prefix", key, p)
		}
		if !want4 && (!p.Addr().Is6() || p.Addr().Is4In6()) {
			bad("%s %s: must be an IPv6 prefix", key, p)
		}
		return p.Masked()
	}
	o.FakeIPRange = checkPrefix("fake-ip-range", o.FakeIPRange, true)
	o.FakeIPRange6 = checkPrefix("fake-ip-range6", o.FakeIPRange6, false)

	checkList := func(key string, in []netip.Prefix) []netip.Prefix {
		out := make([]netip.Prefix, 0, len(in))
		for i, p := range in {
			switch {
			case !p.IsValid():
				bad("%s[%d]: invalid prefix %q", key, i, p.String())
			default:
				// An IPv4-mapped v6 prefix means the v4 prefix; nft would never see it as v6.
				if p.Addr().Is4In6() && p.Bits() >= 96 {
					p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
				}
				out = append(out, p.Masked())
			}
		}
		return out
	}
	o.Bypass = checkList("bypass", o.Bypass)
	o.BypassSrc = checkList("bypass-src", o.BypassSrc)
	o.LANSources = checkList("lan-sources", o.LANSources)
	return o, errors.Join(errs...)
}
