//go:build tpgw_slim

// tpgw's router build: this file replaces mihomo v1.19.24's listener/parse.go
// through `go build -overlay` (see packaging/slim.go). A `listeners:` entry of
// a kept type (socks, http, mixed, tproxy) works as in mihomo; any other type
// parses into an inert listener that never opens a socket, so an existing
// config still loads. tpgw's engine reports each such entry when it checks a
// config.

package listener

import (
	"fmt"

	"github.com/metacubex/mihomo/common/structure"
	C "github.com/metacubex/mihomo/constant"
	IN "github.com/metacubex/mihomo/listener/inbound"
)

func ParseListener(mapping map[string]any) (C.InboundListener, error) {
	decoder := structure.NewDecoder(structure.Option{TagName: "inbound", WeaklyTypedInput: true, KeyReplacer: structure.DefaultKeyReplacer})
	listenerType, ok := mapping["type"].(string)
	if !ok {
		return nil, fmt.Errorf("missing type")
	}
	switch listenerType {
	case "socks":
		o := &IN.SocksOption{UDP: true}
		if err := decoder.Decode(mapping, o); err != nil {
			return nil, err
		}
		return IN.NewSocks(o)
	case "http":
		o := &IN.HTTPOption{}
		if err := decoder.Decode(mapping, o); err != nil {
			return nil, err
		}
		return IN.NewHTTP(o)
	case "mixed":
		o := &IN.MixedOption{UDP: true}
		if err := decoder.Decode(mapping, o); err != nil {
			return nil, err
		}
		return IN.NewMixed(o)
	case "tproxy":
		o := &IN.TProxyOption{UDP: true}
		if err := decoder.Decode(mapping, o); err != nil {
			return nil, err
		}
		return IN.NewTProxy(o)
	case "redir", "tunnel", "tun", "shadowsocks", "vmess", "vless", "trojan", "hysteria2", "tuic",
		"anytls", "mieru", "sudoku", "trusttunnel":
		o := &IN.BaseOption{}
		if err := decoder.Decode(mapping, o); err != nil {
			return nil, err
		}
		return IN.NewBase(o) // Listen does nothing
	default:
		return nil, fmt.Errorf("unsupport proxy type: %s", listenerType)
	}
}
