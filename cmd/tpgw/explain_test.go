package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// explainTestConfig writes a config with an ss proxy, IP and domain rules and
// fake-ip DNS; LAN interface lan0.
func explainTestConfig(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	cfg := fmt.Sprintf(`mode: rule
proxies:
  - {name: ss, type: ss, server: 198.51.100.2, port: 8388, cipher: chacha20-ietf-poly1305, password: x}
dns:
  enable: true
  enhanced-mode: fake-ip
  listen: 0.0.0.0:1053
rules:
  - IP-CIDR,203.0.113.3/32,ss,no-resolve
  - DOMAIN-SUFFIX,example.com,ss
  - MATCH,DIRECT
tpgw:
  interfaces: [lan0]
  state-dir: %s
`, filepath.Join(dir, "state"))
	p := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(p, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestExplainCommand(t *testing.T) {
	cfg := explainTestConfig(t)
	cases := []struct {
		name string
		args []string
		want []string // lines of stdout, in order
	}{
		{"bypassed", []string{"--dst", "192.168.1.10:80"}, []string{
			"flow: tcp 192.168.77.2:40000 → 192.168.1.10:80 in lan0",
			"kernel: not intercepted: bypassed destination (rule 6 of chain divert) — the kernel forwards it as usual",
		}},
		{"direct", []string{"--dst", "203.0.113.2:80"}, []string{
			"flow: tcp 192.168.77.2:40000 → 203.0.113.2:80 in lan0",
			`kernel: intercepted — TPROXY to :7893 (rule "transparent proxy", chain divert)`,
			"mihomo: rule Match → DIRECT",
			"if tpgw is down: not intercepted: no rule of chain prerouting sends it to tpgw — the kernel forwards it as usual",
		}},
		{"proxied", []string{"--dst", "203.0.113.3:80"}, []string{
			"flow: tcp 192.168.77.2:40000 → 203.0.113.3:80 in lan0",
			`kernel: intercepted — TPROXY to :7893 (rule "transparent proxy", chain divert)`,
			"mihomo: rule IPCIDR,203.0.113.3/32 → ss",
			"if tpgw is down: not intercepted: no rule of chain prerouting sends it to tpgw — the kernel forwards it as usual",
		}},
		{"domain behind a fake IP", []string{"--host", "www.example.com", "--dst", "198.18.0.9:443"}, []string{
			"flow: tcp 192.168.77.2:40000 → 198.18.0.9:443 (www.example.com) in lan0",
			`kernel: intercepted — TPROXY to :7893 (rule "fake-ip range", chain divert)`,
			"mihomo: rule DomainSuffix,example.com → ss",
			"if tpgw is down: not intercepted: bypassed destination (rule 6 of chain divert) — the kernel forwards it as usual",
		}},
		{"fake IP without --host", []string{"--dst", "198.18.0.9:443"}, []string{
			"flow: tcp 192.168.77.2:40000 → 198.18.0.9:443 in lan0",
			`kernel: intercepted — TPROXY to :7893 (rule "fake-ip range", chain divert)`,
			"mihomo: 198.18.0.9 is a fake IP: the name it stands for is known only to the running tpgw; pass --host NAME",
			"if tpgw is down: not intercepted: bypassed destination (rule 6 of chain divert) — the kernel forwards it as usual",
		}},
		{"DNS query", []string{"--proto", "udp", "--dst", "192.168.77.1:53"}, []string{
			"flow: udp 192.168.77.2:40000 → 192.168.77.1:53 in lan0",
			`kernel: intercepted — TPROXY to :1053 (rule "DNS hijack", chain divert)`,
			"dns: answered by tpgw's fake-ip DNS server on :1053",
			"if tpgw is down: not intercepted: bypassed destination (rule 6 of chain divert) — the kernel forwards it as usual",
		}},
		{"DNS query for a local name", []string{"--proto", "udp", "--dst", "192.168.77.1:53", "--host", "router.lan"}, []string{
			"flow: udp 192.168.77.2:40000 → 192.168.77.1:53 (router.lan) in lan0",
			`kernel: intercepted — TPROXY to :1053 (rule "DNS hijack", chain divert)`,
			"dns: router.lan is a name only the LAN knows: tpgw's fake-ip DNS server on :1053 passes the query on to 192.168.77.1:53, the server asked, and its answer back",
			"if tpgw is down: not intercepted: bypassed destination (rule 6 of chain divert) — the kernel forwards it as usual",
		}},
		{"not from the LAN", []string{"--in", "wan0", "--dst", "203.0.113.3:80"}, []string{
			"flow: tcp 192.168.77.2:40000 → 203.0.113.3:80 in wan0",
			"kernel: not intercepted: no rule of chain prerouting sends it to tpgw — the kernel forwards it as usual",
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"explain", "-c", cfg, "--src", "192.168.77.2:40000"}, tc.args...)
			var stdout, stderr bytes.Buffer
			if code := realMain(args, &stdout, &stderr); code != 0 {
				t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout.String(), stderr.String())
			}
			if got, want := stdout.String(), strings.Join(tc.want, "\n")+"\n"; got != want {
				t.Errorf("got:\n%s\nwant:\n%s", got, want)
			}
		})
	}
}

func TestExplainUsage(t *testing.T) {
	cfg := explainTestConfig(t)
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"--src", "192.168.77.2"}, "tpgw explain: --dst ADDR:PORT is required\n"},
		{[]string{"--dst", "203.0.113.3:80"}, "tpgw explain: --src ADDR is required\n"},
		{[]string{"--src", "192.168.77.2", "--dst", "203.0.113.3"}, "tpgw explain: --dst \"203.0.113.3\": want ADDR:PORT, e.g. 203.0.113.3:80 or [2001:db8::3]:443\n"},
		{[]string{"--src", "192.168.77.2", "--dst", "203.0.113.3:80", "--proto", "icmp"}, "tpgw explain: --proto \"icmp\": must be tcp or udp\n"},
		{[]string{"--src", "fd00::2", "--dst", "203.0.113.3:80"}, "tpgw explain: --src fd00::2 and --dst 203.0.113.3 are of different address families\n"},
	}
	for _, tc := range cases {
		var stdout, stderr bytes.Buffer
		code := realMain(append([]string{"explain", "-c", cfg}, tc.args...), &stdout, &stderr)
		if code != 2 || stderr.String() != tc.want || stdout.Len() != 0 {
			t.Errorf("%v: exit %d, stderr %q, stdout %q; want exit 2, stderr %q", tc.args, code, stderr.String(), stdout.String(), tc.want)
		}
	}
	var stdout, stderr bytes.Buffer
	if code := realMain([]string{"explain", "--src", "192.168.77.2", "--dst", "203.0.113.3:80"}, &stdout, &stderr); code != 2 {
		t.Errorf("without -c: exit %d, want 2", code)
	}
}
