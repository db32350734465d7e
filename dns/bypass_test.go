package dns

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	D "github.com/miekg/dns"
)

// fakeDirect says direct.test is DIRECT with 203.0.113.2 (A) and
// 2001:db8:1::2 (AAAA), long.test likewise with a day-long TTL, short.test
// with a 5s TTL, nov6.test has no AAAA; anything else is not DIRECT.
type fakeDirect struct{ calls int }

func (f *fakeDirect) ResolveDirect(ctx context.Context, name string, qtype uint16) ([]netip.Addr, uint32, bool, string) {
	f.calls++
	ttl := uint32(300)
	switch name {
	case "long.test.":
		ttl = 86400
	case "short.test.":
		ttl = 5
	case "nov6.test.":
		if qtype == D.TypeAAAA {
			return nil, 0, true, ""
		}
	case "mapped.test.":
		if qtype == D.TypeAAAA { // an AAAA record of ::ffff:203.0.113.9, unmapped, beside a real one
			return []netip.Addr{netip.MustParseAddr("203.0.113.9"), netip.MustParseAddr("2001:db8:1::9")}, ttl, true, ""
		}
	case "direct.test.", "direct.now.test.":
	default:
		return nil, 0, false, "rule MATCH → ss"
	}
	if qtype == D.TypeAAAA {
		return []netip.Addr{netip.MustParseAddr("2001:db8:1::2")}, ttl, true, ""
	}
	return []netip.Addr{netip.MustParseAddr("203.0.113.2")}, ttl, true, ""
}

// MayBypass: the names ResolveDirect answers.
func (f *fakeDirect) MayBypass(name string, qtype uint16) bool {
	switch name {
	case "long.test.", "short.test.", "nov6.test.", "direct.test.", "direct.now.test.":
		return true
	}
	return false
}

// fakeSet records what was added, and fails when fail is set.
type fakeSet struct {
	mu      sync.Mutex // for tests that add through a server's workers
	adds    []string   // "addr,addr timeout"
	flushes int
	fail    bool
}

func (s *fakeSet) Add(addrs []netip.Addr, timeout time.Duration) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fail {
		return errors.New("netlink: no such set")
	}
	var as []string
	for _, a := range addrs {
		as = append(as, a.String())
	}
	s.adds = append(s.adds, strings.Join(as, ",")+" "+timeout.String())
	return nil
}

func (s *fakeSet) Flush() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.flushes++
	s.adds = nil
	return nil
}

func askBypass(b *Bypass, name string, qtype uint16) (*D.Msg, error) {
	q := new(D.Msg)
	q.SetQuestion(name, qtype)
	return b.ServeDNS(context.Background(), q)
}

// answerText is the answer section as "addr/ttl" strings.
func answerText(r *D.Msg) string {
	var out []string
	for _, rr := range r.Answer {
		switch rr := rr.(type) {
		case *D.A:
			out = append(out, fmt.Sprintf("%s/%d", rr.A, rr.Hdr.Ttl))
		case *D.AAAA:
			out = append(out, fmt.Sprintf("%s/%d", rr.AAAA, rr.Hdr.Ttl))
		}
	}
	return strings.Join(out, " ")
}

func TestBypassAnswers(t *testing.T) {
	cases := []struct {
		name    string
		qtype   uint16
		answer  string // the reply's answer section
		added   string // what went into the set ("" = nothing)
		failSet bool
	}{
		{"direct.test.", D.TypeA, "203.0.113.2/300", "203.0.113.2 10m0s", false},
		{"direct.test.", D.TypeAAAA, "2001:db8:1::2/300", "2001:db8:1::2 10m0s", false},
		{"short.test.", D.TypeA, "203.0.113.2/5", "203.0.113.2 6m0s", false},            // at least a minute, plus grace
		{"long.test.", D.TypeA, "203.0.113.2/3600", "203.0.113.2 1h5m0s", false},        // at most an hour, plus grace
		{"nov6.test.", D.TypeAAAA, "", "", false},                                       // the real empty answer
		{"mapped.test.", D.TypeAAAA, "2001:db8:1::9/300", "2001:db8:1::9 10m0s", false}, // an IPv4 address is neither answered nor added
		{"proxied.test.", D.TypeA, fakeIP("proxied.test.").String() + "/1", "", false},
		{"direct.test.", D.TypeMX, "", "", false},                                   // other types go to the engine (NXDOMAIN there)
		{"direct.test.", D.TypeA, fakeIP("direct.test.").String() + "/1", "", true}, // no set, no real answer
	}
	for _, c := range cases {
		t.Run(fmt.Sprintf("%s %s fail=%v", c.name, D.TypeToString[c.qtype], c.failSet), func(t *testing.T) {
			set := &fakeSet{fail: c.failSet}
			b := NewBypass(fakeEngine{}, &fakeDirect{}, set, testLogger(t))
			r, err := askBypass(b, c.name, c.qtype)
			if err != nil {
				t.Fatal(err)
			}
			if got := answerText(r); got != c.answer {
				t.Errorf("answer %q, want %q", got, c.answer)
			}
			if got := strings.Join(set.adds, "; "); got != c.added {
				t.Errorf("added %q, want %q", got, c.added)
			}
			if r.Rcode != D.RcodeSuccess && c.qtype != D.TypeMX {
				t.Errorf("rcode %s", D.RcodeToString[r.Rcode])
			}
		})
	}
}

// TestBypassRefresh: an address with enough time left in the set is not
// added again; near its end it is, and a Flush (reload) forgets everything.
func TestBypassRefresh(t *testing.T) {
	set := &fakeSet{}
	b := NewBypass(fakeEngine{}, &fakeDirect{}, set, testLogger(t))
	now := time.Unix(1_000_000, 0)
	b.now = func() time.Time { return now }
	ask := func() {
		t.Helper()
		if r, err := askBypass(b, "direct.test.", D.TypeA); err != nil || answerText(r) != "203.0.113.2/300" {
			t.Fatalf("query: %v %v", r, err)
		}
	}
	ask()
	now = now.Add(2 * time.Minute)
	ask() // 8 of 10 minutes left: enough for a 5-minute TTL
	if len(set.adds) != 1 {
		t.Fatalf("adds %v, want one", set.adds)
	}
	now = now.Add(6 * time.Minute)
	ask() // 2 minutes left: re-added
	if len(set.adds) != 2 {
		t.Fatalf("adds %v, want two", set.adds)
	}
	if err := b.Flush(); err != nil || set.flushes != 1 {
		t.Fatalf("Flush: %v, %d flushes", err, set.flushes)
	}
	ask()
	if len(set.adds) != 1 {
		t.Fatalf("after Flush: adds %v, want the address added again", set.adds)
	}
}

// reloadingDirect flushes the bypass while a decision is under way.
type reloadingDirect struct {
	fakeDirect
	b *Bypass
}

func (r *reloadingDirect) ResolveDirect(ctx context.Context, name string, qtype uint16) ([]netip.Addr, uint32, bool, string) {
	r.b.Flush()
	return r.fakeDirect.ResolveDirect(ctx, name, qtype)
}

// TestBypassReloadDuringQuery: an answer decided under the old rules does not
// enter the set emptied by the reload; the client gets a fake IP instead.
func TestBypassReloadDuringQuery(t *testing.T) {
	set := &fakeSet{}
	rd := &reloadingDirect{}
	b := NewBypass(fakeEngine{}, rd, set, testLogger(t))
	rd.b = b
	r, err := askBypass(b, "direct.test.", D.TypeA)
	if err != nil {
		t.Fatal(err)
	}
	if got := answerText(r); got != fakeIP("direct.test.").String()+"/1" || len(set.adds) != 0 {
		t.Errorf("answer %q, adds %v; want the fake IP and nothing added", got, set.adds)
	}
}

// TestBypassThroughServer: the bypass serves as the Engine of handleMessage,
// so real answers pack and keep the client's id.
func TestBypassThroughServer(t *testing.T) {
	b := NewBypass(fakeEngine{}, &fakeDirect{}, &fakeSet{}, testLogger(t))
	q := new(D.Msg)
	q.SetQuestion("direct.test.", D.TypeA)
	q.Id = 4242
	req, _ := q.Pack()
	out, v := handleMessage(context.Background(), b, req, true)
	if v != answered {
		t.Fatalf("verdict %v", v)
	}
	r := new(D.Msg)
	if err := r.Unpack(out); err != nil {
		t.Fatal(err)
	}
	if r.Id != 4242 || !r.Response || answerText(r) != "203.0.113.2/300" || !slices.Equal(r.Question, q.Question) {
		t.Errorf("reply %v", r)
	}
}

// TestBypassInstant: with the bypass in front of an InstantEngine, a name
// that may bypass tpgw goes to a worker and gets its real address; any
// other is answered at once with a fake IP. A DirectResolver that cannot
// tell (no MayBypass) leaves every query to the workers.
func TestBypassInstant(t *testing.T) {
	eng := &instantEngine{settled: map[string]bool{}}
	set := &fakeSet{}
	s, err := Listen(netip.MustParseAddrPort("127.0.0.1:0"), NewBypass(eng, &fakeDirect{}, set, testLogger(t)), testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	serveUntilCleanup(t, s)

	wantA(t, exchange(t, "udp", s.Addr(), query("fake.now.test", D.TypeA)), "fake.now.test")
	r := exchange(t, "udp", s.Addr(), query("direct.now.test", D.TypeA))
	if got := answerText(r); got != "203.0.113.2/300" {
		t.Errorf("direct.now.test: %q, want its real address", got)
	}
	eng.mu.Lock()
	served := slices.Clone(eng.served)
	eng.mu.Unlock()
	set.mu.Lock()
	adds := slices.Clone(set.adds)
	set.mu.Unlock()
	if !slices.Equal(served, []string{"fake.now.test."}) || s.workers.Load() != 1 || len(adds) != 1 {
		t.Errorf("answered at once %v (want fake.now.test. only), %d workers (want 1), set adds %v (want one)", served, s.workers.Load(), adds)
	}

	// Without MayBypass: nothing at once.
	plain := NewBypass(eng, onlyResolve{}, &fakeSet{}, testLogger(t))
	serve, settle := plain.NewInstant()
	if r, ok, _ := serve(query("fake.now.test", D.TypeA)); ok {
		t.Errorf("served at once without MayBypass: %v", r)
	}
	settle()
}

// onlyResolve is a DirectResolver without MayBypass.
type onlyResolve struct{}

func (onlyResolve) ResolveDirect(ctx context.Context, name string, qtype uint16) ([]netip.Addr, uint32, bool, string) {
	return nil, 0, false, "not DIRECT"
}
