//go:build tpgw_slim

// tpgw's router build: this file replaces mihomo v1.19.24's
// transport/kcptun/client.go (common.go, comp.go and server.go are removed)
// through `go build -overlay` (see packaging/slim.go). The kcptun plugin of
// shadowsocks (kcp-go and its Reed-Solomon coder, ~1 MB) is not in the router
// build: the parser rejects `plugin: kcptun` with a message that says so, and
// this stub keeps the types mihomo's config and shadowsocks code name.

package kcptun

import (
	"context"
	"errors"
	"net"
)

const Mode = "kcptun"

// Config has the fields of mihomo's kcptun.Config, so that configs and the
// API's JSON keep their shape.
type Config struct {
	Key          string `json:"key"`
	Crypt        string `json:"crypt"`
	Mode         string `json:"mode"`
	Conn         int    `json:"conn"`
	AutoExpire   int    `json:"autoexpire"`
	ScavengeTTL  int    `json:"scavengettl"`
	MTU          int    `json:"mtu"`
	RateLimit    int    `json:"ratelimit"`
	SndWnd       int    `json:"sndwnd"`
	RcvWnd       int    `json:"rcvwnd"`
	DataShard    int    `json:"datashard"`
	ParityShard  int    `json:"parityshard"`
	DSCP         int    `json:"dscp"`
	NoComp       bool   `json:"nocomp"`
	AckNodelay   bool   `json:"acknodelay"`
	NoDelay      int    `json:"nodelay"`
	Interval     int    `json:"interval"`
	Resend       int    `json:"resend"`
	NoCongestion int    `json:"nc"`
	SockBuf      int    `json:"sockbuf"`
	SmuxVer      int    `json:"smuxver"`
	SmuxBuf      int    `json:"smuxbuf"`
	FrameSize    int    `json:"framesize"`
	StreamBuf    int    `json:"streambuf"`
	KeepAlive    int    `json:"keepalive"`
}

// ErrNotBuilt is what every dial through the stub returns.
var ErrNotBuilt = errors.New("the kcptun plugin is not in tpgw's router build; use the full build")

type DialFn func(ctx context.Context) (net.PacketConn, net.Addr, error)

type Client struct{}

func NewClient(Config) *Client { return &Client{} }

func (c *Client) Close() error { return nil }

func (c *Client) OpenStream(context.Context, DialFn) (net.Conn, error) { return nil, ErrNotBuilt }
