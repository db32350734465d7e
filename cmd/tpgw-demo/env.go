package main

import (
	"fmt"
	"os"
	"testing"
)

// env lets the demo use internal/testnet, which is written for tests: it
// provides the few testing.TB methods testnet calls, with cleanups run in
// reverse order at the end and Fatal ending the demo after cleanup.
type env struct {
	testing.TB // nil: only the methods below are used
	cleanups   []func()
	failed     bool
	tmp        []string
}

type demoFailed struct{}

func newEnv() *env { return &env{} }

func (e *env) Helper()                 {}
func (e *env) Name() string            { return "tpgw-demo" }
func (e *env) Failed() bool            { return e.failed }
func (e *env) Cleanup(f func())        { e.cleanups = append(e.cleanups, f) }
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
	e.tmp = append(e.tmp, d)
	return d
}

func (e *env) cleanup() {
	for i := len(e.cleanups) - 1; i >= 0; i-- {
		e.cleanups[i]()
	}
	e.cleanups = nil
	for _, d := range e.tmp {
		os.RemoveAll(d)
	}
}
