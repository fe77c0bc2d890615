package overlay

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// racyWindow: a file whose ctime is this close to (or after) the moment it
// was staged may have changed again within the same timestamp tick; a
// metadata rescan re-copies it rather than trusting equal timestamps.
const racyWindow = 50 * time.Millisecond

// FinishStats times and sizes the in-pause part of a pre-copied capture.
type FinishStats struct {
	Drain     time.Duration // read the tracker's queue to EAGAIN and take the dirty set
	MmapScan  time.Duration // /proc/<pid>/maps of the frozen tasks
	Recapture time.Duration // re-capture of the dirty set (or the fallback rescan)
	Seal      time.Duration // Finish only: manifest built, synced and written
	// DirtyEntries counts the paths re-captured: dirty names, their
	// directories, other names of changed hardlinked inodes, mapped files.
	// In a fallback: entries whose data had to be copied again.
	DirtyEntries int
	MappedFiles  int   // upper files mapped shared+writable by the frozen tasks
	MappedHeld   int   // of those, re-copied through descriptors held since Prepare
	Files        int   // data files rewritten
	Bytes        int64 // bytes copied
	// Fallback says the dirty set could not be trusted and a full metadata
	// rescan (compare with the pre-copy's records) was done; FallbackReason
	// says why (tracking off or broken, queue overflow, an unresolved mapping).
	Fallback       bool
	FallbackReason string
	Events         int // fanotify events read since StartPrecopy
}

// Finish completes the capture at the current frozen instant: Recapture,
// then Seal; every task of the container must be frozen while it runs. The
// manifest equals what Capture would produce now (data file names aside).
// To keep the pause short call Recapture, thaw, then Seal instead: Seal
// writes the manifest and syncs the staging filesystem, which can take long
// and no longer needs the container frozen.
func (p *Precopy) Finish(ctx context.Context, pids []int) (*Manifest, FinishStats, error) {
	fs, err := p.Recapture(ctx, pids)
	if err != nil {
		return nil, fs, err
	}
	start := time.Now()
	m, err := p.Seal(ctx)
	fs.Seal = time.Since(start)
	return m, fs, err
}

// Prepare readies the pause while the container still runs; call it right
// before freezing. It re-copies what changed since the pre-copy returned
// (so that little is left dirty for the pause), scans the given processes'
// maps once, as Recapture will, and re-copies the files they map shared and
// writable, so that the code, the caches and the kernel's data the pause
// touches are warm when it begins. Recapture still drains and scans
// everything; only the upper paths confirmed for mapped files are reused
// when no name changed meanwhile, and the mapped files and the processes'
// maps files stay open for it (closed by Seal or Close, after the thaw).
//
// After Prepare, events wait in the kernel until Recapture reads them (a
// queue overflow meanwhile makes it rescan): freeze soon.
func (p *Precopy) Prepare(ctx context.Context, pids []int) error {
	if p.closed || p.recaptureTried {
		return errors.New("pre-copy: Prepare after Close or Recapture")
	}
	if p.tracker != nil && p.trackOK == "" && p.tracker.pending()+len(p.forced) > 0 {
		if _, err := p.round(ctx); err != nil {
			return err
		}
	}
	// From here on events wait in the kernel's queue for the pause's drain:
	// the reader goroutine, which holds the tracker's lock while it reads,
	// must not be mid-read when the frozen thread needs that lock.
	defer p.stopReader()
	p.maps.hold(pids)
	p.maps.enableHeld(pids)
	scan, err := p.scanMappings(pids, false)
	if err != nil {
		return fmt.Errorf("prepare capture: %w", err)
	}
	if len(scan.paths) == 0 {
		p.releaseHeld()
		return nil
	}
	// The pause re-copies mapped files whatever happens; copying them now
	// too leaves their staged pages and the copy path warm.
	ps := p.newPass(false)
	ps.plainBelow = pausePlainCopy // as the pause will copy them
	defer ps.close()
	for rel := range scan.paths {
		ps.add(rel, false)
	}
	if err := ps.run(ctx); err != nil {
		return fmt.Errorf("prepare capture %s: %w", p.upperDir, err)
	}
	p.endPass(ps)
	p.holdMapped(scan.paths)
	return nil
}

// stopReader stops the tracker's reader goroutine (see Prepare).
func (p *Precopy) stopReader() {
	if p.tracker != nil {
		p.tracker.stopReader()
	}
}

// Recapture brings the staged copy to the frozen instant; every task of the
// container must be frozen. It drains the tracker's queue (non-blocking: all
// events of completed syscalls are already queued), adds the files the given
// processes (the cgroup's, e.g. cgroup.procs) map shared and writable, and
// re-captures exactly that dirty set, data and metadata. When the set cannot
// be trusted it falls back to a full metadata rescan compared with the
// pre-copy's records. Afterwards the upper dir is no longer read: thaw, then
// Seal.
func (p *Precopy) Recapture(ctx context.Context, pids []int) (fs FinishStats, err error) {
	if p.closed || p.recaptureTried {
		return fs, errors.New("pre-copy: Recapture after Close or a previous Recapture")
	}
	p.recaptureTried = true
	defer func() { p.recaptured = err == nil }()
	if err := ctx.Err(); err != nil {
		return fs, err
	}
	start := time.Now()
	dirty, reason := p.drain(&fs)
	fs.Drain = time.Since(start)

	start = time.Now()
	// With no event since Prepare's scan, no name changed: the upper paths
	// it confirmed for mapped files still hold. Its maps files serve if no
	// process joined since.
	p.maps.enableHeld(pids)
	scan, err := p.scanMappings(pids, reason == "" && len(dirty) == 0)
	fs.MmapScan = time.Since(start)
	if err != nil {
		return fs, fmt.Errorf("finish capture: %w", err)
	}
	fs.MappedFiles = len(scan.paths)

	start = time.Now()
	defer func() { fs.Recapture = time.Since(start) }()
	if scan.unresolved != "" {
		return fs, p.fallback(ctx, &fs, "shared writable mapping not found in the upper dir: "+scan.unresolved, scan.paths, true)
	}
	if reason != "" {
		return fs, p.fallback(ctx, &fs, reason, scan.paths, false)
	}
	err = p.recaptureDirty(ctx, dirty, scan.paths, &fs)
	if errors.Is(err, errChanged) || errors.Is(err, errUntrusted) {
		return fs, p.fallback(ctx, &fs, err.Error(), scan.paths, false)
	}
	return fs, err
}

// drain stops the tracker and returns the located dirty set, or why the
// dirty set cannot be trusted.
func (p *Precopy) drain(fs *FinishStats) ([]dirtyDir, string) {
	if p.tracker == nil {
		return nil, p.trackOK
	}
	dirty := p.tracker.drainAndTake()
	p.tracker.signalStop() // the reader ends on its own; Close waits for it
	reason, events := p.tracker.status()
	fs.Events = events
	if p.trackOK != "" {
		return nil, p.trackOK
	}
	return dirty, reason
}

// recaptureDirty re-captures the dirty set (frozen).
func (p *Precopy) recaptureDirty(ctx context.Context, dirty []dirtyDir, mapped map[string]bool, fs *FinishStats) error {
	ps := p.newPass(true)
	defer ps.close()
	defer func() { p.countFinish(ps, fs) }()
	if err := ps.addDirty(dirty); err != nil {
		return err
	}
	for rel, recursive := range p.forced {
		ps.add(rel, recursive)
	}
	var held []string
	for rel := range mapped {
		if p.held[rel] != nil {
			held = append(held, rel) // after the dirty set, unless in it
			continue
		}
		ps.add(rel, false)
	}
	ps.addExternal()
	if err := ps.run(ctx); err != nil {
		return fmt.Errorf("finish capture %s: %w", p.upperDir, err)
	}
	// A mapped file that the dirty set did not reach still has the name and
	// status it was held with: copy its data again through the held files.
	for _, rel := range held {
		if ps.dirty[rel] || ps.done[rel] || ps.underWalked(rel) {
			continue
		}
		ok, err := p.recopyHeld(rel, fs)
		if err != nil {
			return fmt.Errorf("finish capture %s: %w", p.upperDir, err)
		}
		if !ok {
			ps.add(rel, false)
		}
	}
	if err := ps.run(ctx); err != nil {
		return fmt.Errorf("finish capture %s: %w", p.upperDir, err)
	}
	p.forced = nil
	return nil
}

// fallback records why and rescans.
func (p *Precopy) fallback(ctx context.Context, fs *FinishStats, reason string, mapped map[string]bool, copyAll bool) error {
	fs.Fallback, fs.FallbackReason = true, reason
	if err := p.rescan(ctx, mapped, copyAll, fs); err != nil {
		return fmt.Errorf("finish capture %s (full rescan: %s): %w", p.upperDir, reason, err)
	}
	return nil
}

// rescan walks the whole (frozen) upper dir, records every entry afresh and
// re-copies the data of files that are new, mapped, retried, or whose inode,
// size, mtime or ctime differ from the pre-copy's record (or whose ctime is
// too close to when they were staged to be trusted). copyAll re-copies
// every file.
func (p *Precopy) rescan(ctx context.Context, mapped map[string]bool, copyAll bool, fs *FinishStats) error {
	ps := p.newPass(true)
	defer ps.close()
	defer func() { p.countFinish(ps, fs) }()
	seen := make(map[string]bool, len(p.store.records))
	fn := func(dirfd int, name string, e *Entry, st *unix.Stat_t) error {
		seen[e.Path] = true
		old := p.store.records[e.Path]
		if e.Type == TypeFile && e.Size > 0 && (copyAll || mapped[e.Path] || p.forced[e.Path] || !stagedDataValid(old, e, st)) {
			ps.stats.Paths++
			return ps.record(dirfd, name, e, st)
		}
		if err := p.checkOverlayXattrs(e); err != nil {
			return err
		}
		r := &record{Entry: *e, ctimeNS: st.Ctim.Nano(), statNS: time.Now().UnixNano()}
		if e.Type == TypeFile && e.Size > 0 {
			r.Data, r.statNS = old.Data, old.statNS
		}
		p.store.put(r)
		return nil
	}
	w := p.walker
	if err := walk(ctx, p.upperFd, &w, fn); err != nil {
		return err
	}
	var gone []string
	for rel := range p.store.records {
		if !seen[rel] {
			gone = append(gone, rel)
		}
	}
	for _, rel := range gone {
		p.store.remove(rel)
	}
	p.forced = nil
	return nil
}

// stagedDataValid reports whether old's staged data still is the content of
// the file described by e and st (same inode, size, mtime and ctime, and the
// ctime safely older than the staging).
func stagedDataValid(old *record, e *Entry, st *unix.Stat_t) bool {
	return old != nil && old.Type == TypeFile && old.Data != "" &&
		old.Inode == e.Inode && old.Size == e.Size && old.MtimeNS == e.MtimeNS &&
		old.ctimeNS == st.Ctim.Nano() && old.ctimeNS < old.statNS-racyWindow.Nanoseconds()
}

// countFinish adds a frozen pass's work to fs.
func (p *Precopy) countFinish(ps *pass, fs *FinishStats) {
	fs.DirtyEntries += ps.stats.Paths
	fs.Files += ps.stats.Files
	fs.Bytes += ps.stats.Bytes
	p.reflinked += ps.stats.Reflinked
	p.copiedData += ps.stats.Copied
}

// Seal writes snapDir/manifest.json (atomically and durably, same format as
// Capture's) from the state Recapture fixed, removes staged data files no
// entry uses, and returns the manifest. It does not read the upper dir: call
// it after the thaw.
func (p *Precopy) Seal(ctx context.Context) (*Manifest, error) {
	// Closed here, after the thaw, rather than in the pause.
	p.releaseHeld()
	p.maps.release()
	if !p.recaptured || p.sealed || p.closed {
		return nil, errors.New("pre-copy: Seal needs one successful Recapture first (and no Seal or Close since)")
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	p.sealed = true
	m := &Manifest{Version: ManifestVersion, Upper: p.upperDir, UserXattr: p.opts.UserXattr, Entries: p.store.entries()}
	if len(m.Entries) == 0 {
		m.Entries = nil // as Capture records an empty upper dir
	}
	for _, d := range p.store.unused(m.Entries) {
		if err := os.Remove(filepath.Join(p.dataDir, d)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("seal capture: remove unused data file: %w", err)
		}
	}
	if err := sealManifest(m, p.dataDir, p.snapDir); err != nil {
		return nil, fmt.Errorf("seal capture: %w", err)
	}
	return m, nil
}
