package tsock

import (
	"slices"
	"testing"
	"time"
)

func TestAcceptBackoff(t *testing.T) {
	var waited []time.Duration
	b := AcceptBackoff{sleep: func(d time.Duration) { waited = append(waited, d) }}
	warns, total := 0, 0
	for range 10 {
		if warn, n := b.Failed(); warn {
			warns++
			total += n
		}
	}
	ms := time.Millisecond
	want := []time.Duration{5 * ms, 10 * ms, 20 * ms, 40 * ms, 80 * ms, 160 * ms, 320 * ms, 640 * ms, time.Second, time.Second}
	if !slices.Equal(waited, want) {
		t.Errorf("waits %v, want %v (5 ms doubling, capped at 1 s)", waited, want)
	}
	if warns != 1 || total != 1 {
		t.Errorf("%d warnings for %d failures, want 1 for the first", warns, total)
	}
	b.Succeeded()
	waited = nil
	// A warning again once 10 s have passed, counting what it did not report;
	// the wait starts again at 5 ms after a success.
	b.warned = time.Now().Add(-acceptWarnGap)
	if warn, n := b.Failed(); !warn || n != 10 || !slices.Equal(waited, want[:1]) {
		t.Errorf("after a success and 10 s: warn %v for %d failures, waits %v; want a warning for the 10 since the first and a 5 ms wait", warn, n, waited)
	}
}
