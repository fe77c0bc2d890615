package shim

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime/debug"
	"strings"
	"text/template"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"golang.org/x/sys/unix"

	"github.com/seamless-snapshot/seamless/freezer"
	"github.com/seamless-snapshot/seamless/overlay"
	"github.com/seamless-snapshot/seamless/snapshot"
	"github.com/seamless-snapshot/seamless/uploader"
)

// ErrBusy is returned while another snapshot of the same container is being captured.
var ErrBusy = errors.New("a snapshot of this container is already being captured; try again when it is done")

// RequestError is a request that cannot be served as asked; nothing was changed.
type RequestError struct{ Err error }

func (e *RequestError) Error() string { return e.Err.Error() }
func (e *RequestError) Unwrap() error { return e.Err }

func badRequest(format string, args ...any) error {
	return &RequestError{Err: fmt.Errorf(format, args...)}
}

// validateRequest checks a request before anything is touched.
func validateRequest(req *snapshot.Request) error {
	req.Target = strings.TrimSpace(req.Target)
	if req.Target == "" {
		return badRequest("no target reference")
	}
	if _, err := name.ParseReference(req.Target); err != nil {
		return badRequest("invalid target reference %q: %v", req.Target, err)
	}
	switch req.Compression {
	case "":
		req.Compression = "gzip"
	case "gzip", "zstd":
	default:
		return badRequest("unsupported compression %q (supported: gzip, zstd)", req.Compression)
	}
	return nil
}

// Snapshot captures the container's upper dir at one frozen instant and starts
// the detached uploader. It returns once the capture is sealed.
func (s *Shim) Snapshot(ctx context.Context, req snapshot.Request) (*snapshot.State, error) {
	if err := validateRequest(&req); err != nil {
		return nil, err
	}
	if !s.busy.TryLock() {
		return nil, ErrBusy
	}
	defer s.busy.Unlock()

	base, err := s.baseImage(ctx, req)
	if err != nil {
		return nil, err
	}
	mnt, err := s.overlayMount()
	if err != nil {
		return nil, err
	}
	id, err := snapshot.NewID(time.Now())
	if err != nil {
		return nil, err
	}
	dir, err := s.store.Create(id)
	if err != nil {
		return nil, err
	}
	st := &snapshot.State{
		ID: id, Container: s.cfg.ContainerID, Target: req.Target, Request: req,
		Base: base, Phase: snapshot.PhaseCapturing,
	}
	if err := s.store.Save(st); err != nil {
		return nil, err
	}
	if err := s.capture(ctx, st, mnt, dir); err != nil {
		return s.fail(st, err)
	}
	if err := s.startUploader(st); err != nil {
		return s.fail(st, err)
	}
	s.logf("snapshot %s of %s: pause %dµs (freeze %dµs, capture %dµs, thaw %dµs), %d entries, %d bytes",
		st.ID, st.Container, st.PauseUS, st.Pause.FreezeUS, st.Pause.CaptureUS, st.Pause.ThawUS, st.Entries, st.Bytes)
	return st, nil
}

// capture pre-copies the upper dir while the container runs, then freezes
// it, re-captures what changed meanwhile, thaws, and seals the capture. The
// thaw happens on every path out of the frozen section.
func (s *Shim) capture(ctx context.Context, st *snapshot.State, mnt *overlay.Mount, dir string) error {
	fr, err := freezer.FromCgroupPaths(s.cfg.CgroupPaths, freezer.Kind(s.cfg.Freezer))
	if err != nil {
		return fmt.Errorf("freezer of %s: %w", s.cfg.ContainerID, err)
	}
	defer fr.Close()
	st.Freezer = string(fr.Kind())

	pre, err := overlay.StartPrecopy(ctx, mnt.Upperdir, dir, overlay.PrecopyOptions{
		CaptureOptions: overlay.CaptureOptions{UserXattr: mnt.UserXattr()},
		Mountpoint:     mnt.Mountpoint,
	})
	if err != nil {
		return fmt.Errorf("pre-copy %s: %w", mnt.Upperdir, err)
	}
	defer pre.Close()
	pstats := pre.Stats()
	if pstats.DataCopy == "reflink" || pstats.DataCopy == "mixed" {
		// FICLONE of a file with dirty pages forces writeback: do it now,
		// not in the pause.
		if err := overlay.SyncFS(mnt.Upperdir); err != nil {
			return fmt.Errorf("sync %s: %w", mnt.Upperdir, err)
		}
	}
	fstats, err := s.frozenRecapture(ctx, st, fr, pre)
	if err != nil {
		return err
	}
	m, err := pre.Seal(ctx)
	if err != nil {
		return fmt.Errorf("seal capture of %s: %w", mnt.Upperdir, err)
	}
	c := &st.Capture // the quiescence figures are already in
	c.Strategy, c.DataCopy = "precopy", pstats.DataCopy
	c.PrecopyMS, c.PrecopyRounds = pstats.Duration.Milliseconds(), pstats.Rounds
	c.DirtyEntries, c.Fallback, c.FallbackReason = fstats.DirtyEntries, fstats.Fallback, fstats.FallbackReason
	c.MappedFiles, c.MappedHeld = fstats.MappedFiles, fstats.MappedHeld
	st.Entries = len(m.Entries)
	st.Bytes = manifestBytes(m)
	st.Phase = snapshot.PhaseCaptured
	return s.store.Save(st)
}

// disarmDelay is how long after the pause the watchdog is disarmed.
const disarmDelay = 200 * time.Microsecond

// maxQuiesceWait bounds how long a freeze is put off while a task of the
// container is in an uninterruptible sleep (see freezer.WaitQuiescent).
const maxQuiesceWait = 20 * time.Millisecond

// frozenRecapture is the pause: freeze, re-capture the dirty set, thaw. The
// watchdog is armed for its whole length; the freezer thaws on every path.
// Right before it the pre-copy catches up and the in-pause path is run once
// (warm); during it the Go collector is kept from starting.
func (s *Shim) frozenRecapture(ctx context.Context, st *snapshot.State, fr *freezer.Freezer, pre *overlay.Precopy) (fstats overlay.FinishStats, err error) {
	pids, err := fr.Procs()
	if err != nil {
		return fstats, err
	}
	if err := pre.Prepare(ctx, pids); err != nil {
		return fstats, fmt.Errorf("pre-copy catch-up: %w", err)
	}
	// Armed after the catch-up, which may take a while: the watchdog's
	// deadline is for the pause (plus the quiescence wait). Armed before that
	// wait, so that the watchdog's threads, woken by the message, are done
	// running before the freeze.
	// A container the user paused stays paused: our thaw (or the
	// watchdog's) would undo it. Checked before arming and again right
	// before the freeze.
	if err := s.refusePaused(fr); err != nil {
		return fstats, err
	}
	guard, err := s.armWatchdog(fr, maxQuiesceWait)
	if err != nil {
		return fstats, err
	}
	// Disarmed once the thawed tasks have had their CPUs back for a moment:
	// the message wakes the watchdog's real-time thread, which would
	// otherwise take the CPU of a task that has not run yet since the thaw.
	defer guard.disarmAfter(disarmDelay)
	q := fr.WaitQuiescent(ctx, maxQuiesceWait)
	st.Capture.QuiesceWaitUS, st.Capture.QuiesceTimedOut = q.Waited.Microseconds(), !q.Quiet
	if err := s.refusePaused(fr); err != nil {
		return fstats, err
	}
	defer debug.SetGCPercent(debug.SetGCPercent(-1))
	var tasks time.Duration
	res, err := fr.Pause(ctx, s.freezeTimeout, func() error {
		if s.pauseDelay > 0 {
			time.Sleep(s.pauseDelay)
		}
		start := time.Now()
		pids, err := fr.Procs()
		tasks = time.Since(start)
		if err != nil {
			return err
		}
		fstats, err = pre.Recapture(ctx, pids)
		if err != nil {
			return fmt.Errorf("re-capture in the pause: %w", err)
		}
		return nil
	})
	if res.FrozenAt.IsZero() {
		return fstats, err // not frozen: thawed, nothing captured
	}
	err = errors.Join(err, guard.check())
	st.Pause = snapshot.PauseTimes{
		FreezeUS:    res.Freeze.Wait.Microseconds(),
		TasksUS:     tasks.Microseconds(),
		DrainUS:     fstats.Drain.Microseconds(),
		MmapScanUS:  fstats.MmapScan.Microseconds(),
		RecaptureUS: fstats.Recapture.Microseconds(),
		CaptureUS:   res.Held.Microseconds(),
		ThawUS:      res.Thaw.Microseconds(),
	}
	st.Pause.FrozenAtMonoNS = monotonicAt(res.FrozenAt)
	st.PauseUS = res.Total.Microseconds()
	st.CapturedAt = res.FrozenAt.UTC()
	return fstats, err
}

// monotonicAt returns CLOCK_MONOTONIC in nanoseconds at t, a recent time
// taken by this process (Go's monotonic reading is CLOCK_MONOTONIC); 0 if
// the clock cannot be read.
func monotonicAt(t time.Time) int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0
	}
	return ts.Nano() - time.Since(t).Nanoseconds()
}

// refusePaused fails when the container's cgroup is frozen already: the
// user paused it.
func (s *Shim) refusePaused(fr *freezer.Freezer) error {
	if frozen, err := fr.Frozen(); err == nil && frozen {
		return fmt.Errorf("container %s is paused; resume it, then snapshot", s.cfg.ContainerID)
	}
	return nil
}

// manifestBytes is the size of the file data a manifest refers to, each
// data file counted once.
func manifestBytes(m *overlay.Manifest) int64 {
	seen := map[string]bool{}
	var n int64
	for _, e := range m.Entries {
		if e.Data != "" && !seen[e.Data] {
			seen[e.Data] = true
			n += e.Size
		}
	}
	return n
}

func (s *Shim) startUploader(st *snapshot.State) error {
	pid, err := uploader.Spawn(s.exe, s.cfg.StateDir, st.ID)
	if err != nil {
		return fmt.Errorf("start uploader for %s: %w", st.ID, err)
	}
	st.UploaderPID = pid
	s.reap(pid)
	return nil
}

// reap collects the exit status of a child so it does not linger as a zombie
// while the shim lives; it makes no other use of it.
func (s *Shim) reap(pid int) {
	go func() {
		if p, err := os.FindProcess(pid); err == nil {
			p.Wait()
		}
	}()
}

func (s *Shim) fail(st *snapshot.State, err error) (*snapshot.State, error) {
	st.Phase = snapshot.PhaseFailed
	st.Error = err.Error()
	if serr := s.store.Save(st); serr != nil {
		s.logf("save failed state of %s: %v", st.ID, serr)
	}
	s.logf("snapshot %s of %s failed: %v", st.ID, st.Container, err)
	return st, err
}

func (s *Shim) overlayMount() (*overlay.Mount, error) {
	mnt, err := overlay.FindMount("/proc/self/mountinfo", s.cfg.Rootfs)
	if err != nil {
		return nil, fmt.Errorf("overlay of %s: %w", s.cfg.ContainerID, err)
	}
	if err := mnt.CheckCapturable(); err != nil {
		return nil, fmt.Errorf("overlay of %s: %w", s.cfg.ContainerID, err)
	}
	return mnt, nil
}

// annotationRequest builds the request of a SIGUSR1 snapshot from the
// container's annotations.
func (s *Shim) annotationRequest(now time.Time) (snapshot.Request, error) {
	raw := s.cfg.Annotations[AnnotationTarget]
	if raw == "" {
		return snapshot.Request{}, badRequest("SIGUSR1: container has no %s annotation", AnnotationTarget)
	}
	tmpl, err := template.New("target").Option("missingkey=error").Parse(raw)
	if err != nil {
		return snapshot.Request{}, badRequest("annotation %s: %v", AnnotationTarget, err)
	}
	var b strings.Builder
	data := struct{ Time, Container string }{now.UTC().Format("20060102-150405"), s.cfg.ContainerID}
	if err := tmpl.Execute(&b, data); err != nil {
		return snapshot.Request{}, badRequest("annotation %s: %v", AnnotationTarget, err)
	}
	return snapshot.Request{
		Target:    b.String(),
		PlainHTTP: s.cfg.Annotations[AnnotationPlainHTTP] == "true",
		Insecure:  s.cfg.Annotations[AnnotationInsecure] == "true",
	}, nil
}
