package overlay

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// DefaultMaxRounds is the default bound on the extra pre-copy rounds.
const DefaultMaxRounds = 3

// PrecopyOptions tune StartPrecopy.
type PrecopyOptions struct {
	CaptureOptions // UserXattr, Exclude: as for Capture
	// MaxRounds bounds the extra rounds that re-copy the dirty set while it
	// keeps shrinking: 0 means DefaultMaxRounds, negative means none.
	MaxRounds int
	// Mountpoint is the overlay's merged mount point in this mount namespace
	// (Mount.Mountpoint). Finish uses it to tie files that the frozen tasks
	// map shared+writable to upper paths. When empty it is looked up in
	// /proc/self/mountinfo by upper dir; when that fails too, every shared
	// writable mapping of an overlay file that cannot be confirmed by its
	// upper inode makes Finish re-copy everything.
	Mountpoint string
	// DisableTracking skips fanotify: Finish then always does a full
	// metadata rescan (Fallback). For tests and comparisons.
	DisableTracking bool
}

// PrecopyStats describes the pre-copy done by StartPrecopy.
type PrecopyStats struct {
	Duration   time.Duration // wall time of StartPrecopy
	Rounds     int           // extra rounds run on the dirty set after the full copy
	RoundDirty []int         // dirty paths handled by each extra round
	Entries    int           // objects recorded
	Files      int           // data files written (rewrites counted again)
	Bytes      int64         // bytes copied (rewrites counted again)
	// DataCopy is "reflink" (FICLONE), "copy" (copy_file_range or
	// read/write; the former may reflink on XFS/btrfs), "mixed", or "" when
	// no data was copied.
	DataCopy string
	// Events counts the fanotify events read so far (the whole filesystem's).
	Events int
	// Tracking says dirty tracking runs; TrackingError says why not.
	Tracking      bool
	TrackingError string
}

// Precopy is a capture of an upper dir made while the container runs, kept
// up to date by fanotify dirty tracking until Recapture completes it at a
// frozen instant. Its methods must not be called concurrently.
//
// Order of use: StartPrecopy (container running) → optionally SyncFS →
// freeze → Recapture(pids) → thaw → Seal → Close. Finish is Recapture+Seal
// in one call (all of it then inside the pause).
//
// What keeps the result equal to a Capture of the frozen instant:
//   - every name with an event since it was last copied is re-read as it
//     is now (events are not replayed), together with its directory;
//   - a directory name with a create/delete/move event is re-walked (overlay
//     copy-ups, opaque dirs and renames bring content without events, and
//     inode numbers are reused, so "same inode" proves nothing);
//   - all names of an inode share its metadata and data file: re-reading one
//     updates the others; a name that loses its inode dirties another name;
//     writes reported under an unlinked name (overlay reports hardlink writes
//     under the name first looked up) reach the live names; inodes with links
//     outside the recorded names (overlay's shared whiteout in the workdir,
//     names in excluded dirs) are re-checked by stat in every pass;
//   - files the frozen tasks map shared+writable are always re-copied
//     (stores through a mapping raise no event);
//   - queue overflow, tracker failure or tracking off: full metadata rescan
//     compared with the records (Fallback); a mapping of the overlay that
//     cannot be tied to an upper path: the rescan re-copies every file.
type Precopy struct {
	opts     PrecopyOptions
	upperDir string // as given: the manifest's Upper
	snapDir  string
	dataDir  string

	upperFd   int
	upperPath string // real path of the upper dir
	upperDev  uint64
	exclude   map[string]bool

	mountFd    int      // merged mount point (O_PATH), -1 when unknown
	mountPaths []string // spellings of the merged mount point
	ovlDev     uint64   // the overlay's device, 0 when unknown

	store   *store
	maps    mapsReader
	mapped  map[mappedFile][]string // upper paths confirmed for mapped files (scanMappings)
	held    map[string]*heldFile    // mapped files kept open from Prepare to the pause
	walker  walker
	copier  copier
	tracker *tracker // nil when tracking is off
	trackOK string   // why tracking is off or broken ("" when fine)
	forced  map[string]bool

	stats          PrecopyStats
	reflinked      int
	copiedData     int
	recaptureTried bool
	recaptured     bool // Recapture succeeded
	sealed         bool
	closed         bool

	beforeOpen func(rel string) // tests: runs before the full copy opens a directory
}

// StartPrecopy starts dirty tracking on the upper dir's filesystem, copies
// the whole upper dir (metadata and file data) into snapDir while the
// container runs, then re-copies the dirty set while it keeps shrinking (at
// most MaxRounds times). It returns once the pre-copy has converged; the
// tracking goes on until Recapture (or Finish) or Close.
//
// If fanotify is unavailable (permissions, kernel, filesystem), the pre-copy
// still happens and Finish falls back to a full metadata rescan.
// The walk is as safe as Capture's: fd-relative, no symlink followed, no fifo
// or device opened, never leaving the upper's filesystem.
func StartPrecopy(ctx context.Context, upperDir, snapDir string, opts PrecopyOptions) (*Precopy, error) {
	return startPrecopy(ctx, upperDir, snapDir, opts, nil)
}

// startPrecopy is StartPrecopy with a hook to adjust the Precopy (tests).
func startPrecopy(ctx context.Context, upperDir, snapDir string, opts PrecopyOptions, tune func(*Precopy)) (*Precopy, error) {
	start := time.Now()
	p, err := openPrecopy(upperDir, snapDir, opts)
	if err != nil {
		return nil, err
	}
	if tune != nil {
		tune(p)
	}
	if err := p.precopy(ctx); err != nil {
		p.Close()
		return nil, err
	}
	p.stats.Duration = time.Since(start)
	return p, nil
}

// openPrecopy checks the arguments, opens the directories and starts tracking.
func openPrecopy(upperDir, snapDir string, opts PrecopyOptions) (*Precopy, error) {
	exclude, err := checkCaptureOptions(opts.CaptureOptions)
	if err != nil {
		return nil, fmt.Errorf("pre-copy: %w", err)
	}
	up, dataDir, err := prepareDirs(upperDir, snapDir)
	if err != nil {
		return nil, fmt.Errorf("pre-copy: %w", err)
	}
	p := &Precopy{opts: opts, upperDir: upperDir, snapDir: snapDir, dataDir: dataDir, exclude: exclude, upperFd: -1, mountFd: -1}
	if err := p.openUpper(up); err != nil {
		p.Close()
		return nil, err
	}
	if err := p.openMount(); err != nil {
		p.Close()
		return nil, err
	}
	p.startTracking()
	return p, nil
}

// checkCaptureOptions validates the options and the privileges they need,
// and returns the exclude set.
func checkCaptureOptions(opts CaptureOptions) (map[string]bool, error) {
	exclude, err := validateExcludes(opts.Exclude)
	if err != nil {
		return nil, err
	}
	if !opts.UserXattr {
		if err := requireCapSysAdmin(); err != nil {
			return nil, err
		}
	}
	return exclude, nil
}

// openUpper opens the upper dir and sets up the walker and the store.
func (p *Precopy) openUpper(up string) error {
	fd, err := unix.Open(up, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("pre-copy: open upper dir %s: %w", p.upperDir, err)
	}
	p.upperFd = fd
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("pre-copy: stat upper dir: %w", err)
	}
	if p.upperPath, err = os.Readlink("/proc/self/fd/" + strconv.Itoa(fd)); err != nil {
		return fmt.Errorf("pre-copy: locate upper dir: %w", err)
	}
	p.upperDev = uint64(st.Dev)
	p.walker = walker{dev: p.upperDev, exclude: p.exclude, direntBuf: make([]byte, 32*1024)}
	p.store = newStore(st.Ino)
	return nil
}

// openMount opens the merged mount point (given or found by upper dir).
func (p *Precopy) openMount() error {
	mp := p.opts.Mountpoint
	if mp == "" {
		found, err := overlayForUpper("/proc/self/mountinfo", p.upperPath)
		if err != nil || found == "" {
			return nil // unknown: Finish is conservative with mappings
		}
		mp = found
	}
	fd, err := unix.Open(mp, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("pre-copy: open overlay mount point %s: %w", mp, err)
	}
	p.mountFd = fd
	var fs unix.Statfs_t
	var st unix.Stat_t
	if err := unix.Fstatfs(fd, &fs); err != nil {
		return fmt.Errorf("pre-copy: statfs %s: %w", mp, err)
	}
	if fs.Type != unix.OVERLAYFS_SUPER_MAGIC {
		return fmt.Errorf("pre-copy: %s is not an overlay mount point", mp)
	}
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("pre-copy: stat %s: %w", mp, err)
	}
	p.ovlDev = uint64(st.Dev)
	p.mountPaths = []string{filepath.Clean(mp)}
	if real, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd)); err == nil && real != p.mountPaths[0] {
		p.mountPaths = append(p.mountPaths, real)
	}
	return nil
}

// startTracking starts fanotify unless disabled; a failure only means Finish
// will rescan.
func (p *Precopy) startTracking() {
	if p.opts.DisableTracking {
		p.trackOK = "dirty tracking disabled"
		return
	}
	t, err := startTracker(p.upperFd, p.upperPath, p.upperDev)
	if err != nil {
		p.trackOK = "dirty tracking unavailable: " + err.Error()
		return
	}
	p.tracker = t
}

// precopy copies everything, then converges on the dirty set.
func (p *Precopy) precopy(ctx context.Context) error {
	if err := p.fullCopy(ctx); err != nil {
		return err
	}
	prev := -1
	for round := 0; round < p.maxRounds(); round++ {
		if p.tracker == nil || p.trackOK != "" {
			return nil
		}
		n := p.tracker.pending() + len(p.forced)
		if n == 0 || (prev >= 0 && n >= prev) {
			return nil
		}
		handled, err := p.round(ctx)
		if err != nil {
			return err
		}
		p.stats.Rounds++
		p.stats.RoundDirty = append(p.stats.RoundDirty, handled)
		prev = n
	}
	return nil
}

func (p *Precopy) maxRounds() int {
	switch {
	case p.opts.MaxRounds < 0:
		return 0
	case p.opts.MaxRounds == 0:
		return DefaultMaxRounds
	}
	return p.opts.MaxRounds
}

// fullCopy walks and copies the whole upper dir while it may change.
func (p *Precopy) fullCopy(ctx context.Context) error {
	ps := p.newPass(false)
	defer ps.close()
	w := p.walker
	w.onError = ps.retryLater
	w.beforeOpen = p.beforeOpen
	if err := walk(ctx, p.upperFd, &w, ps.record); err != nil {
		return fmt.Errorf("pre-copy %s: %w", p.upperDir, err)
	}
	if err := ps.run(ctx); err != nil {
		return fmt.Errorf("pre-copy %s: %w", p.upperDir, err)
	}
	p.endPass(ps)
	return nil
}

// round re-copies the dirty set collected so far, while the container runs.
func (p *Precopy) round(ctx context.Context) (int, error) {
	dirty := p.tracker.take()
	ps := p.newPass(false)
	defer ps.close()
	if err := ps.addDirty(dirty); err != nil {
		if errors.Is(err, errUntrusted) {
			p.trackOK = err.Error()
			return 0, nil
		}
		return 0, err
	}
	for rel, recursive := range p.forced {
		ps.add(rel, recursive)
	}
	ps.addExternal()
	if err := ps.run(ctx); err != nil {
		return 0, fmt.Errorf("pre-copy %s: %w", p.upperDir, err)
	}
	p.endPass(ps)
	return ps.stats.Paths, nil
}

// endPass keeps a running pass's retries and counts its work.
func (p *Precopy) endPass(ps *pass) {
	p.forced = ps.retry
	p.stats.Files += ps.stats.Files
	p.stats.Bytes += ps.stats.Bytes
	p.reflinked += ps.stats.Reflinked
	p.copiedData += ps.stats.Copied
}

// Stats describes the pre-copy so far.
func (p *Precopy) Stats() PrecopyStats {
	s := p.stats
	s.Entries = len(p.store.records)
	s.DataCopy = dataCopyKind(p.reflinked, p.copiedData)
	s.Tracking = p.tracker != nil && p.trackOK == ""
	s.TrackingError = p.trackOK
	if p.tracker != nil {
		reason, events := p.tracker.status()
		s.Events = events
		if s.TrackingError == "" {
			s.TrackingError = reason
		}
	}
	return s
}

func dataCopyKind(reflinked, copied int) string {
	switch {
	case reflinked > 0 && copied > 0:
		return "mixed"
	case reflinked > 0:
		return "reflink"
	case copied > 0:
		return "copy"
	}
	return ""
}

// Close stops dirty tracking and releases every descriptor. It keeps what
// was written to snapDir. Safe after Finish, on error paths, and twice.
func (p *Precopy) Close() error {
	if p.closed {
		return nil
	}
	p.closed = true
	p.releaseHeld()
	p.maps.release()
	var errs []error
	if p.tracker != nil {
		errs = append(errs, p.tracker.close())
	}
	for _, fd := range []*int{&p.upperFd, &p.mountFd} {
		if *fd >= 0 {
			if err := unix.Close(*fd); err != nil {
				errs = append(errs, fmt.Errorf("pre-copy: close: %w", err))
			}
			*fd = -1
		}
	}
	return errors.Join(errs...)
}

// SyncFS flushes the filesystem holding dir (e.g. the upper dir) to disk.
// Call it after StartPrecopy and before freezing when the staging copy may
// use reflinks: FICLONE of a file with dirty pages writes them back first,
// which must not happen inside the pause.
func SyncFS(dir string) error {
	if err := syncFS(dir); err != nil {
		return fmt.Errorf("syncfs %s: %w", dir, err)
	}
	return nil
}

// excludedPath reports whether rel or one of its ancestors is excluded.
func (p *Precopy) excludedPath(rel string) (string, bool) {
	for d := rel; d != ""; d = parentPath(d) {
		if p.exclude[d] {
			return d, true
		}
	}
	return "", false
}

func (p *Precopy) checkOverlayXattrs(e *Entry) error {
	return checkOverlayXattrs(e, p.opts.UserXattr)
}

// overlayForUpper returns the mount point of the overlay whose upperdir is
// upper according to a mountinfo file, or "" when there is none.
func overlayForUpper(mountinfoPath, upper string) (string, error) {
	f, err := os.Open(mountinfoPath)
	if err != nil {
		return "", err
	}
	defer f.Close()
	found := ""
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		rec, err := parseMountinfoLine(sc.Text())
		if err != nil || rec.fstype != "overlay" {
			continue
		}
		if parseSuperOptions(rec.superOpts).Upperdir == upper {
			found = rec.mountpoint
		}
	}
	return found, sc.Err()
}
