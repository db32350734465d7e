//go:build tpgw_slim

// tpgw's router build: this file replaces mihomo v1.19.24's adapter/parser.go
// through `go build -overlay` (see packaging/slim.go). ParseProxy names only
// the outbound types kept in the router build, so the linker leaves the
// others out; a config that uses one fails with an error that says so.

package adapter

import (
	"fmt"
	"strings"

	"github.com/metacubex/mihomo/adapter/outbound"
	"github.com/metacubex/mihomo/common/structure"
	C "github.com/metacubex/mihomo/constant"
)

// keptTypes are the outbound types of the router build, in the order the
// error message lists them.
var keptTypes = []string{"ss", "vmess", "vless", "trojan", "socks5", "http", "hysteria2", "tuic", "direct", "reject", "dns"}

// droppedPlugins are shadowsocks plugins whose transport is a stub here.
var droppedPlugins = []string{"kcptun", "restls"}

func ParseProxy(mapping map[string]any, options ...ProxyOption) (C.Proxy, error) {
	decoder := structure.NewDecoder(structure.Option{TagName: "proxy", WeaklyTypedInput: true, KeyReplacer: structure.DefaultKeyReplacer})
	proxyType, ok := mapping["type"].(string)
	if !ok {
		return nil, fmt.Errorf("missing type")
	}
	name, _ := mapping["name"].(string)
	opt := proxyOption{}
	for _, o := range options {
		o(&opt)
	}
	basic := outbound.BasicOption{DialerForAPI: opt.DialerForAPI, ProviderName: opt.ProviderName}

	var (
		proxy outbound.ProxyAdapter
		err   error
	)
	switch proxyType {
	case "ss":
		if plugin, _ := mapping["plugin"].(string); contains(droppedPlugins, plugin) {
			return nil, fmt.Errorf("proxy %q: shadowsocks plugin %q is not in tpgw's router build (kept: obfs, v2ray-plugin, gost-plugin, shadow-tls); use the full build",
				name, plugin)
		}
		o := &outbound.ShadowSocksOption{BasicOption: basic}
		if err = decoder.Decode(mapping, o); err == nil {
			proxy, err = outbound.NewShadowSocks(*o)
		}
	case "vmess":
		o := &outbound.VmessOption{BasicOption: basic}
		if err = decoder.Decode(mapping, o); err == nil {
			proxy, err = outbound.NewVmess(*o)
		}
	case "vless":
		o := &outbound.VlessOption{BasicOption: basic}
		if err = decoder.Decode(mapping, o); err == nil {
			proxy, err = outbound.NewVless(*o)
		}
	case "trojan":
		o := &outbound.TrojanOption{BasicOption: basic}
		if err = decoder.Decode(mapping, o); err == nil {
			proxy, err = outbound.NewTrojan(*o)
		}
	case "socks5":
		o := &outbound.Socks5Option{BasicOption: basic}
		if err = decoder.Decode(mapping, o); err == nil {
			proxy, err = outbound.NewSocks5(*o)
		}
	case "http":
		o := &outbound.HttpOption{BasicOption: basic}
		if err = decoder.Decode(mapping, o); err == nil {
			proxy, err = outbound.NewHttp(*o)
		}
	case "hysteria2":
		o := &outbound.Hysteria2Option{BasicOption: basic}
		if err = decoder.Decode(mapping, o); err == nil {
			proxy, err = outbound.NewHysteria2(*o)
		}
	case "tuic":
		o := &outbound.TuicOption{BasicOption: basic}
		if err = decoder.Decode(mapping, o); err == nil {
			proxy, err = outbound.NewTuic(*o)
		}
	case "direct":
		o := &outbound.DirectOption{BasicOption: basic}
		if err = decoder.Decode(mapping, o); err == nil {
			proxy = outbound.NewDirectWithOption(*o)
		}
	case "reject":
		o := &outbound.RejectOption{BasicOption: basic}
		if err = decoder.Decode(mapping, o); err == nil {
			proxy = outbound.NewRejectWithOption(*o)
		}
	case "dns":
		o := &outbound.DnsOption{BasicOption: basic}
		if err = decoder.Decode(mapping, o); err == nil {
			proxy = outbound.NewDnsWithOption(*o)
		}
	case "ssr", "snell", "hysteria", "wireguard", "ssh", "mieru", "anytls", "sudoku", "masque", "trusttunnel":
		return nil, fmt.Errorf("proxy %q: type %q is not in tpgw's router build (kept: %s); use the full build",
			name, proxyType, strings.Join(keptTypes, ", "))
	default:
		return nil, fmt.Errorf("unsupport proxy type: %s", proxyType)
	}
	if err != nil {
		return nil, err
	}

	if muxMapping, ok := mapping["smux"].(map[string]any); ok {
		muxOption := &outbound.SingMuxOption{}
		if err := decoder.Decode(muxMapping, muxOption); err != nil {
			return nil, err
		}
		if muxOption.Enabled {
			if proxy, err = outbound.NewSingMux(*muxOption, proxy); err != nil {
				return nil, err
			}
		}
	}
	return NewProxy(outbound.NewAutoCloseProxyAdapter(proxy)), nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

type proxyOption struct {
	DialerForAPI C.Dialer
	ProviderName string
}

type ProxyOption func(opt *proxyOption)

func WithDialerForAPI(dialer C.Dialer) ProxyOption {
	return func(opt *proxyOption) { opt.DialerForAPI = dialer }
}

func WithProviderName(name string) ProxyOption {
	return func(opt *proxyOption) { opt.ProviderName = name }
}
