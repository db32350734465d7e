// Command mkopenwrt is `make openwrt`: it cross-compiles tpgw for OpenWrt's
// common architectures and writes an installable .ipk for each, without the
// OpenWrt SDK, then prints the stripped binary size per architecture.
//
// The binaries are the router build (packaging/slim.go): mihomo without the
// inbound servers and outbound types a router does not need; -full builds
// the whole of mihomo instead, as `make build` does.
//
//	go run ./packaging/mkopenwrt -out dist/openwrt -arch x86_64,arm -version v1.0.0 -commit abc1234
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/tpgw/tpgw/packaging"
)

func main() {
	if err := run(os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "mkopenwrt:", err)
		os.Exit(1)
	}
}

func run(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("mkopenwrt", flag.ContinueOnError)
	out := fs.String("out", "dist/openwrt", "output directory")
	arches := fs.String("arch", "x86_64,aarch64,arm,mipsle", "comma-separated targets (x86_64, aarch64, arm, mipsle)")
	version := fs.String("version", "dev", "tpgw version (main.version)")
	commit := fs.String("commit", "unknown", "commit (main.commit)")
	repo := fs.String("repo", ".", "tpgw source tree (module root)")
	full := fs.Bool("full", false, "link all of mihomo (the full build) instead of the router build")
	work := fs.String("work", "bin/router-build", "router build's work directory (mihomo copy, -modfile, -overlay), relative to -repo")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var targets []packaging.Target
	for _, name := range strings.Split(*arches, ",") {
		if name = strings.TrimSpace(name); name == "" {
			continue
		}
		t, ok := packaging.TargetByName(name)
		if !ok {
			return fmt.Errorf("unknown -arch %q (known: x86_64, aarch64, arm, mipsle)", name)
		}
		targets = append(targets, t)
	}
	mtime, err := sourceDate(*repo)
	if err != nil {
		return err
	}
	b := &packaging.Build{RepoDir: *repo, OutDir: *out, Version: *version, Commit: *commit, MTime: mtime}
	if !*full {
		workDir := *work
		if !filepath.IsAbs(workDir) {
			workDir = filepath.Join(*repo, workDir)
		}
		if b.Router, err = packaging.PrepareRouterBuild(*repo, workDir, ""); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "router build: mihomo %s with the overlay %s\n", packaging.MihomoVersion, b.Router.Overlay)
	}
	var results []packaging.Result
	for _, t := range targets {
		start := time.Now()
		fmt.Fprintf(stdout, "building %s (GOARCH=%s%s) ...\n", t.Name, t.GOARCH, extraEnv(t))
		r, err := b.Run(t)
		if err != nil {
			return err
		}
		for _, p := range r.Packages {
			fmt.Fprintf(stdout, "  %s (%.1fs)\n", p, time.Since(start).Seconds())
		}
		results = append(results, r)
	}
	fmt.Fprint(stdout, packaging.SizeReport(results, b.Router != nil))
	return nil
}

func extraEnv(t packaging.Target) string {
	switch {
	case t.GOARM != "":
		return " GOARM=" + t.GOARM
	case t.GOMIPS != "":
		return " GOMIPS=" + t.GOMIPS
	}
	return ""
}

// sourceDate is the mtime of every archive member: SOURCE_DATE_EPOCH if set
// (reproducible-builds.org), else the commit's time, so rebuilding the same
// commit gives the same packages. It must not be 0: opkg replaces an existing
// file only when it is older than the archived one (unless forced).
func sourceDate(repo string) (time.Time, error) {
	if s := os.Getenv("SOURCE_DATE_EPOCH"); s != "" {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return time.Time{}, fmt.Errorf("SOURCE_DATE_EPOCH=%q: %w", s, err)
		}
		return time.Unix(n, 0), nil
	}
	cmd := exec.Command("git", "log", "-1", "--format=%ct")
	cmd.Dir = repo
	if out, err := cmd.Output(); err == nil {
		if n, err := strconv.ParseInt(strings.TrimSpace(string(out)), 10, 64); err == nil {
			return time.Unix(n, 0), nil
		}
	}
	return time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC), nil
}
