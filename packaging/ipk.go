package packaging

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"path"
	"sort"
	"strings"
	"time"
)

// File is one file of a package: an absolute path on the target, its mode and
// its content. Parent directories are added to the archive on their own.
type File struct {
	Path string // absolute, e.g. /usr/bin/tpgw
	Mode int64  // permission bits, e.g. 0o755
	Data []byte
}

// Control is the metadata opkg reads from control.tar.gz.
type Control struct {
	Package      string
	Version      string
	Architecture string // OpenWrt's name: x86_64, aarch64_generic, ...
	Depends      []string
	Section      string
	License      string
	Maintainer   string
	URL          string
	Description  string   // first line is the summary; further lines are indented
	Conffiles    []string // absolute paths kept on upgrade when changed by the user
	Postinst     []byte   // shell scripts, run by opkg after install / before removal
	Prerm        []byte
}

// IPK is a package to write: its metadata, its files and the mtime given to
// every archive member so that the same inputs give the same bytes.
type IPK struct {
	Control Control
	Files   []File
	MTime   time.Time
}

// FileName is the conventional name: tpgw_1.0.0-r1_x86_64.ipk.
func (p *IPK) FileName() string {
	return fmt.Sprintf("%s_%s_%s.ipk", p.Control.Package, p.Control.Version, p.Control.Architecture)
}

// Write writes the .ipk to w.
func (p *IPK) Write(w io.Writer) error {
	if err := p.validate(); err != nil {
		return err
	}
	dataTar, err := p.tarball(p.dataEntries())
	if err != nil {
		return fmt.Errorf("ipk: data.tar: %w", err)
	}
	// Installed-Size is the size of the uncompressed data tar, as ipkg-build
	// computes it (opkg only shows it; it does not check free space with it).
	control := p.controlFile(len(dataTar))
	ctrlEntries := []File{{Path: "/control", Mode: 0o644, Data: control}}
	if len(p.Control.Conffiles) > 0 {
		ctrlEntries = append(ctrlEntries, File{Path: "/conffiles", Mode: 0o644,
			Data: []byte(strings.Join(p.Control.Conffiles, "\n") + "\n")})
	}
	if p.Control.Postinst != nil {
		ctrlEntries = append(ctrlEntries, File{Path: "/postinst", Mode: 0o755, Data: p.Control.Postinst})
	}
	if p.Control.Prerm != nil {
		ctrlEntries = append(ctrlEntries, File{Path: "/prerm", Mode: 0o755, Data: p.Control.Prerm})
	}
	ctrlTar, err := p.tarball(withDirs(ctrlEntries))
	if err != nil {
		return fmt.Errorf("ipk: control.tar: %w", err)
	}
	dataGz, err := gz(dataTar)
	if err != nil {
		return err
	}
	ctrlGz, err := gz(ctrlTar)
	if err != nil {
		return err
	}
	// The outer archive: the order is ipkg-build's; opkg looks members up by name.
	outer, err := p.tarball([]entry{
		{name: "./debian-binary", mode: 0o644, data: []byte("2.0\n")},
		{name: "./data.tar.gz", mode: 0o644, data: dataGz},
		{name: "./control.tar.gz", mode: 0o644, data: ctrlGz},
	})
	if err != nil {
		return fmt.Errorf("ipk: outer tar: %w", err)
	}
	outerGz, err := gz(outer)
	if err != nil {
		return err
	}
	_, err = w.Write(outerGz)
	return err
}

func (p *IPK) validate() error {
	c := p.Control
	for name, v := range map[string]string{"Package": c.Package, "Version": c.Version,
		"Architecture": c.Architecture, "Description": c.Description} {
		if v == "" {
			return fmt.Errorf("ipk: control field %s is empty", name)
		}
	}
	for _, f := range p.Files {
		if !strings.HasPrefix(f.Path, "/") || path.Clean(f.Path) != f.Path {
			return fmt.Errorf("ipk: file path %q: want a clean absolute path", f.Path)
		}
		// opkg's tar reader knows ustar names (100 bytes + 155 prefix) and
		// GNU long names; stay well inside the plain header.
		if len(f.Path) > 90 {
			return fmt.Errorf("ipk: file path %q: longer than 90 bytes", f.Path)
		}
	}
	for _, cf := range c.Conffiles {
		found := false
		for _, f := range p.Files {
			found = found || f.Path == cf
		}
		if !found {
			return fmt.Errorf("ipk: conffile %s is not one of the package's files", cf)
		}
	}
	return nil
}

// controlFile renders the control file in the field order OpenWrt's SDK uses.
func (p *IPK) controlFile(installedSize int) []byte {
	c := p.Control
	var b strings.Builder
	field := func(k, v string) {
		if v != "" {
			fmt.Fprintf(&b, "%s: %s\n", k, v)
		}
	}
	field("Package", c.Package)
	field("Version", c.Version)
	field("Depends", strings.Join(c.Depends, ", "))
	field("License", c.License)
	field("Section", c.Section)
	field("URL", c.URL)
	field("Maintainer", c.Maintainer)
	field("Architecture", c.Architecture)
	field("Installed-Size", fmt.Sprint(installedSize))
	lines := strings.Split(strings.TrimRight(c.Description, "\n"), "\n")
	fmt.Fprintf(&b, "Description: %s\n", lines[0])
	for _, l := range lines[1:] {
		if strings.TrimSpace(l) == "" {
			l = "." // an empty continuation line is written as " ."
		}
		fmt.Fprintf(&b, " %s\n", l)
	}
	return []byte(b.String())
}

// entry is one tar member, directories included ("./usr/").
type entry struct {
	name string
	mode int64
	dir  bool
	data []byte
}

func (p *IPK) dataEntries() []entry { return withDirs(p.Files) }

// withDirs turns files into tar entries named "./usr/bin/tpgw", preceded by
// "./" and each parent directory (0755), sorted by name like tar --sort=name.
func withDirs(files []File) []entry {
	dirs := map[string]bool{"./": true}
	var out []entry
	for _, f := range files {
		for d := path.Dir(f.Path); d != "/"; d = path.Dir(d) {
			dirs["."+d+"/"] = true
		}
		out = append(out, entry{name: "." + f.Path, mode: f.Mode, data: f.Data})
	}
	for d := range dirs {
		out = append(out, entry{name: d, mode: 0o755, dir: true})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

// tarball writes entries as a GNU tar, owned by root (0:0), with one mtime.
func (p *IPK) tarball(entries []entry) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	mtime := p.MTime.UTC().Truncate(time.Second)
	for _, e := range entries {
		h := &tar.Header{
			Name:    e.name,
			Mode:    e.mode,
			ModTime: mtime,
			Uname:   "root",
			Gname:   "root",
			Format:  tar.FormatGNU,
		}
		if e.dir {
			h.Typeflag = tar.TypeDir
		} else {
			h.Typeflag = tar.TypeReg
			h.Size = int64(len(e.data))
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, fmt.Errorf("%s: %w", e.name, err)
		}
		if _, err := tw.Write(e.data); err != nil {
			return nil, fmt.Errorf("%s: %w", e.name, err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// gz compresses b with a fixed header (no name, mtime 0), like gzip -n.
func gz(b []byte) ([]byte, error) {
	var buf bytes.Buffer
	zw, err := gzip.NewWriterLevel(&buf, gzip.BestCompression)
	if err != nil {
		return nil, err
	}
	if _, err := zw.Write(b); err != nil {
		return nil, fmt.Errorf("ipk: gzip: %w", err)
	}
	if err := zw.Close(); err != nil {
		return nil, fmt.Errorf("ipk: gzip: %w", err)
	}
	return buf.Bytes(), nil
}
