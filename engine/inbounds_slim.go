//go:build tpgw_slim

// tpgw's router build (`make openwrt`, tag tpgw_slim) links mihomo through
// the overlay in packaging/slim, without most of its inbound servers and some
// outbound types.

package engine

import (
	"fmt"
	"log/slog"
	"slices"

	"github.com/metacubex/mihomo/config"
)

// keptListenerTypes are the `listeners:` types the router build serves; it
// must match packaging/slim/listener/parse.go.
var keptListenerTypes = []string{"socks", "http", "mixed", "tproxy"}

// warnInboundsNotBuilt logs one warning per key of rc that the router build
// ignores. Check calls it, and Check runs before every start and reload.
func warnInboundsNotBuilt(rc *config.RawConfig, log *slog.Logger) {
	for _, key := range inboundsNotBuilt(rc) {
		log.Warn("config key ignored: its inbound server is not in tpgw's router build "+
			"(kept: port, socks-port, mixed-port, listeners of type socks, http, mixed, tproxy); use the full build",
			"key", key)
	}
}

// inboundsNotBuilt names the keys of rc that ask for an inbound server the
// router build leaves out. mihomo (with the overlay) accepts and ignores
// them, so existing configs still load; Check reports them. tproxy-port is
// tpgw's own and tun.enable is turned off in both builds, both by rawConfig.
func inboundsNotBuilt(rc *config.RawConfig) []string {
	var keys []string
	add := func(cond bool, key string) {
		if cond {
			keys = append(keys, key)
		}
	}
	add(rc.RedirPort != 0, "redir-port")
	add(rc.ShadowSocksConfig != "", "ss-config")
	add(rc.VmessConfig != "", "vmess-config")
	add(rc.TuicServer.Enable, "tuic-server")
	add(len(rc.Tunnels) > 0, "tunnels")
	for i, l := range rc.Listeners {
		typ, _ := l["type"].(string)
		if !slices.Contains(keptListenerTypes, typ) {
			name, _ := l["name"].(string)
			keys = append(keys, fmt.Sprintf("listeners[%d] %s (type %s)", i, name, typ))
		}
	}
	return keys
}
