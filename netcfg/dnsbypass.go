package netcfg

import (
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/nftables"
)

// DNSBypassSet adds addresses to the dynamic sets dns_bypass4/6 of the
// installed table inet tpgw, each with its own timeout, so that flows to them
// are forwarded by the kernel (see doc.go, "DNS-driven bypass"). The fake-ip
// DNS server (package dns) is its only user. Safe for concurrent use.
type DNSBypassSet struct {
	mu   sync.Mutex
	conn *nftables.Conn // one netlink socket, opened in the gateway's namespace
	ipv6 atomic.Bool    // dns_bypass6 exists: the installed plan's IPv6, which Update changes
}

// DNSBypassSet opens the dns-bypass sets of what i installed. It fails
// when the plan has dns-bypass off or the backend is not nftables. The
// netlink socket is opened in the calling thread's network namespace.
func (i *Installed) DNSBypassSet() (*DNSBypassSet, error) {
	if i == nil || i.removed {
		return nil, errors.New("netcfg: dns-bypass: nothing installed")
	}
	if !i.plan.Options.DNSBypass {
		return nil, errors.New("netcfg: dns-bypass is off in the installed plan")
	}
	if i.fw.name() != "nftables" {
		return nil, ErrDNSBypassIPTables
	}
	conn, err := nftables.New(nftables.AsLasting())
	if err != nil {
		return nil, fmt.Errorf("netcfg: dns-bypass: open nftables netlink: %w", err)
	}
	s := &DNSBypassSet{conn: conn}
	s.ipv6.Store(i.plan.Options.IPv6)
	i.bypassSets = append(i.bypassSets, s)
	return s, nil
}

func (s *DNSBypassSet) set(f Family) *nftables.Set {
	if f == IPv6 {
		return &nftables.Set{Table: nftTable(), Name: SetDNSBypass6, KeyType: nftables.TypeIP6Addr, HasTimeout: true}
	}
	return &nftables.Set{Table: nftTable(), Name: SetDNSBypass4, KeyType: nftables.TypeIPAddr, HasTimeout: true}
}

// Add puts addrs into the set of their family with timeout, in one netlink
// transaction; an address already there gets the new timeout. IPv6
// addresses are skipped when the plan does not intercept IPv6 (their flows
// are forwarded by the kernel anyway).
func (s *DNSBypassSet) Add(addrs []netip.Addr, timeout time.Duration) error {
	if timeout < time.Second {
		return fmt.Errorf("netcfg: dns-bypass: timeout %v is too short", timeout)
	}
	var v4, v6 []nftables.SetElement
	for _, a := range addrs {
		a = a.Unmap()
		switch {
		case a.Is4():
			v4 = append(v4, nftables.SetElement{Key: a.AsSlice(), Timeout: timeout})
		case a.Is6() && s.ipv6.Load():
			v6 = append(v6, nftables.SetElement{Key: a.AsSlice(), Timeout: timeout})
		}
	}
	if len(v4) == 0 && len(v6) == 0 {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, f := range []struct {
		set   *nftables.Set
		elems []nftables.SetElement
	}{{s.set(IPv4), v4}, {s.set(IPv6), v6}} {
		if len(f.elems) == 0 {
			continue
		}
		// Kernels before 6.10 keep an element's timeout when it is added
		// again: the element is made anew (added, so that the delete
		// finds it whether it was there or not, deleted, added), in the
		// one transaction, so no packet sees the set without it.
		keys := make([]nftables.SetElement, len(f.elems))
		for i, e := range f.elems {
			keys[i] = nftables.SetElement{Key: e.Key}
		}
		err := s.conn.SetAddElements(f.set, f.elems)
		if err == nil {
			err = s.conn.SetDeleteElements(f.set, keys)
		}
		if err == nil {
			err = s.conn.SetAddElements(f.set, f.elems)
		}
		if err != nil {
			return fmt.Errorf("netcfg: dns-bypass: add to %s: %w", f.set.Name, err)
		}
	}
	if err := s.conn.Flush(); err != nil {
		return fmt.Errorf("netcfg: dns-bypass: add %d addresses: %w", len(v4)+len(v6), err)
	}
	return nil
}

// Flush empties the sets (a reload: the rules that put the addresses there
// may have changed). Connections already labelled stay in the kernel.
func (s *DNSBypassSet) Flush() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.conn.FlushSet(s.set(IPv4))
	if s.ipv6.Load() {
		s.conn.FlushSet(s.set(IPv6))
	}
	if err := s.conn.Flush(); err != nil {
		return fmt.Errorf("netcfg: dns-bypass: flush sets: %w", err)
	}
	return nil
}

// Close closes the netlink socket. The sets go with the table (Installed.Remove).
func (s *DNSBypassSet) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.conn.CloseLasting()
}
