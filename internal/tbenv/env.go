// Package tbenv lets a program (the demo, the benchmark) use internal/testnet,
// which is written for tests, outside `go test`.
package tbenv

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
)

// Env lets a program use internal/testnet, which is written for tests: it
// provides the testing.TB methods testnet calls. Cleanups run in reverse order
// in Close; Fatal ends the current Env.Do with an error.
type Env struct {
	testing.TB // nil: only the methods below are used
	name       string
	log        io.Writer
	mu         sync.Mutex // cleanups and tmp: an interrupt closes from another goroutine
	once       sync.Once  // Close runs once; a second caller waits for it
	stopped    atomic.Bool
	cleanups   []func()
	tmp        []string
	failed     bool
}

// fatal is the panic value of Fatal, recovered by Do.
type fatal struct{ msg string }

// New returns an Env named name (also the prefix of its temp dirs) that
// logs to log.
func New(name string, log io.Writer) *Env { return &Env{name: name, log: log} }

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

// Interrupted reports whether a signal stopped the run; the process then
// exits from the signal handler, once Close is done.
func (e *Env) Interrupted() bool { return e.stopped.Load() }

// CloseOnSignal makes SIGINT (Ctrl-C) and SIGTERM run Close (stop every
// process the run started, delete its namespaces) and exit with status 130,
// so an interrupted run leaves nothing behind. A Do that returns meanwhile
// should check Interrupted and leave the exit to the handler.
func (e *Env) CloseOnSignal() {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		s := <-sigs
		e.stopped.Store(true)
		fmt.Fprintf(e.log, "\n%s: %v: stopping and removing the namespaces\n", e.name, s)
		e.Close()
		os.Exit(130)
	}()
}

func (e *Env) Helper()                 {}
func (e *Env) Name() string            { return e.name }
func (e *Env) Failed() bool            { return e.failed }
func (e *Env) Cleanup(f func())        { e.mu.Lock(); e.cleanups = append(e.cleanups, f); e.mu.Unlock() }
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
	d, err := os.MkdirTemp("", e.name)
	if err != nil {
		e.Fatal(err)
	}
	e.mu.Lock()
	e.tmp = append(e.tmp, d)
	e.mu.Unlock()
	return d
}
