package netcfg

import (
	"net/netip"
	"slices"
)

// AddrRange is an inclusive range of addresses of one family, the element of
// an nft interval set.
type AddrRange struct {
	From, To netip.Addr
}

func rangeOf(p netip.Prefix) AddrRange {
	p = p.Masked()
	from := p.Addr()
	to := from.As16()
	bits := p.Bits()
	if from.Is4() {
		bits += 96
	}
	for i := bits; i < 128; i++ {
		to[i/8] |= 1 << (7 - i%8)
	}
	last := netip.AddrFrom16(to)
	if from.Is4() {
		last = last.Unmap()
	}
	return AddrRange{From: from, To: last}
}

// Prefix returns the range as a prefix when it is exactly one.
func (r AddrRange) Prefix() (netip.Prefix, bool) {
	for bits := 0; bits <= r.From.BitLen(); bits++ {
		p := netip.PrefixFrom(r.From, bits)
		if p.Masked().Addr() != r.From {
			continue
		}
		if rangeOf(p).To == r.To {
			return p, true
		}
	}
	return netip.Prefix{}, false
}

// String prints the range the way nft accepts it: a prefix, a single address or from-to.
func (r AddrRange) String() string {
	if r.From == r.To {
		return r.From.String()
	}
	if p, ok := r.Prefix(); ok {
		return p.String()
	}
	return r.From.String() + "-" + r.To.String()
}

// mergePrefixes turns prefixes of one family into sorted ranges with no overlap
// and no adjacency: the kernel rejects overlapping elements in an interval set,
// and merged ranges are the canonical form nft also prints.
func mergePrefixes(ps []netip.Prefix) []AddrRange {
	rs := make([]AddrRange, 0, len(ps))
	for _, p := range ps {
		rs = append(rs, rangeOf(p))
	}
	slices.SortFunc(rs, func(a, b AddrRange) int { return a.From.Compare(b.From) })
	var out []AddrRange
	for _, r := range rs {
		if n := len(out); n > 0 {
			last := &out[n-1]
			next := last.To.Next() // invalid when last.To is the family's highest address
			if !next.IsValid() || r.From.Compare(next) <= 0 {
				if r.To.Compare(last.To) > 0 {
					last.To = r.To
				}
				continue
			}
		}
		out = append(out, r)
	}
	return out
}
