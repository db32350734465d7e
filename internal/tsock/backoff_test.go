package tsock

import (
	"testing"
	"time"
)

func TestAcceptBackoff(t *testing.T) {
	var b AcceptBackoff
	start := time.Now()
	warns, total := 0, 0
	for range 8 {
		if warn, n := b.Failed(); warn {
			warns++
			total += n
		}
	}
	// 5+10+20+40+80+160+320+640 ms, warned once (the first failure).
	if took := time.Since(start); took < 1200*time.Millisecond || took > 3*time.Second {
		t.Errorf("8 failures took %v, want about 1.3 s of backoff", took)
	}
	if warns != 1 || total != 1 {
		t.Errorf("%d warnings for %d failures, want 1 for the first", warns, total)
	}
	if b.delay != 640*time.Millisecond {
		t.Errorf("delay %v after 8 failures, want 640ms", b.delay)
	}
	b.Failed()
	b.Failed()
	if b.delay != time.Second {
		t.Errorf("delay %v, want it capped at 1s", b.delay)
	}
	b.Succeeded()
	if b.delay != 0 {
		t.Errorf("delay %v after a success, want 0", b.delay)
	}
	// A warning again once 10 s have passed, counting what it did not report.
	b.warned = time.Now().Add(-acceptWarnGap)
	if warn, n := b.Failed(); !warn || n != 10 {
		t.Errorf("after 10 s: warn %v for %d failures, want a warning for the 10 since the first", warn, n)
	}
}
