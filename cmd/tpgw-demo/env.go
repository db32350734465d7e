package main

import (
	"fmt"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
)

// env lets the demo use internal/testnet, which is written for tests: it
// provides the few testing.TB methods testnet calls, with cleanups run in
// reverse order at the end and Fatal ending the demo after cleanup.
type env struct {
	testing.TB            // nil: only the methods below are used
	mu         sync.Mutex // cleanups and tmp: an interrupt cleans up from another goroutine
	once       sync.Once  // cleanup runs once; a second caller waits for it
	stopped    atomic.Bool
	cleanups   []func()
	failed     bool
	tmp        []string
}

type demoFailed struct{}

func newEnv() *env { return &env{} }

func (e *env) Helper()                 {}
func (e *env) Name() string            { return "tpgw-demo" }
func (e *env) Failed() bool            { return e.failed }
func (e *env) Cleanup(f func())        { e.mu.Lock(); e.cleanups = append(e.cleanups, f); e.mu.Unlock() }
func (e *env) Log(a ...any)            { fmt.Fprintln(os.Stderr, a...) }
func (e *env) Logf(f string, a ...any) { fmt.Fprintf(os.Stderr, f+"\n", a...) }
func (e *env) Error(a ...any) {
	e.failed = true
	fmt.Fprintln(os.Stderr, append([]any{"error:"}, a...)...)
}
func (e *env) Errorf(f string, a ...any) {
	e.failed = true
	fmt.Fprintf(os.Stderr, "error: "+f+"\n", a...)
}
func (e *env) Fatal(a ...any)            { e.Error(a...); panic(demoFailed{}) }
func (e *env) Fatalf(f string, a ...any) { e.Errorf(f, a...); panic(demoFailed{}) }
func (e *env) FailNow()                  { e.failed = true; panic(demoFailed{}) }
func (e *env) Skip(a ...any)             { e.Fatal(a...) }
func (e *env) Skipf(f string, a ...any)  { e.Fatalf(f, a...) }
func (e *env) SkipNow()                  { e.FailNow() }
func (e *env) Skipped() bool             { return false }

func (e *env) TempDir() string {
	d, err := os.MkdirTemp("", "tpgw-demo")
	if err != nil {
		e.Fatal(err)
	}
	e.mu.Lock()
	e.tmp = append(e.tmp, d)
	e.mu.Unlock()
	return d
}

func (e *env) cleanup() {
	e.once.Do(func() {
		e.mu.Lock()
		cleanups, tmp := e.cleanups, e.tmp
		e.cleanups, e.tmp = nil, nil
		e.mu.Unlock()
		for i := len(cleanups) - 1; i >= 0; i-- {
			cleanups[i]()
		}
		for _, d := range tmp {
			os.RemoveAll(d)
		}
	})
}

// interrupted reports whether a signal stopped the demo; its exit is then
// the signal handler's.
func (e *env) interrupted() bool { return e.stopped.Load() }

// cleanupOnSignal makes SIGINT (Ctrl-C) and SIGTERM stop the processes the
// demo started and delete its namespaces before it exits (status 130), as
// a normal end does: nothing is left behind.
func (e *env) cleanupOnSignal() {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		s := <-sigs
		e.stopped.Store(true)
		fmt.Fprintf(os.Stderr, "\ntpgw-demo: %v: stopping and removing the demo namespaces\n", s)
		e.cleanup()
		os.Exit(130)
	}()
}
