package dns

import (
	"context"
	"testing"

	D "github.com/miekg/dns"
)

// fuzzSeeds are the seed corpus of FuzzHandleMessage: valid queries of
// several kinds and broken variants of them.
func fuzzSeeds(t testing.TB) [][]byte {
	pack := func(m *D.Msg) []byte {
		b, err := m.Pack()
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	a := pack(query("foo.test", D.TypeA))
	edns := query("big.test", D.TypeA)
	edns.SetEdns0(1232, true)
	twoQ := query("foo.test", D.TypeA)
	twoQ.Question = append(twoQ.Question, twoQ.Question[0])
	noQ := query("foo.test", D.TypeA)
	noQ.Question = nil
	resp := query("foo.test", D.TypeA)
	resp.Response = true
	notify := query("foo.test", D.TypeSOA)
	notify.Opcode = D.OpcodeNotify
	flipped := append([]byte(nil), a...)
	flipped[13] ^= 0x40
	return [][]byte{
		a,
		pack(query("foo.test", D.TypeAAAA)),
		pack(query("big.test", D.TypeA)),
		pack(edns),
		pack(query("fail.test", D.TypeA)),
		pack(query("x.test", D.TypeTXT)),
		pack(twoQ),
		pack(noQ),
		pack(resp),
		pack(notify),
		a[:len(a)-3],
		a[:headerLen],
		flipped,
		{},
		{0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 0x0c, 0, 1, 0, 1}, // compression pointer loop
	}
}

// FuzzHandleMessage feeds arbitrary bytes to the message handler as UDP and
// TCP: it must not panic, and whatever it sends must be a well-formed response
// to the query, with its id, within the transport's size limit.
func FuzzHandleMessage(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, req []byte) {
		for _, udp := range []bool{true, false} {
			reply, v := handleMessage(context.Background(), noWaitEngine{}, req, udp)
			q := new(D.Msg)
			qErr := q.Unpack(req)
			if reply == nil {
				if v != malformed {
					t.Fatalf("no reply but verdict %d", v)
				}
				if qErr == nil && !q.Response {
					t.Fatalf("well-formed query %v dropped", q.Question)
				}
				continue
			}
			if qErr != nil {
				t.Fatalf("reply to a message that does not unpack (%v)", qErr)
			}
			limit := maxTCPMsg
			if udp {
				limit = D.MinMsgSize
				if opt := q.IsEdns0(); opt != nil {
					limit = max(limit, int(opt.UDPSize()))
				}
			}
			if len(reply) > limit {
				t.Fatalf("reply of %d bytes over the limit %d (udp %v)", len(reply), limit, udp)
			}
			r := new(D.Msg)
			if err := r.Unpack(reply); err != nil {
				t.Fatalf("reply does not unpack: %v", err)
			}
			if r.Id != q.Id || !r.Response {
				t.Fatalf("reply id %d response %v, want id %d and a response", r.Id, r.Response, q.Id)
			}
		}
	})
}

// noWaitEngine is fakeEngine without its query that waits out the timeout,
// which would make fuzzing crawl should the fuzzer spell "slow.test".
type noWaitEngine struct{ fakeEngine }

func (e noWaitEngine) ServeDNS(ctx context.Context, q *D.Msg) (*D.Msg, error) {
	ctx, cancel := context.WithCancel(ctx)
	cancel()
	return e.fakeEngine.ServeDNS(ctx, q)
}

func BenchmarkHandleMessage(b *testing.B) {
	req, err := query("foo.test", D.TypeA).Pack()
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if reply, _ := handleMessage(context.Background(), fakeEngine{}, req, true); reply == nil {
			b.Fatal("no reply")
		}
	}
}
