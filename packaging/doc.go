// Package packaging builds tpgw's installable packages without a distribution's
// build system: OpenWrt .ipk files for opkg (OpenWrt ≤ 24.10), written with
// archive/tar and compress/gzip so that `make openwrt` needs only Go.
//
// The package files themselves live beside this code:
//
//	openwrt/tpgw/Makefile          feed Makefile for the OpenWrt SDK (golang-package.mk)
//	openwrt/tpgw/files/tpgw.init   procd init script → /etc/init.d/tpgw
//	openwrt/tpgw/files/config.yaml shipped config → /etc/tpgw/config.yaml (conffile)
//	openwrt/ipk/postinst, prerm    opkg maintainer scripts
//	systemd/tpgw.service           unit for systemd distributions
//	slim/                          the router build's replacements for mihomo files (slim.go)
//
// The .ipk written here and the package the SDK builds from the feed Makefile
// hold the same files with the same modes; a test keeps them in step. The
// binary in the .ipk is the router build (slim.go): mihomo through
// `go build -overlay`, without the parts a router does not use.
//
// Format (what opkg reads, libopkg/libbb unarchive.c in opkg-lede): an .ipk is
// a gzip-compressed tar (not an ar archive like a .deb: OpenWrt's opkg only
// gunzips and walks a tar) holding ./debian-binary ("2.0\n"),
// ./data.tar.gz and ./control.tar.gz, in that order, as OpenWrt's own
// scripts/ipkg-build writes them. Headers are plain ustar/GNU: opkg knows no
// PAX headers, so names stay short and attributes simple.
package packaging
