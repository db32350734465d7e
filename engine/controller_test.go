package engine

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"

	"github.com/metacubex/mihomo/config"
)

// TestWarnOpenController: a controller open to the network without a
// secret is warned about, naming its key; loopback or a secret is quiet.
func TestWarnOpenController(t *testing.T) {
	for _, c := range []struct {
		ctl  config.Controller
		want string // key named in the warning; "" for none
	}{
		{config.Controller{ExternalController: "127.0.0.1:9090"}, ""},
		{config.Controller{ExternalController: "[::1]:9090"}, ""},
		{config.Controller{ExternalController: "localhost:9090"}, ""},
		{config.Controller{ExternalController: "0.0.0.0:9090", Secret: "s3cret"}, ""},
		{config.Controller{ExternalControllerUnix: "/run/mihomo.sock"}, ""},
		{config.Controller{ExternalController: "0.0.0.0:9090"}, "key=external-controller "},
		{config.Controller{ExternalController: ":9090"}, "key=external-controller "},
		{config.Controller{ExternalController: "192.168.1.1:9090"}, "key=external-controller "},
		{config.Controller{ExternalControllerTLS: "[::]:9443"}, "key=external-controller-tls "},
	} {
		var buf bytes.Buffer
		warnOpenController(&c.ctl, slog.New(slog.NewTextHandler(&buf, nil)))
		got := buf.String()
		if c.want == "" && got != "" || c.want != "" && (!strings.Contains(got, c.want) || !strings.Contains(got, "without a secret")) {
			t.Errorf("%+v: logged %q, want %q", c.ctl, got, c.want)
		}
	}
}
