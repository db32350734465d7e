package packaging

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// The router build (`make openwrt`) links mihomo without the code tpgw's
// packages never run on a router, so that the x86_64 binary is ≤ 30 MB
// (docs/size.md). It builds mihomo as released, with a few of its files
// replaced by small files of our own (packaging/slim/) or left out:
//
//   - adapter/parser.go: ParseProxy names only the kept outbound types (ss,
//     vmess, vless, trojan, socks5, http, hysteria2, tuic, direct, reject, dns);
//     the others fail with an error that names the type and the full build.
//   - adapter/outbound/<type>.go of the dropped types: removed.
//   - listener/listener.go, listener/parse.go: only the http, socks, mixed and
//     tproxy servers; the other inbound keys are accepted and ignored, and
//     `tpgw check` warns about each (engine/inbounds_slim.go).
//   - listener/inbound/<type>.go of the dropped servers: removed.
//   - transport/kcptun, transport/restls: stubs (shadowsocks' kcptun and restls
//     plugins; ~2.5 MB together), rejected by the parser.
//
// The mechanism is `go build -overlay`, which replaces or hides source files
// without touching them. Go refuses overlays of files inside the module cache,
// so the build copies the mihomo module (unchanged, 6 MB) into a work
// directory and points a temporary go.mod (-modfile) at the copy with a
// replace directive. Nothing of mihomo is committed here.
//
// The overlay is only valid for the mihomo it was written against: the
// version must be MihomoVersion and every replaced file must hash to the
// value below, or PrepareRouterBuild fails and says what to do.

// MihomoModule is the module the router build patches.
const MihomoModule = "github.com/metacubex/mihomo"

// MihomoVersion is the mihomo release the overlay was written for.
const MihomoVersion = "v1.19.24"

// RouterBuildTag selects tpgw's side of the router build (engine/inbounds_slim.go)
// and the replacement files in packaging/slim, which carry it too.
const RouterBuildTag = "tpgw_slim"

// RouterBuildTags are the build tags of the router build.
const RouterBuildTags = BuildTags + "," + RouterBuildTag

// OverlayFile is one file of mihomo the router build replaces or removes.
type OverlayFile struct {
	Path        string // in the mihomo module
	SHA256      string // of the original file of MihomoVersion
	Replacement string // in packaging/slim; "" removes the file
}

// RouterOverlay is the router build's overlay.
var RouterOverlay = []OverlayFile{
	{"adapter/parser.go", "51db6b67343f79a3be58b84a8a4d474d4eeb80415519930feffd34be68c0e3e1", "adapter/parser.go"},
	{"adapter/outbound/shadowsocksr.go", "203ade282c0127a3c1d9290e31b176adbf5cc3440b9be598525d8d2fc358432f", ""},
	{"adapter/outbound/snell.go", "3dc2e1e3a4f5c85eb1f94c8b92647d91aacae571c62e994566e66c55909dd397", ""},
	{"adapter/outbound/hysteria.go", "1915ebb78f357c68110d9b52b599ea62c03416f99a1669e6418ebeecd92955a0", ""},
	{"adapter/outbound/wireguard.go", "26c279f9502b2c4cc55efc55e03a4f9f3be0ac60e1bb12a387f2b4264c07b2eb", ""},
	{"adapter/outbound/ssh.go", "90b0c73e21d7eb5050815bcb890a0e27dde7c2cdde3d6705e23bfd4ec6e8c1c0", ""},
	{"adapter/outbound/mieru.go", "1520f4cc6f9fba17a9b8358671514905091a072d9355e2519ef2defd2719d6da", ""},
	{"adapter/outbound/anytls.go", "fb7123f1799bcd44ff128e3882fcda75db783f74789f743c098dd71526ad2910", ""},
	{"adapter/outbound/sudoku.go", "531575e7138836b779fc1b8e14842fda1926d534559a861c8c438ceecc96a168", ""},
	{"adapter/outbound/masque.go", "b953005d3313fc857f5524ebb508676da1cd80d01ef3b0800b63603db0f32571", ""},
	{"adapter/outbound/trusttunnel.go", "65df76421da0e8c3b19624787f0724faabf822c4a0f346644668cd25fcd79a28", ""},
	{"listener/listener.go", "0e059b1be9994fb8c4fbb8efe7bc03add9c797a284562114212a6a4c683019fd", "listener/listener.go"},
	{"listener/parse.go", "35c0861288fc73ed723719c97ec17ca240a89a318bec37b491ff5e7a99cdec9d", "listener/parse.go"},
	{"listener/inbound/anytls.go", "50a12b27a03b1593b5b9833edca72b44fde614c5d33fa35a77361963d8346777", ""},
	{"listener/inbound/hysteria2.go", "5c64b31061e7b476b9c0bc7fde3422469eae6d0647756c3bcad0b4c98ae8c175", ""},
	{"listener/inbound/kcptun.go", "dc5f7c4813595f5f83b9412a448cab264eb400ff2098a829dc46af5441199934", ""},
	{"listener/inbound/mieru.go", "f7afd6f4bb25de91f9949db5542895ddf77bc8ba19850ccc9a04fc4b0c1aec46", ""},
	{"listener/inbound/mux.go", "509658fce7818cfcf74d421904359de5fdf66a2f736ab3fb399f31d4916aa697", ""},
	{"listener/inbound/redir.go", "f0ca16690bb4b33b9c80028109caa4f4dc440c2c335f610ca55c3f484087d32a", ""},
	{"listener/inbound/shadowsocks.go", "259ad183511f987715a6433d195fd0a19c78d2f3c83e37c2921506526283911f", ""},
	{"listener/inbound/shadowtls.go", "f76f2d122eb16bc4bbcd4681750b12da480f6d411ccc1325bff5f4fa95c19126", ""},
	{"listener/inbound/sudoku.go", "8ff8d8bd1851cd5ff59e587778773776ac7cc16fb40f525cf85504b7cf4a3710", ""},
	{"listener/inbound/trojan.go", "11cd510da7889d7c5aba7454d053458300b7ec9f3c14f29ed5f9191da7a3e864", ""},
	{"listener/inbound/trusttunnel.go", "ad46bbea28955d57fd088c0ab07e974ad6ca5226785f54dcfc08e1b01bfa47ec", ""},
	{"listener/inbound/tuic.go", "58c812ae20f0128a732882b31d9d3acf21fc9d5d02a47c0f0c7d683ffb81a092", ""},
	{"listener/inbound/tun.go", "ee809de1116fa80a0808e1fc8864f7b1d5b873f80d2c42045e4f4259a2007315", ""},
	{"listener/inbound/tunnel.go", "4de98e1b28e110cc589b506788ddd1144437e862ffec5c97e5a4d1befa6c487c", ""},
	{"listener/inbound/vless.go", "ef4f1088dbdcb36299d0702f2411f3f51f233d7cc770136a74122aaf707e2863", ""},
	{"listener/inbound/vmess.go", "99378c89d50c59a1a7085405399333d58388292148e8b6d6d176c23e1ed768e8", ""},
	{"transport/kcptun/client.go", "cee59f22283bc34baffd69f81ebe22973a3b0d53d8fe5347415c23b6dbf9e822", "transport/kcptun/kcptun.go"},
	{"transport/kcptun/common.go", "a4b163ce53cad8a57a1c3e7aadab2290f7d761864e4870e2bbf67b4ce7019d0d", ""},
	{"transport/kcptun/comp.go", "6f2d9fa33d743527974f414e348d348e188716f9417e85d7e7dfa166a042721a", ""},
	{"transport/kcptun/server.go", "2de7f0c5415abae748225cbdf8a6868eabaabd6fbbfecf273fd29c7fbadfa79f", ""},
	{"transport/restls/restls.go", "6f204c537382fe582d0609212157a6dfa639a8725709594d5d4039d36b74cf82", "transport/restls/restls.go"},
}

// RouterBuildFiles are what PrepareRouterBuild wrote: `go build` flags that
// select them.
type RouterBuildFiles struct {
	ModFile string // -modfile: the repository's go.mod plus a replace of mihomo by the copy
	Overlay string // -overlay: the JSON file
	Mihomo  string // the copy of the mihomo module
}

// BuildFlags are the `go build` flags of the router build, tags included.
func (f *RouterBuildFiles) BuildFlags() []string {
	return []string{"-modfile=" + f.ModFile, "-overlay=" + f.Overlay, "-tags", RouterBuildTags}
}

// PrepareRouterBuild checks that the mihomo module of repoDir's build is the
// one the overlay was written for, copies it into workDir and writes the
// -modfile and -overlay files there. workDir should stay the same between
// runs (e.g. bin/router-build): the copy is rewritten each time, and Go's
// build cache, keyed by file contents under -trimpath, keeps the compiled
// packages. Only the copy, go.mod, go.sum and overlay.json are written there.
func PrepareRouterBuild(repoDir, workDir, goCmd string) (*RouterBuildFiles, error) {
	if goCmd == "" {
		goCmd = "go"
	}
	repoDir, err := filepath.Abs(repoDir)
	if err != nil {
		return nil, err
	}
	workDir, err = filepath.Abs(workDir)
	if err != nil {
		return nil, err
	}
	// `go mod download` gives the module's directory even when the module
	// cache is cold, where `go list -m -f {{.Dir}}` would print nothing.
	cmd := exec.Command(goCmd, "mod", "download", "-json", MihomoModule)
	cmd.Dir = repoDir
	cmd.Env = append(os.Environ(), "GOWORK=off")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("router build: go mod download %s: %w\n%s", MihomoModule, err, stderr.Bytes())
	}
	var mod struct{ Path, Version, Dir, Error string }
	if err := json.Unmarshal(out, &mod); err != nil {
		return nil, fmt.Errorf("router build: go mod download %s: %w", MihomoModule, err)
	}
	if mod.Error != "" || mod.Dir == "" {
		return nil, fmt.Errorf("router build: go mod download %s: no module directory: %s", MihomoModule, mod.Error)
	}
	if err := CheckMihomoSource(mod.Version, mod.Dir); err != nil {
		return nil, err
	}

	files := &RouterBuildFiles{
		ModFile: filepath.Join(workDir, "go.mod"),
		Overlay: filepath.Join(workDir, "overlay.json"),
		Mihomo:  filepath.Join(workDir, "mihomo@"+mod.Version),
	}
	// workDir receives a go.mod of its own: never the repository itself.
	if workDir == repoDir {
		return nil, fmt.Errorf("router build: the work directory must not be the repository (%s)", repoDir)
	}
	if err := os.RemoveAll(files.Mihomo); err != nil {
		return nil, err
	}
	if err := copyTree(mod.Dir, files.Mihomo); err != nil {
		return nil, fmt.Errorf("router build: copy %s: %w", mod.Dir, err)
	}

	// The temporary go.mod is the repository's with mihomo replaced by the
	// copy; its go.sum (go.mod's name with .sum) is the repository's.
	gomod, err := os.ReadFile(filepath.Join(repoDir, "go.mod"))
	if err != nil {
		return nil, err
	}
	gosum, err := os.ReadFile(filepath.Join(repoDir, "go.sum"))
	if err != nil {
		return nil, err
	}
	// A relative replace path keeps the build's embedded module information
	// free of this machine's directories when workDir is inside the repository.
	target := files.Mihomo
	if rel, err := filepath.Rel(repoDir, files.Mihomo); err == nil && !strings.HasPrefix(rel, "..") {
		target = "./" + filepath.ToSlash(rel)
	}
	gomod = fmt.Appendf(bytes.TrimRight(gomod, "\n"), "\n\n// tpgw router build (packaging/slim.go)\nreplace %s %s => %s\n",
		MihomoModule, mod.Version, target)
	if err := os.WriteFile(files.ModFile, gomod, 0o644); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(workDir, "go.sum"), gosum, 0o644); err != nil {
		return nil, err
	}

	replace := map[string]string{}
	for _, f := range RouterOverlay {
		var repl string
		if f.Replacement != "" {
			repl = filepath.Join(repoDir, "packaging", "slim", filepath.FromSlash(f.Replacement))
			if _, err := os.Stat(repl); err != nil {
				return nil, fmt.Errorf("router build: replacement for %s: %w", f.Path, err)
			}
		}
		replace[filepath.Join(files.Mihomo, filepath.FromSlash(f.Path))] = repl
	}
	overlay, err := json.MarshalIndent(map[string]any{"Replace": replace}, "", "\t")
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(files.Overlay, append(overlay, '\n'), 0o644); err != nil {
		return nil, err
	}
	return files, nil
}

// CheckMihomoSource fails unless version is MihomoVersion and every file the
// overlay replaces or removes in dir is the one the overlay was written for.
func CheckMihomoSource(version, dir string) error {
	const fix = "the router build's overlay (packaging/slim.go, packaging/slim/) was written for mihomo %s; " +
		"after a mihomo upgrade, compare the replaced files with the new release, update the replacements, " +
		"MihomoVersion and the hashes in RouterOverlay, and measure again (docs/size.md)"
	if version != MihomoVersion {
		return fmt.Errorf("router build: go.mod requires %s %s: "+fix, MihomoModule, version, MihomoVersion)
	}
	var changed []string
	for _, f := range RouterOverlay {
		b, err := os.ReadFile(filepath.Join(dir, filepath.FromSlash(f.Path)))
		if err != nil {
			changed = append(changed, fmt.Sprintf("%s: %v", f.Path, err))
			continue
		}
		if sum := sha256.Sum256(b); hex.EncodeToString(sum[:]) != f.SHA256 {
			changed = append(changed, f.Path+": content differs")
		}
	}
	if len(changed) > 0 {
		return fmt.Errorf("router build: %s %s in %s does not match the overlay (%s): "+fix,
			MihomoModule, version, dir, strings.Join(changed, "; "), MihomoVersion)
	}
	return nil
}

// copyTree copies the regular files and directories under src to dst,
// writable (the module cache's files are read-only).
func copyTree(src, dst string) error {
	return filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, path)
		if err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		switch {
		case d.IsDir():
			return os.MkdirAll(target, 0o755)
		case d.Type().IsRegular():
			b, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			return os.WriteFile(target, b, 0o644)
		}
		return nil
	})
}
