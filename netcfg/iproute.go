package netcfg

import (
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func (f Family) netlinkFamily() int {
	if f == IPv6 {
		return netlink.FAMILY_V6
	}
	return netlink.FAMILY_V4
}

func familyName(nlFamily int) string {
	if nlFamily == netlink.FAMILY_V6 {
		return "-6"
	}
	return "-4"
}

func (r IPRule) netlink() *netlink.Rule {
	rule := netlink.NewRule()
	rule.Family = r.Family.netlinkFamily()
	rule.Priority = r.Priority
	rule.Mark = r.Mark
	rule.Table = r.Table
	return rule
}

func (r Route) netlink(loIndex int) *netlink.Route {
	bits := r.Dst.Bits()
	addrLen := 8 * len(r.Dst.Addr().AsSlice())
	return &netlink.Route{
		Family:    r.Family.netlinkFamily(),
		LinkIndex: loIndex,
		Dst:       &net.IPNet{IP: r.Dst.Addr().AsSlice(), Mask: net.CIDRMask(bits, addrLen)},
		Table:     r.Table,
		Type:      unix.RTN_LOCAL,
		Scope:     netlink.SCOPE_HOST,
		Protocol:  netlink.RouteProtocol(r.Protocol),
	}
}

// gone reports errors that mean "already not there" on removal.
func gone(err error) bool {
	return errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH) || errors.Is(err, unix.ENODEV)
}

// retryDump repeats a netlink dump that the kernel interrupted because the
// table changed under it (NLM_F_DUMP_INTR); the partial result may miss entries.
func retryDump[T any](dump func() (T, error)) (T, error) {
	var (
		v   T
		err error
	)
	for range 5 {
		v, err = dump()
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return v, err
		}
		time.Sleep(10 * time.Millisecond)
	}
	return v, err
}

// ourRules lists the ip rules at RulePriority, v4 and v6.
func ourRules() ([]netlink.Rule, error) {
	var out []netlink.Rule
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rules, err := retryDump(func() ([]netlink.Rule, error) { return netlink.RuleList(fam) })
		if err != nil {
			if fam == netlink.FAMILY_V6 && errors.Is(err, unix.EAFNOSUPPORT) {
				continue // kernel without IPv6
			}
			return nil, fmt.Errorf("netcfg: list ip %s rules: %w", familyName(fam), err)
		}
		for _, r := range rules {
			if r.Priority == RulePriority {
				r.Family = fam
				out = append(out, r)
			}
		}
	}
	return out, nil
}

// ourRoutes lists routes with RouteProtocol in every table, v4 and v6.
func ourRoutes() ([]netlink.Route, error) {
	var out []netlink.Route
	filter := &netlink.Route{Table: unix.RT_TABLE_UNSPEC, Protocol: RouteProtocol}
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		routes, err := retryDump(func() ([]netlink.Route, error) {
			return netlink.RouteListFiltered(fam, filter, netlink.RT_FILTER_TABLE|netlink.RT_FILTER_PROTOCOL)
		})
		if err != nil {
			if fam == netlink.FAMILY_V6 && errors.Is(err, unix.EAFNOSUPPORT) {
				continue
			}
			return nil, fmt.Errorf("netcfg: list ip %s routes: %w", familyName(fam), err)
		}
		out = append(out, routes...)
	}
	return out, nil
}

func describeRoute(r *netlink.Route) string {
	return fmt.Sprintf("%s table %d proto %d", r.Dst, r.Table, r.Protocol)
}

func describeRule(r *netlink.Rule) string {
	return fmt.Sprintf("%s fwmark %#x lookup %d priority %d", familyName(r.Family), r.Mark, r.Table, r.Priority)
}

// MarkRulesAhead lists the host's ip rules that come before tpgw's (a lower
// priority number) and match packets carrying mark by fwmark, such as
// mwan3's "fwmark 0x200/0x3f00" ones on an OpenWrt router with two WANs.
// The packets tpgw diverts would be routed by such a rule's table instead
// of tpgw's, and never reach the relay. It reads the calling thread's
// network namespace.
func MarkRulesAhead(mark uint32) ([]string, error) {
	var out []string
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rules, err := retryDump(func() ([]netlink.Rule, error) { return netlink.RuleList(fam) })
		if err != nil {
			if fam == netlink.FAMILY_V6 && errors.Is(err, unix.EAFNOSUPPORT) {
				continue
			}
			return nil, fmt.Errorf("netcfg: list ip %s rules: %w", familyName(fam), err)
		}
		for _, r := range rules {
			if r.Priority >= RulePriority || (r.Mark == 0 && r.Mask == nil) {
				continue // after tpgw's, or no fwmark match
			}
			mask := uint32(0xffffffff)
			if r.Mask != nil {
				mask = *r.Mask
			}
			if (mark&mask == r.Mark&mask) != r.Invert {
				not := ""
				if r.Invert {
					not = "not "
				}
				out = append(out, fmt.Sprintf("ip %s rule %d: %sfwmark %#x/%#x lookup %d", familyName(fam), r.Priority, not, r.Mark, mask, r.Table))
			}
		}
	}
	return out, nil
}
