// Package engine embeds mihomo (the clash-meta core) as a library: rules, proxy
// groups and outbound proxies.
//
// It is the only package of tpgw that imports mihomo. It starts mihomo from the
// mihomo part of the config with mihomo's own tproxy inbound, DNS listener and
// iptables helper turned off (tpgw's relay, dns and netcfg replace them), and
// offers the relay a way to hand it a flow that the kernel TPROXYed: the flow's
// source, original destination and inbound name become mihomo metadata, so the
// fake-ip table, rules, proxy groups, outbounds and connection statistics
// (external-controller dashboards) apply as they would to mihomo's own inbound.
//
// mihomo keeps its state in package variables, so a process runs one Engine.
package engine
