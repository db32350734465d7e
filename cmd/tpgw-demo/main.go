// Command tpgw-demo runs tpgw for real inside throwaway network namespaces and
// shows the path demo traffic takes. It never touches the host's own network:
// every interface and address it uses lives in namespaces it creates and
// deletes (see internal/testnet). Run it as root: `make demo`.
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/tpgw/tpgw/internal/tbenv"
	"github.com/tpgw/tpgw/internal/testnet"
)

func main() {
	bin := flag.String("bin", "bin/tpgw", "tpgw binary")
	cfgPath := flag.String("c", "config.example.yaml", "config to run (config.example.yaml expects the demo's addresses)")
	hold := flag.Bool("hold", false, "keep the demo gateway running after the requests, to explore it, until Ctrl-C")
	flag.Parse()
	env := tbenv.New("tpgw-demo", os.Stderr)
	env.CloseOnSignal()
	err := env.Do(func() { run(env, *bin, *cfgPath, *hold) })
	env.Close()
	if env.Interrupted() {
		select {} // the signal handler exits, with status 130
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
	}
	if err != nil || env.Failed() {
		fmt.Println("\ndemo FAILED")
		os.Exit(1)
	}
}

func run(env *tbenv.Env, bin, cfgPath string, hold bool) {
	abs, err := filepath.Abs(bin)
	if err != nil {
		env.Fatal(err)
	}
	raw, err := os.ReadFile(cfgPath)
	if err != nil {
		env.Fatal(err)
	}
	// Run from a copy in a temp dir: mihomo keeps its cache.db beside the config.
	cfg := filepath.Join(env.TempDir(), "config.yaml")
	if err := os.WriteFile(cfg, raw, 0o600); err != nil {
		env.Fatal(err)
	}

	step("building throwaway namespaces: client ── gateway (tpgw) ── upstream ── proxy")
	tp := testnet.New(env)
	fmt.Printf("  client   %s  %s\n", tp.Client.Name, tp.ClientIP)
	fmt.Printf("  gateway  %s  LAN %s, WAN %s\n", tp.Gateway.Name, tp.GatewayLAN, tp.GatewayWAN)
	fmt.Printf("  upstream %s  %s and 203.0.113.3 (HTTP server that reports who connected)\n", tp.Upstream.Name, tp.UpstreamIP)
	fmt.Printf("  proxy    %s  %s (shadowsocks-libev ss-server)\n", tp.Proxy.Name, tp.ProxyIP)
	tp.Upstream.MustRun(env, "ip", "addr", "add", "203.0.113.3/24", "dev", "eth0")
	tp.StartHTTPServer(env, 8080)
	tp.StartSSServer(env, 8388, "tpgw-example-password", "chacha20-ietf-poly1305")
	before := testnet.Snapshot(env, tp.Gateway)

	step("starting: tpgw run -c config.example.yaml (in the gateway namespace)")
	p := tp.Gateway.Start(env, abs, "run", "-c", cfg)
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(p.Output(), "gateway running") {
		if exited, _ := p.Wait(0); exited || time.Now().After(deadline) {
			env.Fatalf("tpgw did not start:\n%s", p.Output())
		}
		time.Sleep(50 * time.Millisecond)
	}
	rules, _ := tp.Gateway.Run(env, 10*time.Second, "nft", "list", "chain", "inet", "tpgw", "prerouting")
	fmt.Println("  kernel rules installed (nft list chain inet tpgw prerouting):")
	for _, l := range strings.Split(strings.TrimSpace(rules), "\n") {
		fmt.Println("    " + l)
	}

	step("client requests through the gateway")
	paths := map[string]string{
		tp.ClientIP.String():   "the client itself: kernel-forwarded, NOT through tpgw",
		tp.GatewayWAN.String(): "the gateway's WAN address: through tpgw, rule DIRECT",
		tp.ProxyIP.String():    "the proxy's address: through tpgw and the ss-server",
	}
	for _, url := range []string{"http://203.0.113.2:8080/", "http://203.0.113.3:8080/"} {
		body, err := tp.Curl(env, url)
		if err != nil {
			env.Errorf("curl %s: %v", url, err)
			continue
		}
		seen := strings.TrimSpace(body)
		fmt.Printf("  curl %-26s → upstream saw %-13s = %s\n", url, seen, paths[seen])
	}
	fmt.Println("  tpgw's log of those flows:")
	for _, l := range strings.Split(p.Output(), "\n") {
		if strings.Contains(l, "[TCP]") {
			fmt.Println("    " + l)
		}
	}

	if hold {
		step("the demo gateway keeps running; try, from another shell:")
		fmt.Printf("  ip netns exec %s curl http://203.0.113.3:8080/\n", tp.Client.Name)
		fmt.Printf("  ip netns exec %s nft list table inet tpgw\n", tp.Gateway.Name)
		fmt.Printf("  ip netns exec %s %s explain -c %s --src 192.168.77.2 --dst 203.0.113.3:8080\n", tp.Gateway.Name, bin, cfgPath)
		fmt.Println("  press Ctrl-C to stop tpgw and remove the namespaces")
		select {} // until the signal handler cleans up and exits
	}

	step("stopping tpgw (SIGTERM): every rule, route and sysctl it changed is removed")
	p.Signal(syscall.SIGTERM)
	if exited, _ := p.Wait(15 * time.Second); !exited {
		env.Fatalf("tpgw did not stop")
	}
	if after := testnet.Snapshot(env, tp.Gateway); after != before {
		env.Errorf("gateway kernel state differs after stop:\n%s", after)
	} else {
		fmt.Println("  gateway namespace: nft ruleset, ip rules, routes and ip_forward identical to before start")
	}
	step("tearing down the namespaces")
}

func step(s string) { fmt.Printf("\n==> %s\n", s) }
