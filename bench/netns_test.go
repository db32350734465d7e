package bench

import (
	"os"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/tpgw/tpgw/internal/testnet"
)

// TestNamespacesTakeCC: after prepareNamespaces, a TCP socket made in any
// of the bench's namespaces has the chosen congestion control, not the one
// the host's default would have given it. The congestion control chosen
// differs from the host's default where the host allows another (reno is
// always allowed), so that an unset sysctl fails the test.
func TestNamespacesTakeCC(t *testing.T) {
	host := readProc(t, "/proc/sys/net/ipv4/tcp_congestion_control")
	cc := "reno"
	if host == "reno" {
		allowed := strings.Fields(readProc(t, "/proc/sys/net/ipv4/tcp_allowed_congestion_control"))
		if i := slices.IndexFunc(allowed, func(a string) bool { return a != "reno" }); i >= 0 {
			cc = allowed[i]
		} else {
			t.Log("the host allows only reno, its default: the test shows the setting, not a change")
		}
	}
	tp := testnet.New(t)
	prepareNamespaces(t, tp, cc)
	for _, ns := range []*testnet.NS{tp.Client, tp.Gateway, tp.Upstream, tp.Proxy} {
		if got := ns.Sysctl(t, "net.ipv4.tcp_max_tw_buckets"); got != "0" {
			t.Errorf("%s: net.ipv4.tcp_max_tw_buckets = %s, want 0", ns.Name, got)
		}
		var got string
		if err := ns.Do(func() error {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return err
			}
			defer unix.Close(fd)
			got, err = unix.GetsockoptString(fd, unix.IPPROTO_TCP, unix.TCP_CONGESTION)
			return err
		}); err != nil {
			t.Fatalf("%s: %v", ns.Name, err)
		}
		if got != cc {
			t.Errorf("%s: a new TCP socket's congestion control is %q, want %q (the host's default is %s)", ns.Name, got, cc, host)
		}
	}
}

func readProc(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}
