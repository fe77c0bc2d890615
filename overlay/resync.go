package overlay

import (
	"context"
	"errors"
	"fmt"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Errors after which Finish falls back to a full rescan.
var (
	// errChanged marks a resync that found the upper dir changing under it.
	errChanged = errors.New("changed while being captured (is the container frozen?)")
	// errUntrusted marks a dirty set that cannot be relied on.
	errUntrusted = errors.New("dirty tracker failed")
)

// pass re-captures a set of paths into the pre-copy's store. While the
// container runs (frozen false) a failure caused by a concurrent change puts
// the path in retry for the next pass; while frozen every failure is an
// error, as in Capture.
type pass struct {
	p      *Precopy
	frozen bool
	queue  map[string]bool // paths still to resync -> recursively
	dirty  map[string]bool // every path queued in this pass
	done   map[string]bool // paths resynced in this pass
	walked map[string]bool // directories re-walked recursively in this pass
	copied map[uint64]bool // inodes whose data was copied in this pass
	dirs   map[string]dirFd
	retry  map[string]bool // running only: paths to resync again (recursively)
	// plainBelow: files smaller than this are copied with read and write
	// (copyData); set for the frozen pass and Prepare's.
	plainBelow int64
	stats      passStats
}

// dirFd is an open directory of the upper dir and its inode.
type dirFd struct {
	fd  int
	ino uint64
}

// passStats counts the work of one pass.
type passStats struct {
	Paths     int   // dirty paths looked at
	Synced    int   // entries (re)recorded, subtree entries included
	Files     int   // data files (re)written
	Bytes     int64 // bytes copied
	Reflinked int
	Copied    int
}

func (p *Precopy) newPass(frozen bool) *pass {
	ps := &pass{
		p: p, frozen: frozen,
		queue: map[string]bool{}, dirty: map[string]bool{}, done: map[string]bool{}, walked: map[string]bool{},
		copied: map[uint64]bool{}, dirs: map[string]dirFd{}, retry: map[string]bool{},
	}
	if frozen {
		ps.plainBelow = pausePlainCopy
	}
	return ps
}

// close releases the directories opened by the pass.
func (ps *pass) close() {
	for rel, d := range ps.dirs {
		if rel != "" {
			unix.Close(d.fd)
		}
	}
	ps.dirs = nil
}

// add queues a path (recursive wins over non-recursive).
func (ps *pass) add(rel string, recursive bool) {
	if rel == "" || !validRelPath(rel) {
		return
	}
	ps.queue[rel] = ps.queue[rel] || recursive
	ps.dirty[rel] = true
}

// dirReplaced are the events after which whatever directory is at a name is
// re-walked: it may be a new one (overlay copy-up, opaque dir, rename, rm -rf
// then mkdir) whose content produced no events we can attribute to it.
// Inode numbers are reused at once (ext4), so "same inode" cannot tell.
const dirReplaced = unix.FAN_CREATE | unix.FAN_MOVED_TO | unix.FAN_DELETE | unix.FAN_MOVED_FROM

// addDirty queues the paths named by the dirty directories. A name is dirty
// with its directory (whose mtime, nlink or xattrs changed with it); a
// directory name with a dirReplaced event is resynced recursively.
func (ps *pass) addDirty(dirty []dirtyDir) error {
	for _, d := range dirty {
		loc, ok, err := ps.locateDirty(d)
		if err != nil {
			return err
		}
		if !ok {
			continue
		}
		if _, excluded := ps.p.excludedPath(loc.rel); excluded {
			continue
		}
		for name, mask := range d.names {
			if name == "." {
				ps.add(loc.rel, false)
				continue
			}
			if name == ".." || strings.ContainsRune(name, '/') {
				continue
			}
			ps.add(joinRel(loc.rel, name), mask&unix.FAN_ONDIR != 0 && mask&dirReplaced != 0)
			ps.add(loc.rel, false)
		}
	}
	return nil
}

// addExternal queues one name of each inode linked from outside the
// recorded names (see store.external) whose link count or ctime moved: such
// changes raise no event naming a recorded path. One stat per such inode,
// usually only the overlay's shared whiteout.
func (ps *pass) addExternal() {
	st := ps.p.store
	for ino := range st.external {
		rel, ok := st.anyName(ino)
		if !ok || ps.dirty[rel] {
			continue
		}
		r := st.records[rel]
		dir, err := ps.openDir(parentPath(rel))
		var now unix.Stat_t
		if err == nil {
			err = unix.Fstatat(dir.fd, path.Base(rel), &now, unix.AT_SYMLINK_NOFOLLOW)
		}
		if err != nil || now.Ino != ino || uint32(now.Nlink) != r.Nlink || now.Ctim.Nano() != r.ctimeNS {
			ps.add(rel, false)
		}
	}
}

// locateDirty returns where a dirty directory is now, verified by inode: its
// cached location if still right, else its handle resolved afresh. ok is
// false for a directory that is gone or left the upper dir (its parent's
// event covers it). When frozen, a directory not found where its handle says
// means someone outside the frozen tasks changes the upper dir: errChanged.
func (ps *pass) locateDirty(d dirtyDir) (dirLocation, bool, error) {
	if d.loc.ino != 0 {
		if fd, err := ps.openDir(d.loc.rel); err == nil && fd.ino == d.loc.ino {
			return d.loc, true, nil
		}
	}
	loc, ok, err := ps.p.tracker.relocate(d.handle)
	if err != nil {
		return loc, false, fmt.Errorf("%w: %v", errUntrusted, err)
	}
	if !ok {
		return loc, false, nil
	}
	if fd, err := ps.openDir(loc.rel); err == nil && fd.ino == loc.ino {
		return loc, true, nil
	}
	if ps.frozen {
		return loc, false, fmt.Errorf("dirty dir %s: %w", displayPath(loc.rel), errChanged)
	}
	return loc, false, nil // it moved again: its rename event is pending
}

// run resyncs the queue, parents first, until hardlink expansion adds nothing.
func (ps *pass) run(ctx context.Context) error {
	for len(ps.queue) > 0 {
		batch := make([]string, 0, len(ps.queue))
		for rel := range ps.queue {
			batch = append(batch, rel)
		}
		sort.Strings(batch)
		recursive := ps.queue
		ps.queue = map[string]bool{}
		for _, rel := range batch {
			if err := ctx.Err(); err != nil {
				return err
			}
			if err := ps.sync(ctx, rel, recursive[rel]); err != nil {
				return err
			}
		}
	}
	return nil
}

// sync makes the record of rel (and, when recursive or for a directory not
// recorded as this inode, its whole subtree) equal to the upper dir's
// current state.
func (ps *pass) sync(ctx context.Context, rel string, recursive bool) error {
	if ps.done[rel] || ps.underWalked(rel) {
		return nil
	}
	if _, excluded := ps.p.excludedPath(rel); excluded {
		return nil
	}
	ps.done[rel] = true
	ps.stats.Paths++
	parent, name := parentPath(rel), path.Base(rel)
	dir, err := ps.openDir(parent)
	if gone(err) {
		ps.vanish(rel)
		return nil
	}
	if err != nil {
		return ps.failed(rel, err)
	}
	ps.expandTomb(dir.ino, name)
	e, st, fd, err := ps.p.walker.readEntry(dir.fd, name, rel)
	if errors.Is(err, unix.ENOENT) {
		ps.vanish(rel)
		return nil
	}
	if err != nil {
		return ps.failed(rel, err)
	}
	old := ps.p.store.records[rel]
	if old != nil && old.Inode != e.Inode {
		ps.expandLinks(old.Inode, rel)
	}
	if fd < 0 {
		if old != nil && old.Type == TypeDir {
			ps.removeTree(rel)
		}
		return ps.record(dir.fd, name, e, st)
	}
	defer unix.Close(fd)
	if !recursive && old != nil && old.Type == TypeDir && old.Inode == e.Inode {
		return ps.record(dir.fd, name, e, st)
	}
	return ps.rewalk(ctx, dir.fd, fd, name, e, st)
}

// rewalk replaces the records of the directory rel and its subtree.
func (ps *pass) rewalk(ctx context.Context, parentFd, fd int, name string, e *Entry, st *unix.Stat_t) error {
	rel := e.Path
	ps.removeTree(rel)
	ps.walked[rel] = true
	if err := ps.record(parentFd, name, e, st); err != nil {
		return err
	}
	w := ps.p.walker
	if !ps.frozen {
		w.onError = ps.retryLater
	}
	return w.walkDir(ctx, fd, rel, ps.record)
}

// record is the walkFunc of a pass: it stages a regular file's data (once
// per inode per pass), records the entry and dirties the inode's other names.
func (ps *pass) record(dirfd int, name string, e *Entry, st *unix.Stat_t) error {
	if err := ps.p.checkOverlayXattrs(e); err != nil {
		return err
	}
	statNS := time.Now().UnixNano()
	if e.Type == TypeFile && e.Size > 0 {
		if err := ps.stage(dirfd, name, e); err != nil {
			return err
		}
	}
	r := &record{Entry: *e, ctimeNS: st.Ctim.Nano(), statNS: statNS}
	ps.p.store.put(r)
	ps.done[e.Path] = true
	ps.stats.Synced++
	ps.propagate(r)
	return nil
}

// propagate copies a fresh record to the inode's other names: every field but
// the path belongs to the inode. Names that are dirty themselves are left to
// their own resync (the name may now be another inode).
func (ps *pass) propagate(r *record) {
	names := ps.p.store.names(r.Inode)
	if len(names) < 2 {
		return
	}
	for other := range names {
		if ps.done[other] || ps.dirty[other] {
			continue
		}
		cp := *r
		cp.Path = other
		ps.p.store.put(&cp)
		ps.done[other] = true
		ps.stats.Synced++
	}
}

// stage copies a regular file's content into its inode's data file (rewritten
// in place) unless this pass already did, and sets e.Data.
func (ps *pass) stage(dirfd int, name string, e *Entry) error {
	st := ps.p.store
	if ps.copied[e.Inode] {
		e.Data = st.dataOf[e.Inode]
		return nil
	}
	data := st.dataFile(e.Inode)
	res, err := ps.p.copier.copyData(dirfd, name, filepath.Join(ps.p.dataDir, data), ps.plainBelow)
	if err == nil && (res.Ino != e.Inode || res.Size != e.Size) {
		err = errChanged
	}
	if err != nil {
		if stagingError(err) {
			return fmt.Errorf("pre-copy %s: %w", e.Path, err)
		}
		if ps.frozen {
			return fmt.Errorf("capture %s: %w", e.Path, err)
		}
		ps.retry[e.Path] = false // keep the entry; its data is redone next pass
	}
	e.Data = data
	ps.copied[e.Inode] = true
	ps.stats.Files++
	ps.stats.Bytes += res.Size
	if res.Reflinked {
		ps.stats.Reflinked++
	} else {
		ps.stats.Copied++
	}
	return nil
}

// expandLinks queues one other recorded name of ino (whose nlink and ctime
// changed with rel); its resync propagates to the remaining names.
func (ps *pass) expandLinks(ino uint64, rel string) {
	for other := range ps.p.store.names(ino) {
		if other != rel && !ps.done[other] && !ps.dirty[other] {
			ps.add(other, false)
			return
		}
	}
}

// expandTomb dirties the names of inodes once linked at name in the directory dirIno.
func (ps *pass) expandTomb(dirIno uint64, name string) {
	for ino := range ps.p.store.tombs[tombKey{dirIno: dirIno, name: name}] {
		ps.expandLinks(ino, "")
	}
}

// vanish forgets rel and its subtree.
func (ps *pass) vanish(rel string) {
	if ps.p.store.records[rel] != nil {
		ps.stats.Synced++
	}
	ps.removeTree(rel)
}

// removeTree forgets rel and its subtree, dirtying the other names of every
// inode that loses a name.
func (ps *pass) removeTree(rel string) {
	var removed []*record
	ps.p.store.removeTree(rel, func(r *record) { removed = append(removed, r) })
	for _, r := range removed {
		ps.expandLinks(r.Inode, r.Path)
	}
}

// failed handles an error on rel: fatal when frozen, a retry when running.
func (ps *pass) failed(rel string, err error) error {
	if ps.frozen {
		return err
	}
	return ps.retryLater(rel, err)
}

// retryLater is the walker's onError while running: anything but a staging
// failure is assumed to come from a concurrent change and retried next pass.
func (ps *pass) retryLater(rel string, err error) error {
	if stagingError(err) || errors.Is(err, errNotCapturable) {
		return err
	}
	ps.retry[rel] = true
	return nil
}

// underWalked reports whether an ancestor of rel was re-walked in this pass.
func (ps *pass) underWalked(rel string) bool {
	for d := parentPath(rel); d != ""; d = parentPath(d) {
		if ps.walked[d] {
			return true
		}
	}
	return false
}

// openDir opens the upper dir's directory rel (cached for the pass).
func (ps *pass) openDir(rel string) (dirFd, error) {
	if d, ok := ps.dirs[rel]; ok {
		return d, nil
	}
	fd := ps.p.upperFd
	if rel != "" {
		var err error
		fd, err = openat2(ps.p.upperFd, rel, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC)
		if err != nil {
			return dirFd{}, fmt.Errorf("open dir %s: %w", rel, err)
		}
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		if rel != "" {
			unix.Close(fd)
		}
		return dirFd{}, fmt.Errorf("stat dir %s: %w", displayPath(rel), err)
	}
	d := dirFd{fd: fd, ino: st.Ino}
	ps.dirs[rel] = d
	return d, nil
}

// gone reports errors meaning "this path no longer exists as a directory".
func gone(err error) bool {
	return errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ELOOP)
}

// stagingError reports failures of the staging filesystem, which no retry cures.
func stagingError(err error) bool {
	return errors.Is(err, unix.ENOSPC) || errors.Is(err, unix.EDQUOT) || errors.Is(err, unix.EIO) ||
		errors.Is(err, unix.EROFS) || errors.Is(err, unix.EMFILE) || errors.Is(err, unix.ENFILE)
}
