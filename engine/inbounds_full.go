//go:build !tpgw_slim

package engine

import (
	"log/slog"

	"github.com/metacubex/mihomo/config"
)

// warnInboundsNotBuilt says nothing in the full build: every mihomo inbound
// server is linked. See inbounds_slim.go for the router build.
func warnInboundsNotBuilt(*config.RawConfig, *slog.Logger) {}
