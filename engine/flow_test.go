package engine

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/metacubex/mihomo/component/profile/cachefile"
	C "github.com/metacubex/mihomo/constant"
	D "github.com/miekg/dns"
)

// TestMihomoInternals checks that the mihomo functions flow.go reaches by
// name still do what tpgw relies on (go.mod pins mihomo; an upgrade that
// changes them fails here).
func TestMihomoInternals(t *testing.T) {
	if !mihomoIsHandle(C.TPROXY) {
		t.Error("isHandle(TPROXY) is false in a running engine")
	}

	md := testEngine.metadata(C.TCP, netip.MustParseAddrPort("10.0.0.2:40000"), netip.MustParseAddrPort("[::ffff:192.0.2.1]:80"))
	md.DstIP = netip.MustParseAddr("::ffff:192.0.2.1") // as a dual-stack socket reports it
	mihomoFixMetadata(md)
	if md.DstIP != netip.MustParseAddr("192.0.2.1") {
		t.Errorf("fixMetadata left DstIP %v, want it unmapped", md.DstIP)
	}

	// A fake IP maps back to its name; an unknown one in the range fails.
	q := new(D.Msg)
	q.SetQuestion("internals.example.", D.TypeA)
	r, err := testEngine.ServeDNS(context.Background(), q)
	if err != nil || len(r.Answer) != 1 {
		t.Fatalf("fake-ip answer: %v, %v", r, err)
	}
	fake, _ := netip.AddrFromSlice(r.Answer[0].(*D.A).A)
	md = testEngine.metadata(C.TCP, netip.MustParseAddrPort("10.0.0.2:40000"), netip.AddrPortFrom(fake.Unmap(), 443))
	if err := mihomoPreHandleMetadata(md); err != nil || md.Host != "internals.example" || md.DstIP.IsValid() || md.DNSMode != C.DNSFakeIP {
		t.Errorf("preHandleMetadata(%v): host %q, dst %v, mode %v, err %v; want the name, no IP, fake-ip mode", fake, md.Host, md.DstIP, md.DNSMode, err)
	}
	md = testEngine.metadata(C.TCP, netip.MustParseAddrPort("10.0.0.2:40000"), netip.MustParseAddrPort("198.18.255.250:443"))
	if err := mihomoPreHandleMetadata(md); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Errorf("preHandleMetadata of an unmapped fake IP: %v, want a missing-record error", err)
	}

	// The rule match: testConfig rejects 127.0.0.2 and sends the rest DIRECT.
	for dst, want := range map[string]string{"127.0.0.2:80": "REJECT", "192.0.2.1:80": "DIRECT"} {
		md := testEngine.metadata(C.TCP, netip.MustParseAddrPort("10.0.0.2:40000"), netip.MustParseAddrPort(dst))
		proxy, rule, err := mihomoResolveMetadata(md)
		if err != nil || proxy.Name() != want || rule == nil {
			t.Errorf("resolveMetadata(%s): %v, %v, %v; want %s by a rule", dst, proxy, rule, err, want)
		}
	}
}

// TestFakeIPStoreWritesAtOnce: a new name's fake IP is in cache.db or its
// journal as soon as its answer is out, with no fsync and no batching delay
// per write (mihomo writes one name at a time under its pool lock; see
// Start).
func TestFakeIPStoreWritesAtOnce(t *testing.T) {
	db := cachefile.Cache().DB
	if db == nil {
		t.Fatal("no cache.db: store-fake-ip should be on by default")
	}
	if !db.NoSync || db.MaxBatchSize != 1 {
		t.Errorf("cache.db NoSync %v, MaxBatchSize %d; want true, 1", db.NoSync, db.MaxBatchSize)
	}
	for i := range 20 {
		name := fmt.Sprintf("store%d.example", i)
		q := new(D.Msg)
		q.SetQuestion(name+".", D.TypeA)
		r, err := testEngine.ServeDNS(context.Background(), q)
		if err != nil || len(r.Answer) != 1 {
			t.Fatalf("%s: %v, %v", name, r, err)
		}
		ip, _ := netip.AddrFromSlice(r.Answer[0].(*D.A).A)
		if !stored(liveMappings.Load(), name, ip.Unmap()) {
			t.Fatalf("neither cache.db nor its journal maps %s to %v right after its answer", name, ip)
		}
	}
}
