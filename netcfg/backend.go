package netcfg

import (
	"errors"
	"fmt"
	"log/slog"

	"github.com/google/nftables"
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

// Apply steps, in order; error messages and the test hook name them.
const (
	stepCleanup = "cleanup"
	stepNft     = "nftables"
	stepRules   = "ip rules"
	stepRoutes  = "ip routes"
	stepSysctl  = "sysctl"
)

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

func (b *nftBackend) step(name string) error {
	if b.beforeStep != nil {
		return b.beforeStep(name)
	}
	return nil
}

// Installed is what one Apply put into the kernel.
type Installed struct {
	log      *slog.Logger
	stateDir string
	nftTable bool
	rules    []*netlink.Rule
	routes   []*netlink.Route
	sysctls  []sysctlChange
	removed  bool
}

func (b *nftBackend) Apply(p *Plan, stateDir string) (_ *Installed, err error) {
	if p == nil {
		return nil, errors.New("netcfg: apply: nil plan")
	}
	if p.Table != TableName {
		// Cleanup finds our table by this name only; another name would outlive a crash.
		return nil, fmt.Errorf("netcfg: apply: plan table %q is not %q", p.Table, TableName)
	}
	if err := b.step(stepCleanup); err != nil {
		return nil, fmt.Errorf("netcfg: clean up earlier run: %w", err)
	}
	if err := Cleanup(b.log, stateDir); err != nil {
		return nil, fmt.Errorf("netcfg: clean up earlier run: %w", err)
	}
	inst := &Installed{log: b.log, stateDir: stateDir}
	defer func() {
		if err != nil {
			if rerr := inst.Remove(); rerr != nil {
				err = errors.Join(err, fmt.Errorf("netcfg: undo: %w", rerr))
			}
		}
	}()

	// 1. nftables: one netlink batch, applied by the kernel all or nothing.
	if err := b.step(stepNft); err != nil {
		return nil, fmt.Errorf("netcfg: add nft table inet %s: %w", p.Table, err)
	}
	conn, err := nftables.New()
	if err != nil {
		return nil, fmt.Errorf("netcfg: open nftables netlink: %w", err)
	}
	if err := queueNftPlan(conn, p); err != nil {
		return nil, err
	}
	if err := conn.Flush(); err != nil {
		return nil, fmt.Errorf("netcfg: add nft table inet %s: %w", p.Table, err)
	}
	inst.nftTable = true
	b.log.Debug("netcfg: nft table added", "table", "inet "+p.Table, "rules", len(p.Rules), "sets", len(p.Sets))

	// 2. Policy routing: marked packets look up our table...
	if err := b.step(stepRules); err != nil {
		return nil, fmt.Errorf("netcfg: add ip rule: %w", err)
	}
	for _, r := range p.IPRules {
		rule := r.netlink()
		if err := netlink.RuleAdd(rule); err != nil {
			return nil, fmt.Errorf("netcfg: add ip rule fwmark %d: %w", r.Mark, err)
		}
		inst.rules = append(inst.rules, rule)
	}
	// ...which delivers every address locally.
	if err := b.step(stepRoutes); err != nil {
		return nil, fmt.Errorf("netcfg: add ip route: %w", err)
	}
	if len(p.Routes) > 0 {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return nil, fmt.Errorf("netcfg: find lo: %w", err)
		}
		for _, r := range p.Routes {
			route := r.netlink(lo.Attrs().Index)
			if err := netlink.RouteAdd(route); err != nil {
				return nil, fmt.Errorf("netcfg: add ip route local %s table %d: %w", r.Dst, r.Table, err)
			}
			inst.routes = append(inst.routes, route)
		}
	}

	// 3. Sysctls, recorded in stateDir before they change.
	if err := b.step(stepSysctl); err != nil {
		return nil, fmt.Errorf("netcfg: set sysctls: %w", err)
	}
	changed, err := applySysctls(stateDir, p.Sysctls)
	inst.sysctls = changed
	if err != nil {
		return nil, err
	}
	for _, c := range changed {
		b.log.Info("netcfg: sysctl set", "key", c.Key, "value", c.New, "was", c.Old)
	}
	b.log.Info("netcfg: applied", "backend", b.Name(), "table", "inet "+p.Table,
		"ip_rules", len(inst.rules), "routes", len(inst.routes), "sysctls", len(inst.sysctls))
	return inst, nil
}

// Remove undoes Apply in reverse order: sysctls, routes, ip rules, nft table.
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
	if i.nftTable {
		if _, err := deleteNftTable(); err != nil {
			errs = append(errs, err)
		}
	}
	i.removed = true
	if len(errs) == 0 {
		i.log.Info("netcfg: removed", "table", "inet "+TableName)
	}
	return errors.Join(errs...)
}

// Cleanup removes whatever an earlier run left in the kernel of the calling
// thread's network namespace, found by our own names alone: the nft table
// inet tpgw, ip rules at RulePriority, routes with RouteProtocol in any table.
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
	return errors.Join(errs...)
}
