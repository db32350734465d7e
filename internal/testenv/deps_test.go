package testenv

import (
	"bufio"
	"bytes"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
)

// provided names the programs tests require that scripts/install-deps.sh
// does not check by name, each with the checked program whose package
// brings it, or "" for what a fresh Debian machine that runs make test has
// anyway: util-linux and dash are essential packages, and go and make run
// the tests.
var provided = map[string]string{
	"ip6tables":      "iptables",
	"iptables-save":  "iptables",
	"ip6tables-save": "iptables",
	"prlimit":        "",
	"setpriv":        "",
	"unshare":        "",
	"sh":             "",
	"go":             "",
	"make":           "",
}

// TestInstallDepsCoversTests: every program a test requires through
// RequireTools (or testnet's requireTool) is installed by the part of
// scripts/install-deps.sh that make test runs (not only by its bench part),
// so a fresh CI machine has it.
// A test that needed dnsperf while only make bench installed it passed on
// machines that had run the bench and failed on a fresh one.
func TestInstallDepsCoversTests(t *testing.T) {
	root := filepath.Join("..", "..")
	checked, bench := installDeps(t, filepath.Join(root, "scripts", "install-deps.sh"))
	if len(checked) == 0 {
		t.Fatal("install-deps.sh checks no program outside its bench part")
	}
	required := requiredTools(t, root)
	if len(required) == 0 {
		t.Fatal("no RequireTools call found in the tests")
	}
	for tool, where := range required {
		if checked[tool] {
			continue
		}
		if pkg, ok := provided[tool]; ok && (pkg == "" || checked[pkg]) {
			continue
		}
		if bench[tool] {
			t.Errorf("%s requires %s, which install-deps.sh installs only for make bench", where, tool)
		} else {
			t.Errorf("%s requires %s, which install-deps.sh does not install", where, tool)
		}
	}
}

// installDeps reads the programs install-deps.sh checks: those make test
// gets, and those only its bench argument adds.
func installDeps(t *testing.T, path string) (test, bench map[string]bool) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	test, bench = map[string]bool{}, map[string]bool{}
	inBench := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case strings.HasPrefix(line, "if ") && strings.Contains(line, "= bench"):
			inBench = true
		case line == "fi":
			inBench = false
		case strings.HasPrefix(line, "check "):
			fields := strings.Fields(line)
			if len(fields) < 3 {
				t.Fatalf("%s: malformed %q", path, line)
			}
			if inBench {
				bench[fields[1]] = true
			} else {
				test[fields[1]] = true
			}
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return test, bench
}

var requireCall = regexp.MustCompile(`(?:RequireTools|requireTool)\(\s*\w+\s*,([^)]*)\)`)
var quoted = regexp.MustCompile(`"[^"]*"`)

// requiredTools maps each program named in a RequireTools (or testnet's
// requireTool) call of a Go file under root to the first place naming it.
func requiredTools(t *testing.T, root string) map[string]string {
	t.Helper()
	tools := map[string]string{}
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if name := d.Name(); path != root && (strings.HasPrefix(name, ".") || name == "bin" || name == "dist") {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") {
			return nil
		}
		src, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for _, m := range requireCall.FindAllSubmatchIndex(src, -1) {
			line := 1 + bytes.Count(src[:m[0]], []byte("\n"))
			for _, q := range quoted.FindAll(src[m[2]:m[3]], -1) {
				name, err := strconv.Unquote(string(q))
				if err != nil {
					return err
				}
				if _, seen := tools[name]; !seen {
					rel, _ := filepath.Rel(root, path)
					tools[name] = rel + ":" + strconv.Itoa(line)
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	names := make([]string, 0, len(tools))
	for n := range tools {
		names = append(names, n)
	}
	sort.Strings(names)
	t.Logf("programs the tests require: %s", strings.Join(names, " "))
	return tools
}
