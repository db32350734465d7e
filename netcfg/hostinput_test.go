package netcfg

import (
	"testing"

	"github.com/google/nftables/expr"
)

func TestFinalVerdict(t *testing.T) {
	for _, c := range []struct {
		name  string
		exprs []expr.Any
		want  string
	}{
		{"firewalld's last rule", []expr.Any{&expr.Reject{Type: 2, Code: 3}}, "reject"},
		{"counted and logged drop", []expr.Any{&expr.Counter{}, &expr.Log{}, &expr.Verdict{Kind: expr.VerdictDrop}}, "drop"},
		{"drop of some packets", []expr.Any{&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1}, &expr.Cmp{Register: 1, Data: []byte("wan\x00")}, &expr.Verdict{Kind: expr.VerdictDrop}}, ""},
		{"accept", []expr.Any{&expr.Verdict{Kind: expr.VerdictAccept}}, ""},
		{"jump", []expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: "handle_reject"}}, ""},
		{"empty", nil, ""},
	} {
		if got := finalVerdict(c.exprs); got != c.want {
			t.Errorf("%s: %q, want %q", c.name, got, c.want)
		}
	}
}
