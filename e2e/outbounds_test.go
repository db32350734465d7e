package e2e

import (
	"bytes"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/tpgw/tpgw/internal/testenv"
	"github.com/tpgw/tpgw/internal/testnet"
)

const (
	vmessPort      = 10086
	vmessID        = "b831381d-6324-4d53-ad4f-8cda48b30811"
	trojanPort     = 8443
	trojanPassword = "tpgw-trojan-password"
)

// TestEncryptingOutbounds relays flows through mihomo's VMess and Trojan
// outbounds to real servers (Debian's v2ray and trojan in the proxy
// namespace): the upstream sees the proxy's address, and a 1 MiB body comes
// back intact. Their sockets are read and written with tpgw's raw system
// calls (engine/rawsock.go), which these flows exercise end to end.
func TestEncryptingOutbounds(t *testing.T) {
	requirePeers(t)
	testenv.RequireTools(t, "v2ray", "trojan", "openssl")
	tp := testnet.New(t)
	tp.StartHTTPServer(t, httpPort)
	tp.StartV2RayVMess(t, vmessPort, vmessID)
	tp.StartTrojan(t, trojanPort, trojanPassword, "proxy.test", httpPort)
	before := testnet.Snapshot(t, tp.Gateway)

	proxies := `proxies:
  - {name: vm, type: vmess, server: 198.51.100.2, port: ` + strconv.Itoa(vmessPort) + `, uuid: ` + vmessID + `, alterId: 0, cipher: auto}
  - {name: tj, type: trojan, server: 198.51.100.2, port: ` + strconv.Itoa(trojanPort) + `, password: ` + trojanPassword + `, sni: proxy.test, skip-cert-verify: true}
`
	for _, name := range []string{"vm", "tj"} {
		t.Run(name, func(t *testing.T) {
			cfg := strings.Replace(baseConfig(t, []string{"MATCH," + name}, ""), "proxies:\n", proxies, 1)
			p := startTPGW(t, tp, writeConfig(t, cfg))
			wantSeen(t, tp, "http://203.0.113.2:8080/", "198.51.100.2", "via "+name)
			checkEcho(t, tp, bytes.Repeat([]byte(name), 512*1024))
			stopTPGW(t, p, syscall.SIGTERM)
		})
	}
	sameKernelState(t, tp, before, "after SIGTERM")
}
