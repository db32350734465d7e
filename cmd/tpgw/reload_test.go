package main

import (
	"log/slog"
	"strings"
	"testing"

	"github.com/tpgw/tpgw/config"
)

// TestRefuseReload: a reload that turns DNS on or off, or changes the
// engine's routing-mark (directly, or by turning proxy-self on), is refused
// with the key named, so that the running config stays whole; other changes
// go through.
func TestRefuseReload(t *testing.T) {
	parse := func(s string) *config.Config {
		t.Helper()
		c, err := config.Parse([]byte(s), "config.yaml")
		if err != nil {
			t.Fatalf("%q: %v", s, err)
		}
		return c
	}
	const dns = "dns:\n  enable: true\n  enhanced-mode: fake-ip\n"
	running := parse(dns + "rules:\n  - MATCH,DIRECT\n")
	for _, c := range []struct {
		name, yaml, want string
	}{
		{"rules", dns + "rules:\n  - MATCH,REJECT\n", ""},
		{"bypass", dns + "tpgw:\n  bypass: [203.0.113.0/24]\n", ""},
		{"dns off", "dns:\n  enable: false\n", "dns.enable"},
		{"routing-mark", dns + "routing-mark: 255\n", "routing-mark"},
		{"proxy-self", dns + "tpgw:\n  proxy-self: true\n", "proxy-self"},
	} {
		err := refuseReload(running, parse(c.yaml))
		switch {
		case c.want == "" && err != nil:
			t.Errorf("%s: refused: %v", c.name, err)
		case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)):
			t.Errorf("%s: got %v, want a refusal naming %s", c.name, err, c.want)
		}
	}
}

// TestKeepAfterFailure: systemd's ExecStopPost cleanup after a crash leaves
// the rules of on-failure: closed in place (the LAN stays closed until tpgw
// is back); a stop, a run by hand and on-failure: open clean up.
func TestKeepAfterFailure(t *testing.T) {
	for _, c := range []struct {
		policy, result string
		keep           bool
	}{
		{config.FailClosed, "signal", true},
		{config.FailClosed, "exit-code", true},
		{config.FailClosed, "core-dump", true},
		{config.FailClosed, "success", false},
		{config.FailClosed, "", false},
		{config.FailOpen, "signal", false},
	} {
		keep, why := keepAfterFailure(c.policy, c.result)
		if keep != c.keep || keep != (why != "") {
			t.Errorf("on-failure %s, SERVICE_RESULT %q: keep %v (%q), want %v", c.policy, c.result, keep, why, c.keep)
		}
	}
}

// TestWarnIPv6Off: mihomo's ipv6: false, which turns tpgw's IPv6
// interception off with it, is said at start (and at check); tpgw.ipv6:
// false, or IPv6 left on, says nothing.
func TestWarnIPv6Off(t *testing.T) {
	for _, c := range []struct {
		yaml string
		warn bool
	}{
		{"ipv6: false\n", true},
		{"ipv6: false\ntpgw:\n  ipv6: false\n", false},
		{"ipv6: true\n", false},
	} {
		cfg, err := config.Parse([]byte(c.yaml), "config.yaml")
		if err != nil {
			t.Fatal(err)
		}
		var b strings.Builder
		warnIPv6Off(cfg, slog.New(slog.NewTextHandler(&b, nil)))
		if got := strings.Contains(b.String(), "IPv6 interception off"); got != c.warn {
			t.Errorf("%q: warned %v, want %v: %s", c.yaml, got, c.warn, b.String())
		}
	}
}
