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
// # TCP flows
//
// A TPROXYed TCP flow takes mihomo's decisions step by step (flow.go): fake
// IPs mapped back to names, the rule match, the dial with mihomo's retries,
// the connection's entry in mihomo's statistics. These are mihomo's own
// functions, reached by name (go:linkname; TestMihomoInternals pins what they
// do). What differs is the relay of a flow whose two ends are plain kernel
// sockets (DIRECT): mihomo's relay holds two goroutines per flow for its
// whole life, about 12 KiB of stacks that an idle connection pays for
// nothing. tpgw pumps each direction with a short-lived goroutine instead,
// parks a direction that has nothing to read when the flow starts, or that
// is quiet for half a second, in one epoll set, and
// hands a direction that turns bulk to sing's copy, which splices (park.go).
// An idle DIRECT flow then holds two descriptors and about 3.5 KiB of heap.
// Flows through other outbounds (shadowsocks, vmess, ...), and every flow
// while mihomo's sniffer is on, go through mihomo's relay, wrapped so that
// they splice only once bulk (tcpconn.go).
//
// mihomo keeps its state in package variables, so a process runs one Engine.
package engine
