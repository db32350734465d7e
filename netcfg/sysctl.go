package netcfg

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// sysctlStateFile, in the state directory, holds the values our sysctls had
// before we changed them. The kernel cannot tell old values, so after a crash
// this file is the only way back.
const sysctlStateFile = "netcfg-sysctl.json"

// sysctlChange is one sysctl we changed: Old is restored on removal.
type sysctlChange struct {
	Key string `json:"key"`
	Old string `json:"old"`
	New string `json:"new"`
}

type sysctlState struct {
	Changes []sysctlChange `json:"changes"`
}

func sysctlPath(key string) string { return Sysctl{Key: key}.path() }

func readSysctl(key string) (string, error) {
	b, err := os.ReadFile(sysctlPath(key))
	if err != nil {
		return "", fmt.Errorf("netcfg: read sysctl %s: %w", key, err)
	}
	return strings.TrimSpace(string(b)), nil
}

func writeSysctl(key, value string) error {
	if err := os.WriteFile(sysctlPath(key), []byte(value+"\n"), 0o644); err != nil {
		return fmt.Errorf("netcfg: write sysctl %s=%s: %w", key, value, err)
	}
	return nil
}

// saveSysctlState writes the record atomically (temp file, fsync, rename) so a
// crash leaves either no record or a whole one.
func saveSysctlState(dir string, changes []sysctlChange) error {
	if dir == "" {
		return nil
	}
	b, err := json.MarshalIndent(sysctlState{Changes: changes}, "", "  ")
	if err != nil {
		return fmt.Errorf("netcfg: encode sysctl record: %w", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("netcfg: create state dir: %w", err)
	}
	tmp, err := os.CreateTemp(dir, sysctlStateFile+".*")
	if err != nil {
		return fmt.Errorf("netcfg: write sysctl record: %w", err)
	}
	_, err = tmp.Write(append(b, '\n'))
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), filepath.Join(dir, sysctlStateFile))
	}
	if err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("netcfg: write sysctl record: %w", err)
	}
	return nil
}

func removeSysctlState(dir string) error {
	if dir == "" {
		return nil
	}
	if err := os.Remove(filepath.Join(dir, sysctlStateFile)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("netcfg: remove sysctl record: %w", err)
	}
	return nil
}

// loadSysctlState returns the recorded changes, or none when there is no record.
func loadSysctlState(dir string) ([]sysctlChange, error) {
	if dir == "" {
		return nil, nil
	}
	b, err := os.ReadFile(filepath.Join(dir, sysctlStateFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("netcfg: read sysctl record: %w", err)
	}
	var st sysctlState
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("netcfg: parse sysctl record %s: %w", filepath.Join(dir, sysctlStateFile), err)
	}
	for _, c := range st.Changes {
		// The key becomes a path under /proc/sys: refuse anything that could leave it.
		if !strings.HasPrefix(c.Key, "net.") || strings.ContainsAny(c.Key, "/\x00") || strings.Contains(c.Key, "..") {
			return nil, fmt.Errorf("netcfg: sysctl record %s: bad key %q", filepath.Join(dir, sysctlStateFile), c.Key)
		}
	}
	return st.Changes, nil
}

// restoreSysctls writes back the old values, last change first. A key that
// is gone (br_netfilter unloaded since, say) has nothing left to restore: the
// module brings its own default back when it loads again. Counting it as an
// error would keep the record, and with it fail every later start.
func restoreSysctls(changes []sysctlChange) error {
	var errs []error
	for i := len(changes) - 1; i >= 0; i-- {
		if err := writeSysctl(changes[i].Key, changes[i].Old); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// applySysctls records then writes the plan's sysctls that differ from the
// current value. It returns what it changed, also on error, for the undo.
func applySysctls(dir string, want []Sysctl) ([]sysctlChange, error) {
	want = keepRAs(want)
	var changes []sysctlChange
	for _, s := range want {
		old, err := readSysctl(s.Key)
		if s.IfPresent && errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, err
		}
		if old != s.Value {
			changes = append(changes, sysctlChange{Key: s.Key, Old: old, New: s.Value})
		}
	}
	if len(changes) == 0 {
		return nil, nil
	}
	if err := saveSysctlState(dir, changes); err != nil {
		return nil, err
	}
	for i, c := range changes {
		if err := writeSysctl(c.Key, c.New); err != nil {
			return changes[:i], err
		}
	}
	return changes, nil
}

// keepRAs adds accept_ra=2 for the interfaces that take Router
// Advertisements (accept_ra 1, the default) when want turns IPv6 forwarding
// on: the kernel then ignores RAs where accept_ra is 1, so a host that takes
// its IPv6 default route from them (the kernel's SLAAC, as ifupdown's
// "inet6 auto") would lose it when its lifetime runs out, and IPv6 with it,
// for itself and the LAN. 2 takes them while forwarding. They are restored
// with the rest.
func keepRAs(want []Sysctl) []Sysctl {
	const fwd = "net.ipv6.conf.all.forwarding"
	if !slices.ContainsFunc(want, func(s Sysctl) bool { return s.Key == fwd && s.Value == "1" }) {
		return want
	}
	if cur, err := readSysctl(fwd); err != nil || cur == "1" {
		return want // already forwarding: RAs are as the host has them
	}
	entries, err := os.ReadDir("/proc/sys/net/ipv6/conf")
	if err != nil {
		return want
	}
	out := slices.Clone(want)
	for _, e := range entries {
		name := e.Name()
		if name == "all" || name == "default" || name == "lo" {
			continue
		}
		key := "net.ipv6.conf." + strings.ReplaceAll(name, ".", "/") + ".accept_ra"
		if v, err := readSysctl(key); err == nil && v == "1" {
			out = append(out, Sysctl{Key: key, Value: "2", IfPresent: true})
		}
	}
	return out
}
