package testenv

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Mount is one line of /proc/self/mountinfo.
type Mount struct {
	Mountpoint   string
	FSType       string
	Source       string
	Options      string // per-mount options
	SuperOptions string // per-superblock options (overlay dirs live here)
}

// Mounts parses /proc/self/mountinfo.
func Mounts() ([]Mount, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("open mountinfo: %w", err)
	}
	defer f.Close()
	var out []Mount
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		m, err := parseMountinfoLine(sc.Text())
		if err != nil {
			return nil, err
		}
		out = append(out, m)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	return out, nil
}

// parseMountinfoLine parses "id parent maj:min root mountpoint opts [optional...] - fstype source superopts".
func parseMountinfoLine(line string) (Mount, error) {
	fields := strings.Split(line, " ")
	sep := -1
	for i := 6; i < len(fields); i++ {
		if fields[i] == "-" {
			sep = i
			break
		}
	}
	if sep < 0 || sep+2 >= len(fields) {
		return Mount{}, fmt.Errorf("malformed mountinfo line %q", line)
	}
	m := Mount{
		Mountpoint: unescapeMountinfo(fields[4]),
		Options:    fields[5],
		FSType:     fields[sep+1],
		Source:     unescapeMountinfo(fields[sep+2]),
	}
	if sep+3 < len(fields) {
		m.SuperOptions = unescapeMountinfo(fields[sep+3])
	}
	return m, nil
}

// unescapeMountinfo decodes the kernel's \ooo octal escapes.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// MountsUnder returns the mountpoints equal to dir or below it, in
// /proc/self/mountinfo order.
func MountsUnder(dir string) ([]string, error) {
	dir, err := canonicalDir(dir)
	if err != nil {
		return nil, err
	}
	all, err := Mounts()
	if err != nil {
		return nil, err
	}
	var out []string
	for _, m := range all {
		if isUnder(m.Mountpoint, dir) {
			out = append(out, m.Mountpoint)
		}
	}
	return out, nil
}

// canonicalDir cleans dir and resolves symlinks when it still exists.
func canonicalDir(dir string) (string, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", fmt.Errorf("abs %s: %w", dir, err)
	}
	if real, err := filepath.EvalSymlinks(abs); err == nil {
		return real, nil
	}
	return abs, nil
}

func isUnder(p, dir string) bool {
	return p == dir || strings.HasPrefix(p, dir+"/")
}

// Overlay describes an overlay mount.
type Overlay struct {
	Mountpoint string
	Lower      []string // top-most first
	Upper      string
	Work       string
	Options    []string // all superblock options
}

// OverlayAt returns the overlay mounted at mountpoint (the last mount there).
func OverlayAt(mountpoint string) (*Overlay, error) {
	mp, err := canonicalDir(mountpoint)
	if err != nil {
		return nil, err
	}
	all, err := Mounts()
	if err != nil {
		return nil, err
	}
	var found *Mount
	for i := range all {
		if all[i].Mountpoint == mp {
			found = &all[i]
		}
	}
	if found == nil {
		return nil, fmt.Errorf("nothing mounted at %s", mp)
	}
	if found.FSType != "overlay" {
		return nil, fmt.Errorf("%s is %s, not overlay", mp, found.FSType)
	}
	return parseOverlay(mp, found.SuperOptions), nil
}

func parseOverlay(mp, superOpts string) *Overlay {
	o := &Overlay{Mountpoint: mp, Options: strings.Split(superOpts, ",")}
	for _, opt := range o.Options {
		k, v, _ := strings.Cut(opt, "=")
		switch k {
		case "lowerdir":
			o.Lower = append(o.Lower, strings.Split(v, ":")...)
		case "lowerdir+":
			o.Lower = append(o.Lower, v)
		case "upperdir":
			o.Upper = v
		case "workdir":
			o.Work = v
		}
	}
	return o
}

// unmountUnder unmounts everything at or below dir, deepest first, falling
// back to a lazy unmount. It loops because mounts can be stacked.
func unmountUnder(dir string) error {
	var lastErr error
	for round := 0; round < 8; round++ {
		mps, err := MountsUnder(dir)
		if err != nil {
			return err
		}
		if len(mps) == 0 {
			return nil
		}
		sort.SliceStable(mps, func(i, j int) bool {
			return strings.Count(mps[i], "/") > strings.Count(mps[j], "/")
		})
		for _, mp := range mps {
			if err := unix.Unmount(mp, 0); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
				if err2 := unix.Unmount(mp, unix.MNT_DETACH); err2 != nil {
					lastErr = fmt.Errorf("unmount %s: %w (lazy: %v)", mp, err, err2)
				}
			}
		}
	}
	mps, err := MountsUnder(dir)
	if err != nil {
		return err
	}
	if len(mps) > 0 {
		return fmt.Errorf("still mounted under %s: %v (last error: %v)", dir, mps, lastErr)
	}
	return nil
}
