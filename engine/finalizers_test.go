package engine

import (
	"runtime"
	"testing"
	"time"
)

// reloadEngine reloads testEngine once the finalizers of everything
// unreachable so far have run and are ordered before the reload.
//
// mihomo closes a proxy nothing refers to any more from a finalizer
// (autoCloseProxyAdapter), and that Close logs, which reads mihomo's log
// level; ApplyConfig writes that level, a plain variable (doc.go). Every
// config a test parses leaves such proxies behind, so without this the race
// detector saw a finalizer's read and the reload's write with nothing
// ordering them (make race failed TestSniffingFlowsUseMihomo once in CI, and
// 2 of 30 runs here).
func reloadEngine(t testing.TB, raw []byte) error {
	t.Helper()
	settleFinalizers(t)
	return testEngine.Reload(raw, 0)
}

// finSentinel is large enough to get its own allocation: the tiny allocator
// packs small pointer-free objects together, and their finalizers may never
// run.
type finSentinel struct {
	_ [64]byte
}

// settleFinalizers runs a garbage collection and waits, twice, for the
// finalizer of an object of its own. The runtime runs finalizers on one
// goroutine, a queued batch at a time (newest first within a batch): the
// first wait ends when the batch holding everything unreachable now has
// started, the second when it has finished. The second sentinel's finalizer
// runs after those on the same goroutine, and closing its channel orders
// them before the caller, which the race detector follows.
func settleFinalizers(t testing.TB) {
	t.Helper()
	for range 2 {
		done := make(chan struct{})
		runtime.SetFinalizer(new(finSentinel), func(*finSentinel) { close(done) })
		runtime.GC()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("a finalizer did not run within 10s of a garbage collection")
		}
	}
}
