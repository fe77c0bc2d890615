package overlay

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

// Mount is one overlay mount as listed in a mountinfo file, with its super
// options parsed and unescaped.
type Mount struct {
	// Mountpoint is where the overlay is mounted (as the mountinfo file shows it).
	Mountpoint string
	// Lowerdirs are the lower layers, uppermost first.
	Lowerdirs []string
	// Upperdir and Workdir are empty for a read-only overlay.
	Upperdir, Workdir string
	// Options are all super options; flags without a value map to "".
	// Options given several times (lowerdir+, datadir+) keep their last value here.
	Options map[string]string
	// Datadirs are data-only lower layers ("lowerdir=a::b" or datadir+=); they
	// only serve metacopy files.
	Datadirs []string
}

// FindMount returns the overlay mounted exactly at mountpoint according to the
// mountinfo file at mountinfoPath (e.g. /proc/self/mountinfo or
// /proc/<pid>/mountinfo). mountpoint is cleaned and, when it exists, resolved
// with filepath.EvalSymlinks. When several mounts are stacked on the same
// mount point the last one (the visible one) is used; it must be an overlay.
func FindMount(mountinfoPath, mountpoint string) (*Mount, error) {
	target := filepath.Clean(mountpoint)
	if resolved, err := filepath.EvalSymlinks(target); err == nil {
		target = resolved
	}
	f, err := os.Open(mountinfoPath)
	if err != nil {
		return nil, fmt.Errorf("find overlay at %s: %w", target, err)
	}
	defer f.Close()
	rec, err := lastMountAt(f, target)
	if err != nil {
		return nil, fmt.Errorf("find overlay at %s in %s: %w", target, mountinfoPath, err)
	}
	if rec == nil {
		return nil, fmt.Errorf("find overlay at %s: nothing is mounted there (per %s)", target, mountinfoPath)
	}
	if rec.fstype != "overlay" {
		return nil, fmt.Errorf("find overlay at %s: the mount there is %q, not overlay", target, rec.fstype)
	}
	m := parseSuperOptions(rec.superOpts)
	m.Mountpoint = rec.mountpoint
	return m, nil
}

// CheckCapturable returns an error when the upper dir of m cannot be captured
// faithfully on its own: a read-only overlay (no upperdir), metacopy=on
// (upper files may hold metadata only, their data living in a lower layer) or
// redirect_dir=on (renamed directories keep their content in a lower layer).
func (m *Mount) CheckCapturable() error {
	if m.Upperdir == "" {
		return fmt.Errorf("overlay at %s has no upperdir (read-only overlay): nothing to capture", m.Mountpoint)
	}
	if m.Options["metacopy"] == "on" {
		return fmt.Errorf("overlay at %s is mounted with metacopy=on: its upper files may be metadata-only, which a layer cannot carry; remount without metacopy", m.Mountpoint)
	}
	if m.Options["redirect_dir"] == "on" {
		return fmt.Errorf("overlay at %s is mounted with redirect_dir=on: renamed directories keep their content in a lower layer; remount without redirect_dir", m.Mountpoint)
	}
	return nil
}

// UserXattr reports whether the overlay keeps its metadata in "user.overlay.*"
// xattrs (mount option userxattr) instead of "trusted.overlay.*".
func (m *Mount) UserXattr() bool {
	_, ok := m.Options["userxattr"]
	return ok
}

// mountRecord is the part of one mountinfo line FindMount needs.
type mountRecord struct {
	mountpoint string
	fstype     string
	superOpts  string // still octal-escaped
}

// lastMountAt returns the last record of r whose mount point is target, or nil.
func lastMountAt(r io.Reader, target string) (*mountRecord, error) {
	var found *mountRecord
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		rec, err := parseMountinfoLine(sc.Text())
		if err != nil {
			return nil, err
		}
		if rec.mountpoint == target {
			found = rec
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	return found, nil
}

// parseMountinfoLine parses one line of proc(5) mountinfo:
// "id parent maj:min root mountpoint opts [optional...] - fstype source superopts".
func parseMountinfoLine(line string) (*mountRecord, error) {
	fields := strings.Fields(line)
	sep := -1
	for i := 6; i < len(fields); i++ {
		if fields[i] == "-" {
			sep = i
			break
		}
	}
	if len(fields) < 7 || sep < 0 || sep+2 >= len(fields) {
		return nil, fmt.Errorf("malformed mountinfo line %q", line)
	}
	rec := &mountRecord{
		mountpoint: unescapeOctal(fields[4]),
		fstype:     unescapeOctal(fields[sep+1]),
	}
	if sep+3 < len(fields) {
		rec.superOpts = fields[sep+3]
	}
	return rec, nil
}

// parseSuperOptions turns overlay's super options into a Mount (without Mountpoint).
func parseSuperOptions(opts string) *Mount {
	m := &Mount{Options: map[string]string{}}
	for _, opt := range strings.Split(opts, ",") {
		if opt == "" {
			continue
		}
		key, val, _ := strings.Cut(opt, "=")
		val = unescapeOctal(val)
		m.Options[key] = val
		switch key {
		case "lowerdir":
			lowers, data := splitLowerdir(val)
			m.Lowerdirs = append(m.Lowerdirs, lowers...)
			m.Datadirs = append(m.Datadirs, data...)
		case "lowerdir+":
			m.Lowerdirs = append(m.Lowerdirs, unescapeBackslash(val))
		case "datadir+":
			m.Datadirs = append(m.Datadirs, val)
		case "upperdir":
			m.Upperdir = unescapeBackslash(val)
		case "workdir":
			m.Workdir = unescapeBackslash(val)
		}
	}
	return m
}

// splitLowerdir splits a legacy lowerdir value on ':' not escaped by '\'.
// Layers after an empty element ("a::b") are data-only layers.
func splitLowerdir(val string) (lowers, data []string) {
	var parts []string
	var cur strings.Builder
	for i := 0; i < len(val); i++ {
		c := val[i]
		switch {
		case c == '\\' && i+1 < len(val):
			cur.WriteByte(c)
			cur.WriteByte(val[i+1])
			i++
		case c == ':':
			parts = append(parts, cur.String())
			cur.Reset()
		default:
			cur.WriteByte(c)
		}
	}
	parts = append(parts, cur.String())
	inData := false
	for _, p := range parts {
		if p == "" {
			inData = true
			continue
		}
		if inData {
			data = append(data, unescapeBackslash(p))
		} else {
			lowers = append(lowers, unescapeBackslash(p))
		}
	}
	return lowers, data
}

// unescapeBackslash undoes overlay's own path escaping: "\x" means "x".
func unescapeBackslash(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+1 < len(s) {
			i++
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// unescapeOctal undoes the kernel's mountinfo escaping ("\040" for a space).
func unescapeOctal(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) && isOctal(s[i+1]) && isOctal(s[i+2]) && isOctal(s[i+3]) {
			b.WriteByte((s[i+1]-'0')<<6 | (s[i+2]-'0')<<3 | (s[i+3] - '0'))
			i += 3
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isOctal(c byte) bool { return c >= '0' && c <= '7' }
