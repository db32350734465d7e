package tsock

import (
	"errors"
	"net"
	"net/netip"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/tpgw/tpgw/internal/testenv"
)

func threadNetnsIno(t *testing.T) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(threadNetnsPath, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func TestNetnsInPlace(t *testing.T) {
	var zero Netns
	ran := false
	if err := zero.Do(func() error { ran = true; return nil }); err != nil || !ran {
		t.Fatalf("zero Netns: Do = %v, ran %v", err, ran)
	}
	home, err := CurrentNetns()
	if err != nil {
		t.Fatal(err)
	}
	want := errors.New("from fn")
	if err := home.Do(func() error { return want }); err != want {
		t.Fatalf("Do = %v, want fn's error", err)
	}
	if err := home.Close(); err != nil {
		t.Fatal(err)
	}
	if err := home.Do(func() error { return nil }); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Do after Close = %v, want net.ErrClosed", err)
	}
	if err := home.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

// A Netns recorded on a thread inside another namespace runs fn there, from
// a goroutine whose thread is in the test's namespace; replies bound there
// may use addresses that exist only there.
func TestNetnsOtherNamespace(t *testing.T) {
	testenv.RequireRoot(t)
	type result struct {
		home *Netns
		ino  uint64
		err  error
	}
	ch := make(chan result, 1)
	go func() {
		// The thread is never unlocked: it dies with the goroutine, in the
		// new namespace.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			ch <- result{err: err}
			return
		}
		var st unix.Stat_t
		if err := unix.Stat(threadNetnsPath, &st); err != nil {
			ch <- result{err: err}
			return
		}
		home, err := CurrentNetns()
		ch <- result{home, st.Ino, err}
	}()
	r := <-ch
	if r.err != nil {
		testenv.Unavailable(t, "new network namespace: %v", r.err)
	}
	defer r.home.Close()
	outside := threadNetnsIno(t)
	var inside uint64
	if err := r.home.Do(func() error { inside = threadNetnsIno(t); return nil }); err != nil {
		t.Fatal(err)
	}
	if inside != r.ino || inside == outside {
		t.Fatalf("Do ran in netns %d, want %d (the test's is %d)", inside, r.ino, outside)
	}

	// Transparent reply socket bound to a remote address, in there.
	from := netip.MustParseAddrPort("192.0.2.1:53")
	var conn *ReplySocket
	if err := r.home.Do(func() (err error) {
		conn, err = OpenReply(from, ReplyOptions{RcvBuf: 4096})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if got, err := conn.LocalAddr(); got != from {
		t.Fatalf("reply socket bound to %v (%v), want %v", got, err, from)
	}
	if threadNetnsIno(t) != outside {
		t.Fatal("the test's thread changed namespace")
	}
}

// TryBind tells the host's addresses from others (ip_nonlocal_bind off, as
// the dns tests also assume).
func TestTryBind(t *testing.T) {
	if err := TryBind(netip.MustParseAddr("127.0.0.2")); err != nil {
		t.Errorf("TryBind(127.0.0.2) = %v, want nil", err)
	}
	if err := TryBind(netip.MustParseAddr("::1")); err != nil && !errors.Is(err, unix.EAFNOSUPPORT) {
		t.Errorf("TryBind(::1) = %v, want nil", err)
	}
	if err := TryBind(netip.MustParseAddr("192.0.2.1")); !errors.Is(err, unix.EADDRNOTAVAIL) {
		t.Errorf("TryBind(192.0.2.1) = %v, want EADDRNOTAVAIL", err)
	}
}
