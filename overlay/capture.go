package overlay

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seamless-snapshot/seamless/snapshot"
)

// CaptureOptions tune Capture.
type CaptureOptions struct {
	// UserXattr says the overlay keeps its metadata in "user.overlay.*"
	// (mount option userxattr, see Mount.UserXattr) instead of "trusted.overlay.*".
	UserXattr bool
	// Exclude lists upper-relative, clean, slash-separated paths ("var/log")
	// skipped together with their subtree.
	Exclude []string
}

// CaptureStats summarises a capture.
type CaptureStats struct {
	Entries   int           // objects recorded
	Files     int           // regular-file entries (hardlinked names counted each)
	Bytes     int64         // bytes of data copied (once per inode)
	Reflinked int           // data files made with FICLONE
	Copied    int           // data files copied (copy_file_range or read/write; the former may reflink on XFS/btrfs)
	Duration  time.Duration // wall time of the whole capture
}

// Capture records the upper dir upperDir into the existing directory snapDir:
// every object's metadata goes to snapDir/manifest.json (written atomically),
// every regular file's content to snapDir/data/<n> (one data file per inode;
// empty files get none). Afterwards nothing needs to read upperDir again.
//
// The upper dir is walked fd-relatively, never following a symlink or leaving
// the upper's filesystem, and fifos and device nodes are never opened. The
// caller must keep the upper dir still (container frozen) during Capture:
// any change seen while capturing is reported as an error. Capture refuses
// metacopy and redirect entries (their data lives in a lower layer).
func Capture(ctx context.Context, upperDir, snapDir string, opts CaptureOptions) (*Manifest, CaptureStats, error) {
	return newCapturer(opts).run(ctx, upperDir, snapDir)
}

// capturer holds the state of one Capture.
type capturer struct {
	opts    CaptureOptions
	walker  walker
	copier  copier
	dataDir string
	entries []Entry
	byInode map[uint64]string // inode -> data file name, for hardlinks
	nextID  int
	stats   CaptureStats
	// beforeCopy, when set (tests only), runs just before a file's data is opened.
	beforeCopy func(rel string)
}

func newCapturer(opts CaptureOptions) *capturer {
	return &capturer{opts: opts, byInode: map[uint64]string{}}
}

// run performs the capture.
func (c *capturer) run(ctx context.Context, upperDir, snapDir string) (*Manifest, CaptureStats, error) {
	start := time.Now()
	if err := ctx.Err(); err != nil {
		return nil, c.stats, err
	}
	exclude, err := validateExcludes(c.opts.Exclude)
	if err != nil {
		return nil, c.stats, err
	}
	c.walker.exclude = exclude
	if !c.opts.UserXattr {
		if err := requireCapSysAdmin(); err != nil {
			return nil, c.stats, err
		}
	}
	upper, err := c.prepare(upperDir, snapDir)
	if err != nil {
		return nil, c.stats, err
	}
	root, err := unix.Open(upper, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, c.stats, fmt.Errorf("capture: open upper dir %s: %w", upperDir, err)
	}
	defer unix.Close(root)
	if err := walk(ctx, root, &c.walker, c.record); err != nil {
		return nil, c.stats, err
	}
	m := c.manifest(upperDir)
	if err := c.seal(m, snapDir); err != nil {
		return nil, c.stats, err
	}
	c.stats.Entries = len(m.Entries)
	c.stats.Duration = time.Since(start)
	return m, c.stats, nil
}

// prepare checks the directories, creates snapDir/data and returns the
// resolved upper dir.
func (c *capturer) prepare(upperDir, snapDir string) (string, error) {
	up, dataDir, err := prepareDirs(upperDir, snapDir)
	if err != nil {
		return "", fmt.Errorf("capture: %w", err)
	}
	c.dataDir = dataDir
	return up, nil
}

// prepareDirs checks the upper and snapshot dirs, creates snapDir/data and
// returns the resolved upper dir and the data dir.
func prepareDirs(upperDir, snapDir string) (up, dataDir string, err error) {
	if up, err = filepath.EvalSymlinks(upperDir); err != nil {
		return "", "", fmt.Errorf("upper dir: %w", err)
	}
	snap, err := filepath.EvalSymlinks(snapDir)
	if err != nil {
		return "", "", fmt.Errorf("snapshot dir: %w", err)
	}
	if within(snap, up) || within(up, snap) {
		return "", "", fmt.Errorf("snapshot dir %s and upper dir %s must not contain each other", snapDir, upperDir)
	}
	dataDir = filepath.Join(snap, snapshot.DataDir)
	if err := os.Mkdir(dataDir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return "", "", fmt.Errorf("create data dir: %w", err)
	}
	return up, dataDir, nil
}

// record is the walkFunc of Capture: it checks an entry, copies a regular
// file's data and keeps the entry.
func (c *capturer) record(dirfd int, name string, e *Entry, _ *unix.Stat_t) error {
	if err := c.checkOverlayXattrs(e); err != nil {
		return err
	}
	if e.Type == TypeFile {
		c.stats.Files++
		if err := c.captureData(dirfd, name, e); err != nil {
			return err
		}
	}
	c.entries = append(c.entries, *e)
	return nil
}

// checkOverlayXattrs applies the package rule with the capture's xattr prefix.
func (c *capturer) checkOverlayXattrs(e *Entry) error {
	return checkOverlayXattrs(e, c.opts.UserXattr)
}

// errNotCapturable marks entries no capture can record (see checkOverlayXattrs).
var errNotCapturable = errors.New("not supported")

// checkOverlayXattrs refuses entries whose content is not in the upper dir.
func checkOverlayXattrs(e *Entry, userXattr bool) error {
	prefix := overlayPrefix(userXattr)
	if _, ok := e.Xattrs[prefix+"metacopy"]; ok {
		return fmt.Errorf("capture %s: metacopy file (its data is in a lower layer): %w", e.Path, errNotCapturable)
	}
	if _, ok := e.Xattrs[prefix+"redirect"]; ok {
		return fmt.Errorf("capture %s: redirected entry (its content is in a lower layer): %w", e.Path, errNotCapturable)
	}
	return nil
}

// captureData copies a regular file's content once per inode and sets e.Data.
func (c *capturer) captureData(dirfd int, name string, e *Entry) error {
	if e.Size == 0 {
		return nil
	}
	if data, ok := c.byInode[e.Inode]; ok {
		e.Data = data
		return nil
	}
	if c.beforeCopy != nil {
		c.beforeCopy(e.Path)
	}
	c.nextID++
	data := strconv.Itoa(c.nextID)
	res, err := c.copier.copyData(dirfd, name, filepath.Join(c.dataDir, data), 0)
	if err != nil {
		return fmt.Errorf("capture %s: %w", e.Path, err)
	}
	if res.Ino != e.Inode || res.Size != e.Size {
		return fmt.Errorf("capture %s: changed while being captured (is the container frozen?)", e.Path)
	}
	e.Data = data
	c.byInode[e.Inode] = data
	c.stats.Bytes += res.Size
	if res.Reflinked {
		c.stats.Reflinked++
	} else {
		c.stats.Copied++
	}
	return nil
}

// manifest returns the sorted manifest of the recorded entries.
func (c *capturer) manifest(upperDir string) *Manifest {
	sort.Slice(c.entries, func(i, j int) bool { return c.entries[i].Path < c.entries[j].Path })
	return &Manifest{Version: ManifestVersion, Upper: upperDir, UserXattr: c.opts.UserXattr, Entries: c.entries}
}

// seal makes the data durable, then writes the manifest atomically.
func (c *capturer) seal(m *Manifest, snapDir string) error {
	if err := sealManifest(m, c.dataDir, snapDir); err != nil {
		return fmt.Errorf("capture: %w", err)
	}
	return nil
}

// sealManifest syncs the data dir's filesystem, then writes
// snapDir/manifest.json atomically and durably.
func sealManifest(m *Manifest, dataDir, snapDir string) error {
	if err := syncFS(dataDir); err != nil {
		return fmt.Errorf("sync data: %w", err)
	}
	b, err := json.Marshal(m)
	if err != nil {
		return fmt.Errorf("encode manifest: %w", err)
	}
	if err := snapshot.WriteFileAtomic(filepath.Join(snapDir, snapshot.ManifestFile), append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("write manifest: %w", err)
	}
	if err := syncDir(snapDir); err != nil {
		return fmt.Errorf("sync snapshot dir: %w", err)
	}
	return nil
}

// LoadManifest reads snapDir/manifest.json.
func LoadManifest(snapDir string) (*Manifest, error) {
	p := filepath.Join(snapDir, snapshot.ManifestFile)
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, fmt.Errorf("load manifest: %w", err)
	}
	var m Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("load manifest %s: %w", p, err)
	}
	if m.Version != ManifestVersion {
		return nil, fmt.Errorf("load manifest %s: version %d, want %d", p, m.Version, ManifestVersion)
	}
	return &m, nil
}

// validateExcludes checks exclude paths and returns them as a set.
func validateExcludes(paths []string) (map[string]bool, error) {
	set := make(map[string]bool, len(paths))
	for _, p := range paths {
		if !validRelPath(p) {
			return nil, fmt.Errorf("capture: invalid exclude path %q: want a clean relative path without \"..\" (e.g. \"var/log\")", p)
		}
		set[p] = true
	}
	return set, nil
}

// validRelPath reports whether p is a clean, relative, slash-separated path
// naming something strictly below its root.
func validRelPath(p string) bool {
	return p != "" && p != "." && !strings.ContainsRune(p, 0) && !path.IsAbs(p) &&
		path.Clean(p) == p && p != ".." && !strings.HasPrefix(p, "../")
}

// within reports whether p is dir or below it (both cleaned, absolute).
func within(p, dir string) bool {
	rel, err := filepath.Rel(dir, p)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../")
}

// overlayPrefix is the xattr prefix overlayfs uses for its own metadata.
func overlayPrefix(userXattr bool) string {
	if userXattr {
		return "user.overlay."
	}
	return "trusted.overlay."
}

// requireCapSysAdmin fails unless this process can read trusted.* xattrs:
// without CAP_SYS_ADMIN they are silently hidden, and opaque dirs would be lost.
func requireCapSysAdmin() error {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return fmt.Errorf("capture: read capabilities: %w", err)
	}
	if data[0].Effective&(1<<unix.CAP_SYS_ADMIN) == 0 {
		return errors.New("capture: CAP_SYS_ADMIN is needed to read the overlay's trusted.overlay.* xattrs (opaque dirs)")
	}
	return nil
}

func syncFS(dir string) error {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return unix.Syncfs(fd)
}

func syncDir(dir string) error {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return unix.Fsync(fd)
}
