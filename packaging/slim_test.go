package packaging

import (
	"bytes"
	"encoding/json"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tpgw/tpgw/internal/testenv"
)

// Every file in packaging/slim is a replacement named in RouterOverlay, built
// only with the router build's tag, and says which mihomo file it replaces.
func TestRouterOverlayFiles(t *testing.T) {
	named := map[string]string{}
	for _, f := range RouterOverlay {
		if len(f.SHA256) != 64 {
			t.Errorf("%s: SHA256 %q is not a sha256 in hex", f.Path, f.SHA256)
		}
		if f.Replacement != "" {
			named[f.Replacement] = f.Path
		}
	}
	found := map[string]bool{}
	err := filepath.WalkDir("slim", func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel := filepath.ToSlash(strings.TrimPrefix(path, "slim"+string(filepath.Separator)))
		found[rel] = true
		orig, ok := named[rel]
		if !ok {
			t.Errorf("packaging/slim/%s is not a replacement in RouterOverlay", rel)
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		if !bytes.HasPrefix(b, []byte("//go:build "+RouterBuildTag+"\n")) {
			t.Errorf("packaging/slim/%s: first line is not //go:build %s (it must stay out of tpgw's own packages)", rel, RouterBuildTag)
		}
		if !bytes.Contains(b, []byte("mihomo "+MihomoVersion+"'s")) || !bytes.Contains(b, []byte(orig)) {
			t.Errorf("packaging/slim/%s: its comment does not say that it replaces mihomo %s's %s", rel, MihomoVersion, orig)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for rel := range named {
		if !found[rel] {
			t.Errorf("RouterOverlay names packaging/slim/%s, which does not exist", rel)
		}
	}
}

// PrepareRouterBuild writes an overlay for the mihomo of go.mod, and refuses
// a mihomo whose version or replaced files are not the ones it was written for.
func TestPrepareRouterBuild(t *testing.T) {
	testenv.RequireTools(t, "go")
	work := filepath.Join(t.TempDir(), "router-build")
	files, err := PrepareRouterBuild("..", work, "")
	if err != nil {
		t.Fatal(err)
	}
	var overlay struct{ Replace map[string]string }
	b, err := os.ReadFile(files.Overlay)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &overlay); err != nil {
		t.Fatalf("%s: %v", files.Overlay, err)
	}
	if len(overlay.Replace) != len(RouterOverlay) {
		t.Errorf("overlay has %d entries, want %d", len(overlay.Replace), len(RouterOverlay))
	}
	for _, f := range RouterOverlay {
		repl, ok := overlay.Replace[filepath.Join(files.Mihomo, filepath.FromSlash(f.Path))]
		if !ok {
			t.Errorf("overlay does not replace %s in the copy", f.Path)
		} else if (repl == "") != (f.Replacement == "") || (repl != "" && !filepath.IsAbs(repl)) {
			t.Errorf("overlay: %s → %q, want %q as an absolute path", f.Path, repl, f.Replacement)
		}
	}
	mod, err := os.ReadFile(files.ModFile)
	if err != nil {
		t.Fatal(err)
	}
	if want := "replace " + MihomoModule + " " + MihomoVersion + " => " + files.Mihomo + "\n"; !bytes.HasSuffix(mod, []byte(want)) {
		t.Errorf("%s does not end with %q", files.ModFile, want)
	}

	// Another mihomo version: a clear failure that says what to do.
	err = CheckMihomoSource("v1.19.25", files.Mihomo)
	if err == nil || !strings.Contains(err.Error(), "requires github.com/metacubex/mihomo v1.19.25") ||
		!strings.Contains(err.Error(), "written for mihomo "+MihomoVersion) || !strings.Contains(err.Error(), "packaging/slim.go") {
		t.Errorf("CheckMihomoSource(v1.19.25) = %v, want an error naming both versions and packaging/slim.go", err)
	}
	// The same version with a replaced file changed (a re-tag, a local edit).
	changed := filepath.Join(files.Mihomo, "listener", "parse.go")
	if err := os.WriteFile(changed, []byte("package listener\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	err = CheckMihomoSource(MihomoVersion, files.Mihomo)
	if err == nil || !strings.Contains(err.Error(), "listener/parse.go: content differs") {
		t.Errorf("CheckMihomoSource with a changed listener/parse.go = %v, want an error naming the file", err)
	}
}

// go vet accepts the replacement files in the packages they join.
func TestRouterOverlayVet(t *testing.T) {
	testenv.Short(t)
	testenv.RequireTools(t, "go")
	files, err := PrepareRouterBuild("..", filepath.Join(t.TempDir(), "router-build"), "")
	if err != nil {
		t.Fatal(err)
	}
	args := append([]string{"vet"}, files.BuildFlags()...)
	pkgs := map[string]bool{}
	for _, f := range RouterOverlay {
		if f.Replacement != "" {
			pkgs[MihomoModule+"/"+filepath.ToSlash(filepath.Dir(f.Path))] = true
		}
	}
	for p := range pkgs {
		args = append(args, p)
	}
	cmd := exec.Command("go", args...)
	cmd.Dir = ".."
	cmd.Env = append(os.Environ(), "GOWORK=off")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("go %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}
