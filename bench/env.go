package bench

import (
	"errors"
	"fmt"
	"io"
	"os"
	"testing"
)

// Env lets a program use internal/testnet, which is written for tests: it
// provides the testing.TB methods testnet calls. Cleanups run in reverse order
// in Close; Fatal ends the current Env.Do with an error.
type Env struct {
	testing.TB // nil: only the methods below are used
	name       string
	log        io.Writer
	cleanups   []func()
	tmp        []string
	failed     bool
}

// fatal is the panic value of Fatal, recovered by Do.
type fatal struct{ msg string }

// NewEnv returns an Env that logs to log.
func NewEnv(name string, log io.Writer) *Env { return &Env{name: name, log: log} }

// Do runs fn and turns a Fatal inside it into an error.
func (e *Env) Do(fn func()) (err error) {
	defer func() {
		if r := recover(); r != nil {
			f, ok := r.(fatal)
			if !ok {
				panic(r)
			}
			err = errors.New(f.msg)
		}
	}()
	fn()
	return nil
}

// Close runs the cleanups in reverse order and removes the temp dirs.
func (e *Env) Close() {
	for i := len(e.cleanups) - 1; i >= 0; i-- {
		e.cleanups[i]()
	}
	e.cleanups = nil
	for _, d := range e.tmp {
		os.RemoveAll(d)
	}
	e.tmp = nil
}

func (e *Env) Helper()                 {}
func (e *Env) Name() string            { return e.name }
func (e *Env) Failed() bool            { return e.failed }
func (e *Env) Cleanup(f func())        { e.cleanups = append(e.cleanups, f) }
func (e *Env) Log(a ...any)            { fmt.Fprintln(e.log, a...) }
func (e *Env) Logf(f string, a ...any) { fmt.Fprintf(e.log, f+"\n", a...) }
func (e *Env) Error(a ...any) {
	e.failed = true
	fmt.Fprintln(e.log, append([]any{"error:"}, a...)...)
}
func (e *Env) Errorf(f string, a ...any) {
	e.failed = true
	fmt.Fprintf(e.log, "error: "+f+"\n", a...)
}
func (e *Env) Fatal(a ...any)            { panic(fatal{fmt.Sprint(a...)}) }
func (e *Env) Fatalf(f string, a ...any) { panic(fatal{fmt.Sprintf(f, a...)}) }
func (e *Env) FailNow()                  { panic(fatal{"failed"}) }
func (e *Env) Skip(a ...any)             { e.Fatal(a...) }
func (e *Env) Skipf(f string, a ...any)  { e.Fatalf(f, a...) }
func (e *Env) SkipNow()                  { e.FailNow() }
func (e *Env) Skipped() bool             { return false }

// TempDir returns a new directory removed by Close.
func (e *Env) TempDir() string {
	d, err := os.MkdirTemp("", "tpgw-bench")
	if err != nil {
		e.Fatal(err)
	}
	e.tmp = append(e.tmp, d)
	return d
}
