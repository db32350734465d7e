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

// TestUDPRcvbufErrorsCounted: datagrams the kernel of a namespace drops at a
// full receive buffer, over IPv4 and IPv6, show in the count the bench reads
// there (udpRcvbufErrors), and no other namespace's count moves.
func TestUDPRcvbufErrorsCounted(t *testing.T) {
	tp := testnet.New(t)
	const sent = 200
	count := func(ns *testnet.NS) int64 {
		t.Helper()
		n, err := udpRcvbufErrors(ns)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	for _, c := range []struct {
		family int
		addr   unix.Sockaddr
	}{
		{unix.AF_INET, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}},
		{unix.AF_INET6, &unix.SockaddrInet6{Addr: [16]byte{15: 1}}},
	} {
		before, otherBefore := count(tp.Gateway), count(tp.Upstream)
		var kept int // datagrams the receiver's buffer took
		if err := tp.Gateway.Do(func() error {
			rx, err := unix.Socket(c.family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return err
			}
			defer unix.Close(rx)
			// The smallest buffer the kernel allows: a few datagrams.
			if err := unix.SetsockoptInt(rx, unix.SOL_SOCKET, unix.SO_RCVBUF, 1); err != nil {
				return err
			}
			if err := unix.Bind(rx, c.addr); err != nil {
				return err
			}
			to, err := unix.Getsockname(rx)
			if err != nil {
				return err
			}
			tx, err := unix.Socket(c.family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return err
			}
			defer unix.Close(tx)
			payload := make([]byte, 1000)
			for range sent {
				if err := unix.Sendto(tx, payload, 0, to); err != nil {
					return err
				}
			}
			for { // what the buffer took, never read by the bench's count
				if _, _, err := unix.Recvfrom(rx, payload, unix.MSG_DONTWAIT); err != nil {
					break
				}
				kept++
			}
			return nil
		}); err != nil {
			t.Fatalf("family %d: %v", c.family, err)
		}
		after, otherAfter := count(tp.Gateway), count(tp.Upstream)
		if kept == 0 || kept >= sent/2 {
			t.Fatalf("family %d: the receive buffer took %d of %d datagrams; the test needs most dropped", c.family, kept, sent)
		}
		if got, want := after-before, int64(sent-kept); got != want {
			t.Errorf("family %d: %d receive-buffer drops counted in the namespace, want %d (%d of %d sent were kept)", c.family, got, want, kept, sent)
		}
		if otherAfter != otherBefore {
			t.Errorf("family %d: another namespace's count moved by %d", c.family, otherAfter-otherBefore)
		}
	}
}
