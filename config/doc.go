// Package config reads a tpgw configuration file.
//
// The file is a normal mihomo config plus a `tpgw:` section. The whole file is
// kept as bytes for the engine (which hands the mihomo part to mihomo); this
// package reads only the few mihomo keys the gateway itself needs (tproxy-port,
// routing-mark, the dns block, ipv6) and turns the `tpgw:` section into typed,
// validated settings with the defaults of design.md. Errors name the key and,
// where the YAML parser knows it, the line.
//
// This package does not import mihomo: the engine validates the mihomo part.
package config
