package tsock

import "time"

// AcceptBackoff paces an accept loop through an error that lasts until
// something else changes, such as running out of file descriptors: the
// connection stays in the listen queue, so accepting again at once fails
// again at once. The relay's loop did exactly that, spinning a core and
// logging 877,003 warnings in 3 s at its descriptor limit.
type AcceptBackoff struct {
	delay  time.Duration
	failed int                 // failures since the last warning
	warned time.Time           // when the last warning was due
	sleep  func(time.Duration) // time.Sleep; tests count the waits instead
}

const (
	acceptDelayMin = 5 * time.Millisecond
	acceptDelayMax = time.Second
	acceptWarnGap  = 10 * time.Second
)

// Failed records a failed accept and waits before the next: 5 ms, doubling
// up to 1 s while the failures go on. warn is true at most once per 10 s;
// failures counts the failed accepts since the last warning, this one
// included.
func (b *AcceptBackoff) Failed() (warn bool, failures int) {
	b.failed++
	if now := time.Now(); now.Sub(b.warned) >= acceptWarnGap {
		warn, failures = true, b.failed
		b.warned, b.failed = now, 0
	}
	if b.delay == 0 {
		b.delay = acceptDelayMin
	} else if b.delay *= 2; b.delay > acceptDelayMax {
		b.delay = acceptDelayMax
	}
	if b.sleep == nil {
		b.sleep = time.Sleep
	}
	b.sleep(b.delay)
	return warn, failures
}

// Succeeded resets the delay after an accept went through.
func (b *AcceptBackoff) Succeeded() { b.delay = 0 }
