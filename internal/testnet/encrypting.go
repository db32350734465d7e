package testnet

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
)

// StartV2RayVMess runs Debian's v2ray in the proxy namespace with one VMess
// inbound on port (TCP, no TLS; the user id given, alterId 0, so AEAD
// headers) that sends everything it gets out directly (freedom), like the
// ss-server of StartSSServer. It waits until the port accepts.
func (tp *Topology) StartV2RayVMess(t testing.TB, port int, id string) *Proc {
	t.Helper()
	requireTool(t, "v2ray")
	cfg := fmt.Sprintf(`{
  "log": {"loglevel": "warning"},
  "inbounds": [{"listen": "0.0.0.0", "port": %d, "protocol": "vmess",
    "settings": {"clients": [{"id": %q, "alterId": 0}]}}],
  "outbounds": [{"protocol": "freedom"}]
}`, port, id)
	path := filepath.Join(t.TempDir(), "v2ray.json")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	p := tp.Proxy.Start(t, "v2ray", "-config", path)
	tp.waitPeer(t, p, "v2ray", port, tp.ProxyIP)
	return p
}

// StartTrojan runs Debian's trojan server in the proxy namespace on port,
// with the password given and a self-signed certificate for name (clients
// skip its verification). Connections without the password go to the
// upstream's HTTP server on httpPort, as a trojan server's fallback does.
func (tp *Topology) StartTrojan(t testing.TB, port int, password, name string, httpPort int) *Proc {
	t.Helper()
	requireTool(t, "trojan")
	requireTool(t, "openssl")
	dir := t.TempDir()
	cert, key := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if out, err := tp.Proxy.Run(t, PeerStartTimeout, "openssl", "req", "-x509", "-newkey", "ec",
		"-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
		"-subj", "/CN="+name, "-addext", "subjectAltName=DNS:"+name,
		"-keyout", key, "-out", cert); err != nil {
		t.Fatalf("testnet: certificate for trojan: %v\n%s", err, out)
	}
	cfg := fmt.Sprintf(`{
  "run_type": "server",
  "local_addr": "0.0.0.0",
  "local_port": %d,
  "remote_addr": %q,
  "remote_port": %d,
  "password": [%q],
  "log_level": 2,
  "ssl": {"cert": %q, "key": %q}
}`, port, tp.UpstreamIP.String(), httpPort, password, cert, key)
	path := filepath.Join(dir, "trojan.json")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	p := tp.Proxy.Start(t, "trojan", "-c", path)
	tp.waitPeer(t, p, "trojan", port, tp.ProxyIP)
	return p
}

// waitPeer waits until a peer in the proxy namespace accepts on port at
// each of addrs, or fails the test with the peer's output.
func (tp *Topology) waitPeer(t testing.TB, p *Proc, name string, port int, addrs ...netip.Addr) {
	t.Helper()
	for _, addr := range addrs {
		target := netip.AddrPortFrom(addr, uint16(port)).String()
		if err := waitTCPWhileRunning(tp.Proxy, p, target, PeerStartTimeout); err != nil {
			t.Fatalf("testnet: %s not ready on %s: %v\n%s", name, target, err, p.describe())
		}
	}
}
