package netcfg

import (
	"net"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// OutsideLAN is one network of the host whose clients a plan with no
// Interfaces does not intercept: its prefix is not a LAN source.
type OutsideLAN struct {
	Iface  string
	Prefix netip.Prefix
}

// NotIntercepted lists the host's own global IPv6 networks that a plan with
// Options o leaves alone. With no Interfaces a plan intercepts flows from
// LAN sources only (private, ULA, link-local and Options.LANSources), so
// that no WAN is ever intercepted; but a dual-stack LAN numbered from the
// ISP's prefix (the usual IPv6 home network) has global source addresses,
// and its IPv6 flows would leave unproxied. Interfaces that hold a default
// route are taken for WANs and left out, unless the host has no other (a
// side router on one LAN). It returns nothing when o lists interfaces or
// does not intercept IPv6. It reads the network namespace of the calling
// thread.
func NotIntercepted(o Options) ([]OutsideLAN, error) {
	if len(o.Interfaces) > 0 || !o.IPv6 {
		return nil, nil
	}
	links, err := netlink.LinkList()
	if err != nil {
		return nil, err
	}
	lan := append(slices.Clone(lanSources6), o.LANSources...)
	wan := map[int]bool{}
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		routes, err := netlink.RouteList(nil, family)
		if err != nil {
			return nil, err
		}
		for _, r := range routes {
			if isDefault(r) {
				wan[r.LinkIndex] = true
			}
		}
	}
	var found, onWAN []OutsideLAN
	withAddrs := 0
	for _, l := range links {
		a := l.Attrs()
		if a.Flags&net.FlagLoopback != 0 || a.Flags&net.FlagUp == 0 {
			continue
		}
		addrs, err := netlink.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			return nil, err
		}
		if len(addrs) > 0 {
			withAddrs++
		}
		for _, ad := range addrs {
			ip, ok := netip.AddrFromSlice(ad.IP)
			if !ok || !ip.Is6() || ip.Is4In6() || ad.Scope != unix.RT_SCOPE_UNIVERSE {
				continue
			}
			ones, _ := ad.Mask.Size()
			p := netip.PrefixFrom(ip, ones).Masked()
			if slices.ContainsFunc(lan, func(l netip.Prefix) bool { return l.Contains(ip) }) {
				continue
			}
			n := OutsideLAN{Iface: a.Name, Prefix: p}
			if wan[a.Index] {
				onWAN = append(onWAN, n)
			} else if !slices.Contains(found, n) {
				found = append(found, n)
			}
		}
	}
	if withAddrs == 1 {
		found = append(found, onWAN...)
	}
	return found, nil
}

// isDefault reports whether r is a default route (netlink leaves its
// destination nil, or gives 0.0.0.0/0 or ::/0).
func isDefault(r netlink.Route) bool {
	if r.Dst == nil {
		return true
	}
	ones, _ := r.Dst.Mask.Size()
	return ones == 0
}

// NetworksOverlapping lists the host's networks (its interfaces' addresses
// with their prefix lengths; loopback left out) that overlap one of
// ranges. It reads the network namespace of the calling thread.
func NetworksOverlapping(ranges ...netip.Prefix) ([]OutsideLAN, error) {
	var want []netip.Prefix
	for _, r := range ranges {
		if r.IsValid() {
			want = append(want, r.Masked())
		}
	}
	if len(want) == 0 {
		return nil, nil
	}
	links, err := netlink.LinkList()
	if err != nil {
		return nil, err
	}
	var found []OutsideLAN
	for _, l := range links {
		a := l.Attrs()
		if a.Flags&net.FlagLoopback != 0 {
			continue
		}
		addrs, err := netlink.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			return nil, err
		}
		for _, ad := range addrs {
			ip, ok := netip.AddrFromSlice(ad.IP)
			if !ok {
				continue
			}
			ip = ip.Unmap()
			ones, _ := ad.Mask.Size()
			p := netip.PrefixFrom(ip, ones).Masked()
			n := OutsideLAN{Iface: a.Name, Prefix: p}
			if slices.ContainsFunc(want, p.Overlaps) && !slices.Contains(found, n) {
				found = append(found, n)
			}
		}
	}
	return found, nil
}
