package packaging

import (
	"debug/elf"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"time"
)

// Target is one Go cross-compilation and the OpenWrt package architectures
// its binary is packaged for. A Go binary is built for an ISA, not a CPU, so
// one aarch64 build serves every aarch64_* package architecture; opkg installs
// only a package whose Architecture is listed in the device's opkg.conf, so
// the same binary is packaged under each common name.
type Target struct {
	Name           string // short name used in file names and -arch: x86_64, aarch64, arm, mipsle
	GOARCH         string // amd64, arm64, arm, mipsle
	GOARM, GOMIPS  string // GOARM=7 (needs VFP: every ARMv7 router SoC), GOMIPS=softfloat (24Kc has no FPU)
	Machine        elf.Machine
	Class          elf.Class
	OpenWrtArches  []string // Architecture fields, the first is the main one
	OpenWrtTargets string   // informative: which OpenWrt targets use them
}

// Targets are the builds `make openwrt` makes.
var Targets = []Target{
	{Name: "x86_64", GOARCH: "amd64", Machine: elf.EM_X86_64, Class: elf.ELFCLASS64,
		OpenWrtArches: []string{"x86_64"}, OpenWrtTargets: "x86/64"},
	// aarch64_cortex-a53: mediatek/filogic, qualcommax, mvebu/cortexa53, bcm27xx/bcm2710;
	// aarch64_cortex-a72: bcm27xx/bcm2711, mvebu/cortexa72; aarch64_generic: rockchip, armsr, layerscape.
	{Name: "aarch64", GOARCH: "arm64", Machine: elf.EM_AARCH64, Class: elf.ELFCLASS64,
		OpenWrtArches:  []string{"aarch64_generic", "aarch64_cortex-a53", "aarch64_cortex-a72"},
		OpenWrtTargets: "rockchip, armsr, mediatek/filogic, qualcommax, bcm27xx, mvebu"},
	{Name: "arm", GOARCH: "arm", GOARM: "7", Machine: elf.EM_ARM, Class: elf.ELFCLASS32,
		OpenWrtArches: []string{"arm_cortex-a7_neon-vfpv4"}, OpenWrtTargets: "ipq40xx, sunxi/cortexa7, bcm27xx/bcm2709"},
	{Name: "mipsle", GOARCH: "mipsle", GOMIPS: "softfloat", Machine: elf.EM_MIPS, Class: elf.ELFCLASS32,
		OpenWrtArches: []string{"mipsel_24kc"}, OpenWrtTargets: "ramips/mt7621, ramips/mt76x8"},
}

// TargetByName finds a target by its short name or one of its OpenWrt arches.
func TargetByName(name string) (Target, bool) {
	for _, t := range Targets {
		if t.Name == name || t.GOARCH == name {
			return t, true
		}
		for _, a := range t.OpenWrtArches {
			if a == name {
				return t, true
			}
		}
	}
	return Target{}, false
}

// Env is the environment for `go build` of this target.
func (t Target) Env() []string {
	env := []string{"CGO_ENABLED=0", "GOOS=linux", "GOARCH=" + t.GOARCH}
	if t.GOARM != "" {
		env = append(env, "GOARM="+t.GOARM)
	}
	if t.GOMIPS != "" {
		env = append(env, "GOMIPS="+t.GOMIPS)
	}
	return env
}

// BuildTags are the Go build tags of the OpenWrt builds (the feed Makefile's
// full build; the router build adds RouterBuildTag). no_fake_tcp drops
// mihomo's faketcp transport (hysteria v1's "faketcp" protocol, raw packets via
// gopacket), -1.5 MB; every common outbound (ss, vmess, vless, trojan, socks5,
// http, hysteria2, tuic) stays. See docs/size.md for what was measured.
const BuildTags = "no_fake_tcp"

// Kernel modules the nftables backend needs on OpenWrt 22.03+ (fw4).
var Depends = []string{"kmod-nft-tproxy", "kmod-nft-socket"}

// Paths on the target, shared by the ipk, the feed Makefile and the init script.
const (
	BinPath    = "/usr/bin/tpgw"
	InitPath   = "/etc/init.d/tpgw"
	ConfigPath = "/etc/tpgw/config.yaml"
)

// Build is one `make openwrt` run.
type Build struct {
	RepoDir string    // module root
	OutDir  string    // where binaries and .ipk files go
	Version string    // tpgw version (main.version), e.g. v1.2.0 or a git describe
	Commit  string    // main.commit
	MTime   time.Time // every archive member's mtime
	Go      string    // go command, "go" if empty
	// Router is the router build's overlay (PrepareRouterBuild); nil builds
	// the full mihomo, as `make build` does.
	Router *RouterBuildFiles
}

// Result is what Build made for one target.
type Result struct {
	Target     Target
	Binary     string   // path of the stripped binary
	BinarySize int64    // bytes
	Packages   []string // .ipk paths, one per OpenWrt arch
	IPKSize    int64    // bytes of the first .ipk
}

// Run cross-compiles tpgw for target and writes its .ipk files.
func (b *Build) Run(t Target) (Result, error) {
	res := Result{Target: t}
	goCmd := b.Go
	if goCmd == "" {
		goCmd = "go"
	}
	binDir := filepath.Join(b.OutDir, "bin", t.Name)
	if err := os.MkdirAll(binDir, 0o755); err != nil {
		return res, err
	}
	res.Binary = filepath.Join(binDir, "tpgw")
	ldflags := fmt.Sprintf("-s -w -X main.version=%s -X main.commit=%s", b.Version, b.Commit)
	args := []string{"build", "-trimpath", "-tags", BuildTags}
	if b.Router != nil {
		args = append([]string{"build", "-trimpath"}, b.Router.BuildFlags()...)
	}
	args = append(args, "-ldflags", ldflags, "-o", res.Binary, "./cmd/tpgw")
	cmd := exec.Command(goCmd, args...)
	cmd.Dir = b.RepoDir
	cmd.Env = append(append(os.Environ(), "GOWORK=off"), t.Env()...)
	if out, err := cmd.CombinedOutput(); err != nil {
		return res, fmt.Errorf("go build for %s: %w\n%s", t.Name, err, out)
	}
	bin, err := os.ReadFile(res.Binary)
	if err != nil {
		return res, err
	}
	res.BinarySize = int64(len(bin))
	files, err := b.packageFiles(bin)
	if err != nil {
		return res, err
	}
	ctl, err := b.control()
	if err != nil {
		return res, err
	}
	for _, arch := range t.OpenWrtArches {
		c := ctl
		c.Architecture = arch
		p := &IPK{Control: c, Files: files, MTime: b.MTime}
		out := filepath.Join(b.OutDir, p.FileName())
		f, err := os.Create(out)
		if err != nil {
			return res, err
		}
		if err := p.Write(f); err != nil {
			f.Close()
			return res, fmt.Errorf("%s: %w", out, err)
		}
		if err := f.Close(); err != nil {
			return res, err
		}
		if res.IPKSize == 0 {
			st, err := os.Stat(out)
			if err != nil {
				return res, err
			}
			res.IPKSize = st.Size()
		}
		res.Packages = append(res.Packages, out)
	}
	return res, nil
}

// packageFiles are the data files of the package: the same set, paths and
// modes as Package/tpgw/install in openwrt/tpgw/Makefile.
func (b *Build) packageFiles(bin []byte) ([]File, error) {
	initScript, err := os.ReadFile(filepath.Join(b.RepoDir, "packaging/openwrt/tpgw/files/tpgw.init"))
	if err != nil {
		return nil, err
	}
	config, err := os.ReadFile(filepath.Join(b.RepoDir, "packaging/openwrt/tpgw/files/config.yaml"))
	if err != nil {
		return nil, err
	}
	return []File{
		{Path: BinPath, Mode: 0o755, Data: bin},
		{Path: InitPath, Mode: 0o755, Data: initScript},
		// 0600: the config holds proxy passwords.
		{Path: ConfigPath, Mode: 0o600, Data: config},
	}, nil
}

func (b *Build) control() (Control, error) {
	postinst, err := os.ReadFile(filepath.Join(b.RepoDir, "packaging/openwrt/ipk/postinst"))
	if err != nil {
		return Control{}, err
	}
	prerm, err := os.ReadFile(filepath.Join(b.RepoDir, "packaging/openwrt/ipk/prerm"))
	if err != nil {
		return Control{}, err
	}
	return Control{
		Package: "tpgw",
		Version: PackageVersion(b.Version),
		Depends: Depends,
		Section: "net",
		// tpgw links mihomo, which is GPL-3.0: the binary is distributed under it.
		License:    "GPL-3.0-only",
		Maintainer: "tpgw developers",
		URL:        "https://github.com/tpgw/tpgw",
		Description: "Transparent proxy gateway: TPROXY + embedded mihomo\n" +
			"tpgw turns the router into a transparent proxy gateway: LAN traffic is\n" +
			"diverted with nftables TPROXY rules it installs and removes itself, and\n" +
			"routed by mihomo rules (DIRECT, ss, vmess, vless, trojan, hysteria2, tuic...).",
		Conffiles: []string{ConfigPath},
		Postinst:  postinst,
		Prerm:     prerm,
	}, nil
}

var (
	versionJunk = regexp.MustCompile(`[^0-9A-Za-z.+~]+`)
	// git describe of a tree without tags: an abbreviated hash.
	bareHash = regexp.MustCompile(`^[0-9a-f]{7,40}(-dirty)?$`)
)

// PackageVersion turns a tpgw version (a tag like v1.2.0, or git describe
// output like v1.2.0-3-gabc1234-dirty or abc1234) into an opkg version
// "UPSTREAM-r1": digits first (opkg compares versions Debian-style), no '-'
// inside UPSTREAM (the last '-' starts the release, as in OpenWrt's
// PKG_VERSION-rPKG_RELEASE).
func PackageVersion(v string) string {
	v = strings.TrimPrefix(strings.TrimSpace(v), "v")
	up := strings.Trim(versionJunk.ReplaceAllString(v, "."), ".")
	if up == "" {
		up = "0.0.0"
	} else if bareHash.MatchString(v) || up[0] < '0' || up[0] > '9' {
		up = "0.0.0+git" + up
	}
	return up + "-r1"
}

// SizeReport is the table `make openwrt` ends with: the stripped binary and
// the .ipk size per target. router says whether they are router builds.
func SizeReport(results []Result, router bool) string {
	var b strings.Builder
	build, tags := "full build", BuildTags
	if router {
		build, tags = "router build, -overlay packaging/slim", RouterBuildTags
	}
	fmt.Fprintf(&b, "\nstripped binary size (%s; go build -trimpath -tags %s -ldflags \"-s -w\", CGO_ENABLED=0):\n", build, tags)
	fmt.Fprintf(&b, "  %-8s %-12s %-10s %s\n", "arch", "binary", "ipk", "OpenWrt arches")
	for _, r := range results {
		fmt.Fprintf(&b, "  %-8s %-12s %-10s %s\n", r.Target.Name, MB(r.BinarySize), MB(r.IPKSize),
			strings.Join(r.Target.OpenWrtArches, " "))
	}
	return b.String()
}

// MB formats a size in megabytes (10^6 bytes) with one decimal.
func MB(n int64) string { return fmt.Sprintf("%.1f MB", float64(n)/1e6) }
