package engine

import (
	"context"
	"net"
	"time"
	_ "unsafe" // go:linkname

	N "github.com/metacubex/mihomo/common/net"
	"github.com/metacubex/mihomo/component/resolver"
	"github.com/metacubex/mihomo/component/slowdown"
	C "github.com/metacubex/mihomo/constant"
	mlog "github.com/metacubex/mihomo/log"
	"github.com/metacubex/mihomo/tunnel/statistic"
	SN "github.com/metacubex/sing/common/network"
)

// tpgw runs the steps of mihomo's TCP handling itself (tunnel.handleTCPConn
// in mihomo v1.19.24), calling mihomo's own functions for each decision, so
// that the relay of a DIRECT flow can be its own: an idle flow then waits
// without a goroutine (park.go). The decisions stay mihomo's: these are its
// unexported functions, reached by name. go.mod pins mihomo, and
// TestMihomoInternals checks their behaviour, so an upgrade that renames or
// changes them fails the build or that test rather than changing behaviour.

//go:linkname mihomoIsHandle github.com/metacubex/mihomo/tunnel.isHandle
func mihomoIsHandle(t C.Type) bool

//go:linkname mihomoFixMetadata github.com/metacubex/mihomo/tunnel.fixMetadata
func mihomoFixMetadata(metadata *C.Metadata)

//go:linkname mihomoPreHandleMetadata github.com/metacubex/mihomo/tunnel.preHandleMetadata
func mihomoPreHandleMetadata(metadata *C.Metadata) error

//go:linkname mihomoResolveMetadata github.com/metacubex/mihomo/tunnel.resolveMetadata
func mihomoResolveMetadata(metadata *C.Metadata) (proxy C.Proxy, rule C.Rule, err error)

//go:linkname mihomoShouldStopRetry github.com/metacubex/mihomo/tunnel.shouldStopRetry
func mihomoShouldStopRetry(err error) bool

//go:linkname mihomoLogMetadata github.com/metacubex/mihomo/tunnel.logMetadata
func mihomoLogMetadata(metadata *C.Metadata, rule C.Rule, remoteConn C.Connection)

//go:linkname mihomoLogMetadataErr github.com/metacubex/mihomo/tunnel.logMetadataErr
func mihomoLogMetadataErr(metadata *C.Metadata, rule C.Rule, proxy C.ProxyAdapter, err error)

// firstBytesWait is how long a flow whose outbound sends a handshake waits
// for the client's first bytes, which go out with the handshake (mihomo
// waits as long).
const firstBytesWait = 200 * time.Millisecond

// dialAttempts bounds the dials of one flow, as mihomo's retry does.
const dialAttempts = 10

// handleTCP is mihomo's TCP handling for a flow without sniffing: mapping
// fake IPs back to names, rule match, dial with retries, connection
// statistics, then the relay. It returns when the flow has ended, or earlier
// when the flow's relay has been parked (both ends plain sockets); conn is
// closed when the flow ends.
func (e *Engine) handleTCP(conn *net.TCPConn, md *C.Metadata) {
	if !mihomoIsHandle(md.Type) {
		conn.Close()
		return
	}
	mihomoFixMetadata(md)
	if err := mihomoPreHandleMetadata(md); err != nil {
		// mihomo would try sniffing now, which is off: give up as it does.
		mlog.Debugln("[Metadata PreHandle] error: %s", err)
		conn.Close()
		return
	}
	proxy, rule, err := mihomoResolveMetadata(md)
	if err != nil {
		mlog.Warnln("[Metadata] parse failed: %s", err.Error())
		conn.Close()
		return
	}
	dialMd := md
	if md.Host != "" {
		if node, ok := resolver.DefaultHosts.Search(md.Host, false); ok {
			if ip, _ := node.RandIP(); !resolver.IsFakeIP(ip) {
				dialMd.DstIP = ip
				dialMd.DNSMode = C.DNSHosts
				dialMd = dialMd.Pure()
			}
		}
	}

	// The client's side as mihomo's relay reads it; made only when needed
	// (its reader holds a 4 KiB buffer).
	var buffered *N.BufferedConn
	var lc *lazySpliceConn
	client := func() *N.BufferedConn {
		if buffered == nil {
			lc = newLazySplice(conn)
			buffered = lc.buffered
		}
		return buffered
	}
	ctx, cancel := context.WithTimeout(context.Background(), C.DefaultTCPTimeout)
	remote, sent, err := dialFlow(ctx, proxy, dialMd, client, md, rule)
	cancel()
	if err != nil {
		conn.Close()
		return
	}
	mihomoLogMetadata(md, rule, remote)

	if raw, ok := plainSocket(remote); ok && (buffered == nil || buffered.Buffered() == 0) {
		f := newFlow(e.parker, conn, raw)
		tracker := statistic.NewTCPTracker(f.wrapRemote(remote), statistic.DefaultManager, md, rule, int64(sent), 0, true)
		f.start(tracker)
		return
	}
	tracker := statistic.NewTCPTracker(remote, statistic.DefaultManager, md, rule, int64(sent), 0, true)
	// The client's socket is armed to reset if tpgw dies (tcpconn.go). The
	// outbound's is left to the outbound: under an encrypting or multiplexing
	// one the socket's FIN is not the stream's end.
	left := client()
	lc.arm()
	N.Relay(left, tracker) // closes both
}

// dialFlow dials the outbound, retrying as mihomo does. When the outbound
// sends a handshake (shadowsocks, vmess, ...), the client's first bytes, if
// they arrive within firstBytesWait, go out with it; sent is their count.
func dialFlow(ctx context.Context, proxy C.Proxy, dialMd *C.Metadata, client func() *N.BufferedConn, md *C.Metadata, rule C.Rule) (remote C.Conn, sent int, err error) {
	s := slowdown.New()
	for range dialAttempts {
		remote, sent, err = dialOnce(ctx, proxy, dialMd, client)
		if err == nil {
			return remote, sent, nil
		}
		mihomoLogMetadataErr(md, rule, proxy, err)
		if mihomoShouldStopRetry(err) || s.Wait(ctx) != nil {
			break
		}
	}
	return nil, 0, err
}

func dialOnce(ctx context.Context, proxy C.Proxy, dialMd *C.Metadata, clientConn func() *N.BufferedConn) (C.Conn, int, error) {
	remote, err := proxy.DialContext(ctx, dialMd)
	if err != nil {
		return nil, 0, err
	}
	if !N.NeedHandshake(remote) {
		return remote, 0, nil
	}
	client := clientConn()
	if client.Buffered() == 0 {
		_ = client.SetReadDeadline(time.Now().Add(firstBytesWait))
		_, _ = client.Peek(1)
		_ = client.SetReadDeadline(time.Time{})
	}
	first, _ := client.Peek(client.Buffered())
	if _, err := remote.Write(first); err != nil {
		if isReject(remote) {
			return remote, 0, nil
		}
		remote.Close()
		return nil, 0, err
	}
	_, _ = client.Discard(len(first))
	return remote, len(first), nil
}

// isReject: a REJECT outbound's handshake fails by design; mihomo relays it
// anyway (the client sees the close).
func isReject(c C.Conn) bool {
	for _, name := range c.Chains() {
		if name == "REJECT" {
			return true
		}
	}
	return false
}

// plainSocket returns the kernel socket under remote when bytes pass through
// it unchanged (DIRECT and other plain TCP outbounds): sing's copy would
// splice such a pair, and tpgw's parking relay can watch it.
func plainSocket(remote C.Conn) (*net.TCPConn, bool) {
	r, _ := SN.UnwrapCountReader(remote, nil)
	w, _ := SN.UnwrapCountWriter(remote, nil)
	rt, ok1 := r.(*net.TCPConn)
	wt, ok2 := w.(*net.TCPConn)
	return rt, ok1 && ok2 && rt == wt
}
