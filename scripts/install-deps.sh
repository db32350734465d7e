#!/bin/sh
# Installs the Debian packages tpgw's tests and demo use, when missing
# (with the argument "bench": also what make bench uses).
# Needs root (apt-get). Safe to run again: it only installs what is absent.
set -eu
need=""
check() { # check PROGRAM PACKAGE
	command -v "$1" >/dev/null 2>&1 || need="$need $2"
}
check nft nftables
check ip iproute2
check ss iproute2
check iptables iptables
check iperf3 iperf3
check curl curl
check dig dnsutils
check dnsmasq dnsmasq-base
check ss-server shadowsocks-libev
check ss-redir shadowsocks-libev
check v2ray v2ray
check trojan trojan
check openssl openssl
check gcc gcc
check strace strace
check ping iputils-ping
check dnsperf dnsperf # e2e TestLocalNamesUnderLoad, and make bench
check systemd-analyze systemd # packaging TestSystemdUnit verifies the unit
if [ "${1:-}" = bench ]; then # make bench only
	check wrk wrk
fi
if [ -n "$need" ]; then
	if [ "$(id -u)" != 0 ]; then
		echo "install-deps: missing packages:$need (run as root to install them)" >&2
		exit 1
	fi
	echo "install-deps: installing$need"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	# shellcheck disable=SC2086
	apt-get install -y -qq --no-install-recommends $need >/dev/null
fi
# The TPROXY path needs these kernel modules; load them if they are modules.
for m in nf_tproxy_ipv4 nf_tproxy_ipv6 nft_tproxy nft_socket xt_TPROXY xt_socket; do
	modprobe -q "$m" 2>/dev/null || true
done
