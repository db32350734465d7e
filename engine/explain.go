package engine

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/metacubex/mihomo/config"
	C "github.com/metacubex/mihomo/constant"
)

// Decision is what mihomo's rules would do with a flow.
type Decision struct {
	Rule     string   // e.g. "IP-CIDR,203.0.113.3/32" or "MATCH"; "" when no rule matched (DIRECT by default)
	Outbound string   // the proxy or group the rule names
	Chain    []string // the group resolved to its current member, outermost first
}

func (d Decision) String() string {
	rule := d.Rule
	if rule == "" {
		rule = "no rule matched (default DIRECT)"
	}
	return fmt.Sprintf("rule %s → %s", rule, strings.Join(d.Chain, " → "))
}

// ExplainFlow parses the mihomo part of raw (like Check) and walks its rules
// for one flow, offline: host may be a domain (as mihomo sees it after the
// fake-ip lookup) or empty; dst is the destination address when known.
// Rules that need DNS (IP rules for a domain flow) resolve nothing here: they
// match only when dst is given. Process rules do not match.
func ExplainFlow(raw []byte, homeDir string, network string, src netip.AddrPort, host string, dst netip.AddrPort) (Decision, error) {
	if homeDir != "" {
		C.SetHomeDir(homeDir)
	}
	quietMihomoLog()
	rc, _, err := rawConfig(raw, 0)
	if err != nil {
		return Decision{}, err
	}
	rc.Profile.StoreFakeIP = false
	rc.Profile.StoreSelected = false
	cfg, err := config.ParseRawConfig(rc)
	if err != nil {
		return Decision{}, parseError(err)
	}
	md := &C.Metadata{
		Type:    C.TPROXY,
		SrcIP:   src.Addr().Unmap(),
		SrcPort: src.Port(),
		DstIP:   dst.Addr().Unmap(),
		DstPort: dst.Port(),
		Host:    host,
		InName:  InboundName,
	}
	md.NetWork = C.TCP
	if network == "udp" {
		md.NetWork = C.UDP
	}
	switch cfg.General.Mode.String() {
	case "direct":
		return Decision{Rule: "mode: direct", Outbound: "DIRECT", Chain: []string{"DIRECT"}}, nil
	case "global":
		return resolveChain(cfg.Proxies, "GLOBAL", "mode: global", md), nil
	}
	helper := C.RuleMatchHelper{ResolveIP: func() {}, FindProcess: func() {}}
	for _, r := range cfg.Rules {
		ok, adapter := r.Match(md, helper)
		if !ok {
			continue
		}
		p, exists := cfg.Proxies[adapter]
		if !exists {
			continue
		}
		if md.NetWork == C.UDP && !p.SupportUDP() {
			continue // mihomo skips such a rule for UDP
		}
		name := r.RuleType().String()
		if r.Payload() != "" {
			name += "," + r.Payload()
		}
		return resolveChain(cfg.Proxies, adapter, name, md), nil
	}
	return Decision{Outbound: "DIRECT", Chain: []string{"DIRECT"}}, nil
}

func resolveChain(proxies map[string]C.Proxy, name, rule string, md *C.Metadata) Decision {
	d := Decision{Rule: rule, Outbound: name}
	p := proxies[name]
	for p != nil && len(d.Chain) < 16 {
		d.Chain = append(d.Chain, p.Name())
		p = p.Unwrap(md, false)
	}
	return d
}
