//go:build tpgw_slim

// tpgw's router build: this file replaces mihomo v1.19.24's
// transport/restls/restls.go through `go build -overlay` (see
// packaging/slim.go). The restls plugin of shadowsocks (restls-client-go, a
// TLS fork of its own, ~0.5 MB) is not in the router build: the parser rejects
// `plugin: restls` with a message that says so, and this stub keeps the names
// mihomo's shadowsocks code uses.

package restls

import (
	"context"
	"errors"
	"net"
)

const Mode string = "restls"

type Config struct{}

// ErrNotBuilt is what the stub returns.
var ErrNotBuilt = errors.New("the restls plugin is not in tpgw's router build; use the full build")

func NewRestlsConfig(serverName, password, versionHint, script, clientID string) (*Config, error) {
	return nil, ErrNotBuilt
}

func NewRestls(context.Context, net.Conn, *Config) (net.Conn, error) { return nil, ErrNotBuilt }
