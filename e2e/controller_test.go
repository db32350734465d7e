package e2e

import (
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tpgw/tpgw/internal/testnet"
)

// ctl sends one request to mihomo's external-controller on 127.0.0.1:9090
// in the gateway namespace and returns the HTTP status and body.
func ctl(t testing.TB, tp *testnet.Topology, method, path, body string) (int, string) {
	t.Helper()
	args := []string{"-sS", "--max-time", "15", "-X", method, "-w", "\n%{http_code}", "http://127.0.0.1:9090" + path}
	if body != "" {
		args = append(args, "-H", "Content-Type: application/json", "-d", body)
	}
	out, err := tp.Gateway.Run(t, 20*time.Second, "curl", args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", method, path, err, out)
	}
	out = strings.TrimRight(out, "\n")
	i := strings.LastIndexByte(out, '\n')
	code, err := strconv.Atoi(out[i+1:])
	if err != nil {
		t.Fatalf("%s %s: no status in %q", method, path, out)
	}
	return code, strings.TrimSpace(out[:max(i, 0)])
}

func wantCtl(t testing.TB, tp *testnet.Topology, method, path, body string, wantCode int, wantIn string) {
	t.Helper()
	code, got := ctl(t, tp, method, path, body)
	if code != wantCode || !strings.Contains(got, wantIn) {
		t.Fatalf("%s %s %s: %d %q, want %d and %q", method, path, body, code, got, wantCode, wantIn)
	}
	t.Logf("%s %s %s: %d %s", method, path, body, code, got)
}

// TestControllerKeepsTPGW: a dashboard still reads everything, switches the
// mode, toggles rules and updates geodata, and its "reload config" reloads
// tpgw's config file; what would
// undo tpgw is refused with the reason: a config not made by tpgw, ports and
// a TUN device, a restart that would skip the cleanup, and a core upgrade
// that would replace the tpgw binary.
func TestControllerKeepsTPGW(t *testing.T) {
	requirePeers(t)
	tp := testnet.New(t)
	tp.StartHTTPServer(t, httpPort)
	before := testnet.Snapshot(t, tp.Gateway)
	good := baseConfig(t, []string{"MATCH,DIRECT"}, "external-controller: 127.0.0.1:9090\n")
	cfg := writeConfig(t, good)
	p := startTPGW(t, tp, cfg)
	listeners := func() string { return tp.Gateway.MustRun(t, "ss", "-Hlntu") }
	links := func() string { return tp.Gateway.MustRun(t, "ip", "-o", "link") }
	listenersBefore, linksBefore := listeners(), links()

	wantCtl(t, tp, "GET", "/configs", "", 200, `"mode":"rule"`)

	wantCtl(t, tp, "PATCH", "/configs", `{"mode":"global"}`, 204, "")
	wantCtl(t, tp, "GET", "/configs/", "", 200, `"mode":"global"`)
	wantSeen(t, tp, "http://203.0.113.2:8080/", "203.0.113.1", "global mode: GLOBAL is DIRECT here")
	if err := waitLog(p, "using GLOBAL", 5*time.Second, 20*time.Millisecond); err != nil {
		t.Fatalf("flow after PATCH mode=global: %v\n%s", err, p.Output())
	}

	// Rule toggles and geodata updates work as in mihomo (this config uses no
	// geodata: nothing to download).
	wantCtl(t, tp, "PATCH", "/rules/disable", `{"0":true}`, 204, "")
	wantCtl(t, tp, "GET", "/rules", "", 200, `"disabled":true`)
	wantCtl(t, tp, "PATCH", "/rules/disable", `{"0":false}`, 204, "")
	wantCtl(t, tp, "GET", "/rules", "", 200, `"disabled":false`)
	wantCtl(t, tp, "POST", "/configs/geo", "", 204, "")

	wantCtl(t, tp, "PATCH", "/configs", `{"tun":{"enable":true,"auto-route":true},"mixed-port":7890}`, 400, "mixed-port, tun cannot be changed")
	wantCtl(t, tp, "PATCH", "/configs/", `{"mode":"sideways"}`, 400, "mode: invalid mode")
	wantCtl(t, tp, "PUT", "/configs?force=true", `{"payload":"tproxy-port: 7893\nrouting-mark: 0\nrules:\n  - MATCH,DIRECT\n"}`, 400, "only tpgw's own config file")
	wantCtl(t, tp, "PUT", "/configs?force=true", `{"path":"`+cfg+`"}`, 400, "only tpgw's own config file")
	wantCtl(t, tp, "POST", "/restart", "", 403, "service manager")
	wantCtl(t, tp, "POST", "/upgrade", "", 403, "upgrade the tpgw package")
	if got := listeners(); got != listenersBefore {
		t.Fatalf("listeners changed:\n%s\nwere\n%s", got, listenersBefore)
	}
	if got := links(); got != linksBefore {
		t.Fatalf("links changed (a TUN device?):\n%s\nwere\n%s", got, linksBefore)
	}

	// "Reload config": tpgw's own reload of its file, which sets the mode
	// back to the file's; a broken file is reported and the running config stays.
	wantCtl(t, tp, "PUT", "/configs?force=true", `{"path":"","payload":""}`, 204, "")
	if err := waitLog(p, "msg=reloaded", 5*time.Second, 20*time.Millisecond); err != nil {
		t.Fatalf("PUT /configs: %v\n%s", err, p.Output())
	}
	wantCtl(t, tp, "GET", "/configs", "", 200, `"mode":"rule"`)
	if err := os.WriteFile(cfg, []byte(good+"rules: [\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	wantCtl(t, tp, "PUT", "/configs", "", 400, "reload failed; still running with the previous config")
	wantSeen(t, tp, "http://203.0.113.2:8080/", "203.0.113.1", "DIRECT after a failed reload")

	if exited, _ := p.Wait(0); exited {
		t.Fatalf("tpgw exited:\n%s", p.Output())
	}
	for _, bad := range []string{"TProxy server", "DNS server", "restarting", "start update"} {
		if strings.Contains(p.Output(), bad) {
			t.Fatalf("mihomo acted on a refused request (%q in the log):\n%s", bad, p.Output())
		}
	}
	stopTPGW(t, p, syscall.SIGTERM)
	sameKernelState(t, tp, before, "after SIGTERM")
}
