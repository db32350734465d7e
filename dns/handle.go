package dns

import (
	"context"
	"time"

	D "github.com/miekg/dns"
)

// queryTimeout bounds one query: the engine's answer (fake IP, cache, or a
// real lookup upstream) must come within it, or the client gets SERVFAIL.
const queryTimeout = 5 * time.Second

// maxTCPMsg is the largest DNS message the 2-byte TCP length prefix allows.
const maxTCPMsg = 65535

// headerLen is the size of the fixed DNS header.
const headerLen = 12

// verdict says what handleMessage did with a message, for Stats.
type verdict int

const (
	answered  verdict = iota // the engine answered
	failed                   // the engine failed: SERVFAIL
	malformed                // dropped, or FORMERR/NOTIMP for a well-formed non-query
)

// handleMessage turns one received DNS message into the reply to send, or nil
// to send nothing. It never panics on any input: req is untrusted bytes from
// the LAN. Garbage (anything miekg/dns cannot unpack) and responses (QR set:
// answering them could make two servers loop) are dropped silently. A
// well-formed message that is not a standard query with one question gets
// FORMERR or NOTIMP. Queries go to the engine; its error or timeout becomes
// SERVFAIL. UDP replies are truncated (TC set) to the client's EDNS0 buffer
// size, or 512 without EDNS0.
func handleMessage(ctx context.Context, eng Engine, req []byte, udp bool) ([]byte, verdict) {
	b, v, _ := handle(ctx, eng, req, udp, nil)
	return b, v
}

// route is asked about each well-formed query before the engine. It may
// answer the query itself (handled; a nil reply means it failed), and says
// whether an answer to it may be cached.
type route func(ctx context.Context, q *D.Msg, req []byte) (reply []byte, handled, cacheable bool)

// handle is handleMessage that also says for how long the reply may be
// reused for the same query (0: not at all), with an optional route.
func handle(ctx context.Context, eng Engine, req []byte, udp bool, rt route) ([]byte, verdict, time.Duration) {
	q, reply, v := parseQuery(req, udp)
	if q == nil {
		return reply, v, 0
	}
	cacheable := true
	if rt != nil {
		var reply []byte
		var handled bool
		if reply, handled, cacheable = rt(ctx, q, req); handled {
			if reply == nil {
				return pack(refusal(q, D.RcodeServerFailure), udp, q), failed, 0
			}
			return reply, answered, 0
		}
	}
	ctx, cancel := context.WithTimeout(ctx, queryTimeout)
	r, err := eng.ServeDNS(ctx, q)
	cancel()
	b, v, ttl := finish(q, r, err, udp)
	if !cacheable {
		ttl = 0
	}
	return b, v, ttl
}

// parseQuery unpacks req, a standard query with one question, for the
// engine; otherwise q is nil and reply what to send (nil: nothing), with
// why.
func parseQuery(req []byte, udp bool) (q *D.Msg, reply []byte, v verdict) {
	if len(req) < headerLen {
		return nil, nil, malformed
	}
	q = new(D.Msg)
	if err := q.Unpack(req); err != nil {
		return nil, nil, malformed
	}
	if q.Response {
		return nil, nil, malformed
	}
	if q.Opcode != D.OpcodeQuery {
		return nil, pack(refusal(q, D.RcodeNotImplemented), udp, q), malformed
	}
	if len(q.Question) != 1 {
		return nil, pack(refusal(q, D.RcodeFormatError), udp, q), malformed
	}
	return q, nil, answered
}

// finish packs r, the engine's answer to q (or its failure, err), as the
// reply to send, and says for how long it may be reused.
func finish(q, r *D.Msg, err error, udp bool) ([]byte, verdict, time.Duration) {
	if err != nil || r == nil {
		return pack(refusal(q, D.RcodeServerFailure), udp, q), failed, 0
	}
	r.Id = q.Id
	r.Response = true
	r.Opcode = q.Opcode
	if len(r.Question) == 0 {
		r.Question = q.Question
	}
	b := pack(r, udp, q)
	if b == nil {
		// The engine's answer does not pack (e.g. a record it built is
		// invalid): the client still deserves an answer.
		return pack(refusal(q, D.RcodeServerFailure), udp, q), failed, 0
	}
	return b, answered, cacheTTL(r)
}

// refusal is an empty reply to q with rcode, echoing the question.
func refusal(q *D.Msg, rcode int) *D.Msg {
	r := new(D.Msg)
	r.Id = q.Id
	r.Response = true
	r.Opcode = q.Opcode
	r.RecursionDesired = q.RecursionDesired
	r.RecursionAvailable = true
	r.CheckingDisabled = q.CheckingDisabled
	r.Rcode = rcode
	if rcode != D.RcodeFormatError && len(q.Question) > 0 {
		r.Question = q.Question[:1]
	}
	return r
}

// pack encodes r for the transport: over UDP it must fit the client's buffer
// (EDNS0 size, at least 512), over TCP the 2-byte length prefix. It returns
// nil if r cannot be packed.
func pack(r *D.Msg, udp bool, q *D.Msg) []byte {
	limit := maxTCPMsg
	if udp {
		limit = D.MinMsgSize
		if opt := q.IsEdns0(); opt != nil {
			limit = max(int(opt.UDPSize()), D.MinMsgSize)
		}
	}
	// Truncate compresses when that makes the reply fit, drops records that
	// still do not fit and then sets TC, so the client retries over TCP.
	r.Truncate(limit)
	b, err := r.Pack()
	if err != nil || len(b) > limit {
		return nil
	}
	return b
}
