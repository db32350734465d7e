package config

import (
	"fmt"
	"net/netip"
	"strconv"

	"gopkg.in/yaml.v3"
)

// inbound is one of mihomo's own listening servers in the config (its mixed,
// socks, http and redir ports, `listeners:`, the external-controller). tpgw
// starts them beside its own listeners; one that shares a port with tpgw's
// TPROXY listener or its DNS server made the start fail with "bind: address
// already in use", naming neither key.
type inbound struct {
	key  string
	node *yaml.Node
	addr netip.AddrPort // an unspecified address: all of them
}

// inbounds collects mihomo's inbound servers from the top-level mapping. Keys
// that do not parse are left to mihomo, which reports them.
func inbounds(root *yaml.Node) []inbound {
	var (
		found    []inbound
		allowLAN bool
		bind     = netip.IPv6Unspecified()
		top      []inbound
	)
	kvs, _ := pairs(root)
	for _, kv := range kvs {
		k, v := kv[0], kv[1]
		switch k.Value {
		case "port", "socks-port", "mixed-port", "redir-port":
			if port, ok := portValue(v); ok {
				top = append(top, inbound{key: k.Value, node: v, addr: netip.AddrPortFrom(netip.Addr{}, port)})
			}
		case "allow-lan":
			_ = v.Decode(&allowLAN)
		case "bind-address":
			var s string
			if v.Decode(&s) == nil {
				if a, err := netip.ParseAddr(s); err == nil {
					bind = a
				}
			}
		case "external-controller":
			var s string
			if v.Decode(&s) == nil {
				if ap, err := parseListen(s); err == nil && ap.Port() != 0 {
					found = append(found, inbound{key: k.Value, node: v, addr: ap})
				}
			}
		case "listeners":
			// Aliases and merge keys as mihomo reads them: a listener
			// may take its port from an anchored mapping (<<: *base).
			for j, l := range resolveAlias(v).Content {
				fields, ok := pairs(l)
				if !ok {
					continue
				}
				addr := netip.IPv4Unspecified()
				var port *yaml.Node
				for _, kv := range fields {
					switch kv[0].Value {
					case "listen":
						var s string
						if kv[1].Decode(&s) == nil {
							if a, err := netip.ParseAddr(s); err == nil {
								addr = a
							}
						}
					case "port":
						port = kv[1]
					}
				}
				if port == nil {
					continue
				}
				if p, ok := portValue(port); ok {
					found = append(found, inbound{key: fmt.Sprintf("listeners[%d].port", j), node: resolveAlias(port),
						addr: netip.AddrPortFrom(addr, p)})
				}
			}
		}
	}
	// mihomo binds its top-level ports to bind-address ("*": all addresses)
	// with allow-lan, to 127.0.0.1 without.
	if !allowLAN {
		bind = netip.MustParseAddr("127.0.0.1")
	}
	for _, in := range top {
		in.addr = netip.AddrPortFrom(bind, in.addr.Port())
		found = append(found, in)
	}
	return found
}

// portValue is a port number node's value; ok is false for 0 (off) and for
// what is not a port.
func portValue(n *yaml.Node) (uint16, bool) {
	n = resolveAlias(n)
	if n.Kind != yaml.ScalarNode {
		return 0, false
	}
	// As YAML reads an integer (0x1ed5 and 0o17325 too), or a quoted one.
	var v int64
	if n.Decode(&v) != nil {
		u, err := strconv.ParseUint(n.Value, 10, 16)
		if err != nil {
			return 0, false
		}
		v = int64(u)
	}
	return uint16(v), v > 0 && v <= 65535
}

// checkPorts fails when one of mihomo's inbound servers would take a port that
// tpgw's own listeners bind: the TPROXY listener (TCP and UDP on every
// address) and, when it runs, the DNS server (UDP and TCP on dns.listen).
// Either protocol collides, so the inbound's protocols do not matter.
func (p parser) checkPorts(c *Config, found []inbound) error {
	for _, in := range found {
		if in.addr.Port() == c.TProxyPort {
			return p.errf(in.node, in.key, "%d is also tproxy-port, the port of tpgw's TPROXY listener; give one of them another port", c.TProxyPort)
		}
		if c.DNS.Enable && in.addr.Port() == c.DNS.Listen.Port() && overlap(in.addr.Addr(), c.DNS.Listen.Addr()) {
			return p.errf(in.node, in.key, "%d is also the port of dns.listen (%s), where tpgw's DNS server listens; give one of them another port", in.addr.Port(), c.DNS.Listen)
		}
	}
	return nil
}

// overlap reports whether sockets bound to a and b on one port collide: one of
// them takes every address, or both the same one.
func overlap(a, b netip.Addr) bool {
	return a.IsUnspecified() || b.IsUnspecified() || a.Unmap() == b.Unmap()
}
