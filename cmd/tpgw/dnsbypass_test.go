package main

import (
	"bytes"
	"os"
	"strings"
	"testing"
)

// TestExplainDNSBypass: with dns-bypass on, explain says that a real
// address may be in the dynamic set, and `tpgw rules` shows the sets.
func TestExplainDNSBypass(t *testing.T) {
	cfg := explainTestConfig(t)
	f, err := os.OpenFile(cfg, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("  dns-bypass: true\n")
	f.Close()

	var stdout, stderr bytes.Buffer
	if code := realMain([]string{"explain", "-c", cfg, "--src", "192.168.77.2", "--dst", "203.0.113.2:80"}, &stdout, &stderr); code != 0 {
		t.Fatalf("explain: exit %d: %s", code, stderr.String())
	}
	want := "dns-bypass: assumed not in @dns_bypass4; while the fake-ip DNS has put 203.0.113.2 there"
	if !strings.Contains(stdout.String(), want) {
		t.Errorf("explain output lacks %q:\n%s", want, stdout.String())
	}
	stdout.Reset()
	if code := realMain([]string{"explain", "-c", cfg, "--src", "192.168.77.2", "--dst", "192.168.1.10:80"}, &stdout, &stderr); code != 0 || strings.Contains(stdout.String(), "dns-bypass") {
		t.Errorf("a bypassed destination needs no dns-bypass note: exit %d\n%s", code, stdout.String())
	}

	stdout.Reset()
	if code := realMain([]string{"rules", "-c", cfg}, &stdout, &stderr); code != 0 {
		t.Fatalf("rules: exit %d: %s", code, stderr.String())
	}
	for _, want := range []string{"set dns_bypass4 {\n\t\ttype ipv4_addr\n\t\tflags timeout\n", "ct state new ip daddr @dns_bypass4 ct label set 127 return"} {
		if !strings.Contains(stdout.String(), want) {
			t.Errorf("tpgw rules lacks %q:\n%s", want, stdout.String())
		}
	}
}
