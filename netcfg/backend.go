package netcfg

import (
	"errors"
	"fmt"
	"log/slog"
	"slices"

	"github.com/coreos/go-iptables/iptables"
	"github.com/vishvananda/netlink"
)

// Backend puts a Plan into the kernel.
type Backend interface {
	Name() string
	// Apply first removes leftovers of an earlier run (see Cleanup), then
	// installs p. It is atomic: on error nothing of ours stays in the kernel.
	// stateDir keeps the record of changed sysctls; "" keeps none (a crash
	// then cannot restore them).
	Apply(p *Plan, stateDir string) (*Installed, error)
}

// Apply steps, in order; error messages and the test hook name them. The
// firewall step is named after the backend ("nftables" or "iptables").
const (
	stepCleanup  = "cleanup"
	stepNft      = "nftables"
	stepIPTables = "iptables"
	stepRules    = "ip rules"
	stepRoutes   = "ip routes"
	stepSysctl   = "sysctl"
)

// firewall is the packet filter part of a backend: it puts the plan's table
// or chains into the kernel and takes them out, found by our names.
type firewall interface {
	name() string
	// install adds everything, or on error nothing.
	install(p *Plan) error
	// update replaces what old installed with p, as atomically as the tool allows.
	update(old, p *Plan) error
	// remove deletes everything of ours, found in the kernel.
	remove() error
	// state is a fingerprint of ours in the kernel, to notice when
	// something else changed it (verify.go).
	state() (string, error)
}

type nftBackend struct {
	log *slog.Logger
	// beforeStep, when set (tests only), runs before each step; an error fails the step.
	beforeStep func(step string) error
}

// NewNftables returns the nftables backend: table inet tpgw through netlink,
// policy routing through rtnetlink, sysctls through /proc/sys. It works in the
// network namespace of the calling thread.
func NewNftables(log *slog.Logger) Backend {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &nftBackend{log: log}
}

func (b *nftBackend) Name() string { return "nftables" }

func (b *nftBackend) Apply(p *Plan, stateDir string) (*Installed, error) {
	return applyPlan(b.log, &nftFirewall{log: b.log}, b.beforeStep, p, stateDir)
}

type iptBackend struct {
	log        *slog.Logger
	beforeStep func(step string) error // tests only, as in nftBackend
}

// NewIPTables returns the iptables backend: chains TPGW* in the mangle and
// filter tables through the system's iptables and ip6tables commands (nft or
// legacy, through coreos/go-iptables), policy routing and sysctls as with
// nftables. It fails when iptables does not run or its TPROXY target is
// unusable. Note the TPROXY target drops packets when nothing listens: see
// doc.go for on-failure: open with this backend.
func NewIPTables(log *slog.Logger) (Backend, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := iptProbe(IPv4); err != nil {
		return nil, err
	}
	return &iptBackend{log: log}, nil
}

func (b *iptBackend) Name() string { return "iptables" }

func (b *iptBackend) Apply(p *Plan, stateDir string) (*Installed, error) {
	fw := &iptFirewall{log: b.log, ipt: map[Family]*iptables.IPTables{}}
	return applyPlan(b.log, fw, b.beforeStep, p, stateDir)
}

// ChooseBackend returns the backend named by the config ("nftables",
// "iptables" or "auto") and a sentence saying why, for the log. auto takes
// nftables when a throwaway table with a tproxy rule is accepted by the
// kernel, else iptables.
func ChooseBackend(name string, log *slog.Logger) (Backend, string, error) {
	switch name {
	case "nftables":
		return NewNftables(log), "nftables: configured", nil
	case "iptables":
		b, err := NewIPTables(log)
		if err != nil {
			return nil, "", err
		}
		return b, "iptables: configured", nil
	case "auto", "":
		nerr := probeNftables()
		if nerr == nil {
			return NewNftables(log), "auto: nftables available (netlink ok, tproxy ok)", nil
		}
		b, ierr := NewIPTables(log)
		if ierr != nil {
			return nil, "", fmt.Errorf("netcfg: no usable backend: nftables: %v; iptables: %w", nerr, ierr)
		}
		return b, fmt.Sprintf("auto: nftables unusable: %v; using iptables", nerr), nil
	}
	return nil, "", fmt.Errorf("netcfg: backend %q: must be nftables, iptables or auto", name)
}

// Installed is what one Apply put into the kernel.
type Installed struct {
	log      *slog.Logger
	stateDir string
	fw       firewall
	plan     *Plan  // what is installed now (Update replaces it)
	fwIn     bool   // the firewall part is in the kernel
	fwState  string // fw.state() once installed (Verify compares)
	rules    []*netlink.Rule
	routes   []*netlink.Route
	sysctls  []sysctlChange
	removed  bool
	dropSeen map[string]bool // host nftables chains warned about (warnInputDrop)
	// bypassSets are the DNSBypassSets opened on it: Update tells them
	// whether the new table has dns_bypass6.
	bypassSets []*DNSBypassSet
}

// Backend returns the name of the backend that installed it.
func (i *Installed) Backend() string { return i.fw.name() }

func applyPlan(log *slog.Logger, fw firewall, beforeStep func(string) error, p *Plan, stateDir string) (_ *Installed, err error) {
	step := func(name string) error {
		if beforeStep != nil {
			return beforeStep(name)
		}
		return nil
	}
	if p == nil {
		return nil, errors.New("netcfg: apply: nil plan")
	}
	if p.Table != TableName {
		// Cleanup finds our table by this name only; another name would outlive a crash.
		return nil, fmt.Errorf("netcfg: apply: plan table %q is not %q", p.Table, TableName)
	}
	if err := step(stepCleanup); err != nil {
		return nil, fmt.Errorf("netcfg: clean up earlier run: %w", err)
	}
	if err := Cleanup(log, stateDir); err != nil {
		return nil, fmt.Errorf("netcfg: clean up earlier run: %w", err)
	}
	inst := &Installed{log: log, stateDir: stateDir, fw: fw, plan: p}
	defer func() {
		if err != nil {
			if rerr := inst.Remove(); rerr != nil {
				err = errors.Join(err, fmt.Errorf("netcfg: undo: %w", rerr))
			}
		}
	}()

	// 1. The packet filter: nftables in one netlink batch (all or nothing),
	// iptables chain by chain with the jumps last.
	if err := step(fw.name()); err != nil {
		return nil, fmt.Errorf("netcfg: add %s rules: %w", fw.name(), err)
	}
	if err := fw.install(p); err != nil {
		return nil, err
	}
	inst.fwIn = true
	if inst.fwState, err = fw.state(); err != nil {
		return nil, err
	}
	inst.dropSeen = map[string]bool{}
	warnHostFirewall(log, p, inst.dropSeen)
	log.Debug("netcfg: firewall rules added", "backend", fw.name(), "chains", len(p.Chains), "sets", len(p.Sets))

	// 2. Policy routing: marked packets look up our table, which delivers every address locally.
	if err := inst.addRouting(p, step); err != nil {
		return nil, err
	}

	// 3. Sysctls, recorded in stateDir before they change.
	if err := step(stepSysctl); err != nil {
		return nil, fmt.Errorf("netcfg: set sysctls: %w", err)
	}
	changed, err := applySysctls(stateDir, p.Sysctls)
	inst.sysctls = changed
	if err != nil {
		return nil, err
	}
	for _, c := range changed {
		log.Info("netcfg: sysctl set", "key", c.Key, "value", c.New, "was", c.Old)
	}
	log.Info("netcfg: applied", "backend", fw.name(), "on_failure", p.Options.OnFailure,
		"proxy_self", p.Options.ProxySelf, "ip_rules", len(inst.rules), "routes", len(inst.routes), "sysctls", len(inst.sysctls))
	return inst, nil
}

// addRouting adds the plan's ip rules and routes, recording them in i.
func (i *Installed) addRouting(p *Plan, step func(string) error) error {
	if err := step(stepRules); err != nil {
		return fmt.Errorf("netcfg: add ip rule: %w", err)
	}
	for _, r := range p.IPRules {
		rule := r.netlink()
		if err := netlink.RuleAdd(rule); err != nil {
			return fmt.Errorf("netcfg: add ip rule fwmark %d: %w", r.Mark, err)
		}
		i.rules = append(i.rules, rule)
	}
	if err := step(stepRoutes); err != nil {
		return fmt.Errorf("netcfg: add ip route: %w", err)
	}
	if len(p.Routes) > 0 {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return fmt.Errorf("netcfg: find lo: %w", err)
		}
		for _, r := range p.Routes {
			route := r.netlink(lo.Attrs().Index)
			if err := netlink.RouteAdd(route); err != nil {
				return fmt.Errorf("netcfg: add ip route local %s table %d: %w", r.Dst, r.Table, err)
			}
			i.routes = append(i.routes, route)
		}
	}
	return nil
}

// removeRouting deletes the recorded routes and ip rules.
func (i *Installed) removeRouting() error {
	var errs []error
	for k := len(i.routes) - 1; k >= 0; k-- {
		if err := netlink.RouteDel(i.routes[k]); err != nil && !gone(err) {
			errs = append(errs, fmt.Errorf("netcfg: delete ip route %s: %w", describeRoute(i.routes[k]), err))
		}
	}
	for k := len(i.rules) - 1; k >= 0; k-- {
		if err := netlink.RuleDel(i.rules[k]); err != nil && !gone(err) {
			errs = append(errs, fmt.Errorf("netcfg: delete ip rule %s: %w", describeRule(i.rules[k]), err))
		}
	}
	if len(errs) == 0 {
		i.routes, i.rules = nil, nil
	}
	return errors.Join(errs...)
}

// Update replaces the installed rules with those of p, for a reload. The
// packet filter is swapped as atomically as the backend allows (nftables:
// the old table deleted and the new one added in one netlink transaction;
// iptables: new chains built beside the old, then the jumps switched), so
// established flows keep going: their relay sockets stay, and every packet
// meets either the old or the new rules. ip rules, routes and sysctls are
// replaced only when the plan changed them. On error the old rules may be
// partly replaced; Remove still removes everything.
func (i *Installed) Update(p *Plan) error {
	if i == nil || i.removed {
		return errors.New("netcfg: update: nothing installed")
	}
	if p == nil {
		return errors.New("netcfg: update: nil plan")
	}
	if p.Table != TableName {
		return fmt.Errorf("netcfg: update: plan table %q is not %q", p.Table, TableName)
	}
	old := i.plan
	if err := i.fw.update(old, p); err != nil {
		return fmt.Errorf("netcfg: update %s rules: %w", i.fw.name(), err)
	}
	i.plan = p
	for _, s := range i.bypassSets {
		s.ipv6.Store(p.Options.IPv6)
	}
	var err error
	if i.fwState, err = i.fw.state(); err != nil {
		return err
	}
	if !slices.Equal(old.IPRules, p.IPRules) || !slices.Equal(old.Routes, p.Routes) {
		if err := i.removeRouting(); err != nil {
			return fmt.Errorf("netcfg: update: %w", err)
		}
		if err := i.addRouting(p, func(string) error { return nil }); err != nil {
			return fmt.Errorf("netcfg: update: %w", err)
		}
	}
	if !slices.Equal(old.Sysctls, p.Sysctls) {
		if err := restoreSysctls(i.sysctls); err != nil {
			return fmt.Errorf("netcfg: update: %w", err)
		}
		i.sysctls = nil
		if err := removeSysctlState(i.stateDir); err != nil {
			return fmt.Errorf("netcfg: update: %w", err)
		}
		changed, err := applySysctls(i.stateDir, p.Sysctls)
		i.sysctls = changed
		if err != nil {
			return fmt.Errorf("netcfg: update: %w", err)
		}
	}
	i.log.Info("netcfg: updated", "backend", i.fw.name(), "on_failure", p.Options.OnFailure, "proxy_self", p.Options.ProxySelf)
	return nil
}

// Remove undoes Apply in reverse order: sysctls, routes, ip rules, then the
// nft table or iptables chains.
// Things already gone are not errors; it goes on after an error and returns
// all of them. Calling it again does nothing.
func (i *Installed) Remove() error {
	if i == nil || i.removed {
		return nil
	}
	var errs []error
	if len(i.sysctls) > 0 {
		if err := restoreSysctls(i.sysctls); err != nil {
			errs = append(errs, err)
		}
	}
	// The record goes once the old values are back (or if Apply never wrote any).
	if len(errs) == 0 {
		if err := removeSysctlState(i.stateDir); err != nil {
			errs = append(errs, err)
		}
	}
	if err := i.removeRouting(); err != nil {
		errs = append(errs, err)
	}
	if i.fwIn {
		if err := i.fw.remove(); err != nil {
			errs = append(errs, err)
		}
	}
	i.removed = true
	if len(errs) == 0 {
		i.log.Info("netcfg: removed", "backend", i.fw.name())
	}
	return errors.Join(errs...)
}

// Cleanup removes whatever an earlier run left in the kernel of the calling
// thread's network namespace, found by our own names alone: the nft table
// inet tpgw, the iptables/ip6tables chains TPGW* in mangle and filter and the
// jumps to them, ip rules at RulePriority, routes with RouteProtocol in any
// table. It removes both backends' leftovers whichever backend ran; with no
// iptables command on the system there is simply none to remove.
// It then restores the sysctls recorded in stateDir. It is idempotent and
// returns nil when there is nothing to remove.
func Cleanup(log *slog.Logger, stateDir string) error {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var errs []error
	if changes, err := loadSysctlState(stateDir); err != nil {
		errs = append(errs, err)
	} else if len(changes) > 0 {
		if err := restoreSysctls(changes); err != nil {
			errs = append(errs, err)
		} else {
			for _, c := range changes {
				log.Info("netcfg: cleanup: sysctl restored", "key", c.Key, "value", c.Old)
			}
			if err := removeSysctlState(stateDir); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if routes, err := ourRoutes(); err != nil {
		errs = append(errs, err)
	} else {
		for k := range routes {
			r := &routes[k]
			if err := netlink.RouteDel(r); err != nil && !gone(err) {
				errs = append(errs, fmt.Errorf("netcfg: cleanup: delete ip route %s: %w", describeRoute(r), err))
				continue
			}
			log.Info("netcfg: cleanup: ip route deleted", "route", describeRoute(r))
		}
	}
	if rules, err := ourRules(); err != nil {
		errs = append(errs, err)
	} else {
		for k := range rules {
			r := &rules[k]
			if err := netlink.RuleDel(r); err != nil && !gone(err) {
				errs = append(errs, fmt.Errorf("netcfg: cleanup: delete ip rule %s: %w", describeRule(r), err))
				continue
			}
			log.Info("netcfg: cleanup: ip rule deleted", "rule", describeRule(r))
		}
	}
	if deleted, err := deleteNftTable(); err != nil {
		errs = append(errs, err)
	} else if deleted {
		log.Info("netcfg: cleanup: nft table deleted", "table", "inet "+TableName)
	}
	if err := cleanupIPTables(log); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// RemoveDivert stops all interception and leaves the rest in place: it
// deletes the jumps into the divert chains (nft chains divert and divert_out
// of table inet tpgw; iptables chains TPGW_DIVERT and TPGW_DIVERT_OUT, v4 and
// v6), found in the kernel. LAN traffic is then forwarded directly, the
// gateway's own traffic (proxy-self) leaves directly, and the input guard
// still keeps the TPROXY and DNS ports closed. It is meant for a watchdog
// that sees tpgw die with on-failure: open, where the iptables TPROXY target
// would otherwise drop every intercepted packet. Nothing to remove is not an
// error; Cleanup or the next Apply removes the rest.
func RemoveDivert(log *slog.Logger) error {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var errs []error
	n, err := removeNftDivert()
	if err != nil {
		errs = append(errs, err)
	}
	k, err := removeIPTablesDivert(log)
	if err != nil {
		errs = append(errs, err)
	}
	if n+k > 0 {
		log.Info("netcfg: divert removed: interception stopped", "nft_jumps", n, "iptables_jumps", k)
	}
	return errors.Join(errs...)
}
