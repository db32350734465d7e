// Package bench measures tpgw against kernel forwarding and its peers, side by
// side in one run, inside the throwaway namespaces of internal/testnet:
//
//	client ns ── gateway ns (the setup under test) ── upstream ns (iperf3 -s, HTTP) ── proxy ns (ss-server)
//
// The setups, one at a time in the gateway namespace, with the same kernel
// TPROXY rules (netcfg's plan) for every user-space gateway:
//
//	K              kernel forwarding: ip_forward=1, no rules, no process
//	K+ct           K with one stateful forward rule, so conntrack is on (TCP figures only)
//	tpgw           bin/tpgw run, MATCH,DIRECT
//	mihomo-tproxy  the same embedded mihomo serving tproxy-port itself (bench/cmd/mihomo-tproxy)
//	tpgw ss        bin/tpgw run, MATCH,ss to the real ss-server
//	ss-redir       shadowsocks-libev ss-redir -T (TPROXY) to the same ss-server
//	tpgw dns-bypass  bin/tpgw run with tpgw.dns-bypass: a DIRECT-by-domain flow the kernel forwards
//
// Each repetition starts every setup in turn (measureOrder, reversed in
// every second repetition, so that the setups a target compares run next
// to each other), runs the figures that apply to it and stops it; the report
// gives the median of the repetitions. Gateway CPU is utime+stime of the
// gateway process from /proc/PID/stat. Every namespace's TCP congestion
// control is pinned (Options.CC, reno by default in tpgw-bench) so that a
// host whose default paces every sender (BBR) gives figures comparable with
// one whose default does not; TestNamespacesTakeCC checks, in namespaces it
// makes, that a TCP socket made after the setting takes it. Around the
// runs of the fastest UDP rate (iperf3's default buffers, then -w 4M, then
// -R -w 4M, the download) the bench reads each namespace's UDP
// receive-buffer drops
// (TestUDPRcvbufErrorsCounted drops datagrams at a full buffer and finds
// them counted), and after tpgw's UDP runs the count of datagrams it dropped
// itself, from its log at its stop (ParseUDPDropsLog, which also gives the
// run's log how many datagrams tpgw held for their session's sender in
// mihomo): together they show where a loss happened. The pure parts
// (parsers, medians, report, SVG) are unit-tested; the run itself needs root
// and is started by `make bench` (bench/cmd/tpgw-bench).
package bench
