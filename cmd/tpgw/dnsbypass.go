package main

import (
	"errors"
	"net/netip"
	"sync"
	"time"

	"github.com/tpgw/tpgw/netcfg"
)

// lateBypassSet lets the DNS server start (before the kernel rules, as
// every listener does) with dns-bypass on: until the rules and their sets
// are installed, Add fails and the server answers with fake IPs.
type lateBypassSet struct {
	mu  sync.Mutex
	set *netcfg.DNSBypassSet
}

var errBypassNotInstalled = errors.New("dns-bypass set not installed")

func (l *lateBypassSet) attach(s *netcfg.DNSBypassSet) {
	l.mu.Lock()
	l.set = s
	l.mu.Unlock()
}

func (l *lateBypassSet) current() *netcfg.DNSBypassSet {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.set
}

func (l *lateBypassSet) Add(addrs []netip.Addr, timeout time.Duration) error {
	if s := l.current(); s != nil {
		return s.Add(addrs, timeout)
	}
	return errBypassNotInstalled
}

func (l *lateBypassSet) Flush() error {
	if s := l.current(); s != nil {
		return s.Flush()
	}
	return nil
}
