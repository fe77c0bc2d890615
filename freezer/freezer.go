// Package freezer freezes and thaws a container's cgroup (v1 freezer.state or
// v2 cgroup.freeze) directly, confirming each transition and always thawing
// when a freeze cannot complete.
//
// The fast path follows notes/freezer-measurements.md: pre-opened files, one
// write, then re-reads after naps of 10 µs doubling to 250 µs (v2: ppoll on
// cgroup.events, woken early by its rate-limited notification; v1: nanosleep,
// FROZEN re-written every 5 ms, never THAWED mid-attempt), never a busy
// spin, on a locked thread raised to SCHED_FIFO meanwhile. A freeze that
// misses its deadline is thawed and fails with a *TimeoutError naming the
// tasks that blocked it. Thaw is one write and one read. Pause runs work
// between a freeze and a thaw on the same SCHED_FIFO thread; Procs lists the
// cgroup's processes cheaply enough to call frozen. On v1, an optional
// anchor cgroup (EnsureAnchor) removes a kernel text patch from every
// transition. LibcontainerFreezeThaw is the baseline it is measured against.
package freezer

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/opencontainers/cgroups"
	"golang.org/x/sys/unix"
)

// Kind names the freezer implementation of a cgroup.
type Kind string

// The two freezers.
const (
	V1 Kind = "v1"
	V2 Kind = "v2"
)

// DefaultTimeout bounds how long Freeze waits for every task to stop.
const DefaultTimeout = 2 * time.Second

// Freezer controls one cgroup's freezer through pre-opened files.
type Freezer struct {
	kind Kind
	dir  string
	// ctl is freezer.state (v1) or cgroup.freeze (v2), opened read-write.
	ctl *os.File
	// events is cgroup.events (v2 only): frozen 0|1, pollable with POLLPRI.
	events *os.File
	// ctlFD and eventsFD are the descriptors of ctl and events.
	ctlFD, eventsFD int
	// rtPrio is the SCHED_FIFO priority of freeze and thaw; 0: none.
	rtPrio int
	// procs lists the cgroup's processes (Procs).
	procs *procsReader
}

// Options tune a Freezer.
type Options struct {
	// RTPriority is the SCHED_FIFO priority of the thread that freezes,
	// confirms and thaws: 0 means DefaultRTPriority, a negative value keeps
	// the caller's scheduling policy.
	RTPriority int
}

// Result describes one freeze.
type Result struct {
	// Wait is the time from the freeze request to every task being frozen.
	Wait time.Duration
	// Polls is how many times the state was re-read before it was frozen.
	Polls int
	// Rewrites counts the FROZEN re-writes of a v1 freeze that took more
	// than v1Rewrite.
	Rewrites int
	// Realtime is true when the freezing thread ran SCHED_FIFO.
	Realtime bool
}

// Confirmation loop tuning (see the freezer measurements): naps grow from
// minNap to maxNap; a v1 freeze re-asserts FROZEN every v1Rewrite.
const (
	minNap    = 10 * time.Microsecond
	maxNap    = 250 * time.Microsecond
	v1Rewrite = 5 * time.Millisecond
)

// Open prepares the freezer of the cgroup directory dir with default options.
func Open(kind Kind, dir string) (*Freezer, error) {
	return OpenWith(kind, dir, Options{})
}

// OpenWith prepares the freezer of the cgroup directory dir.
func OpenWith(kind Kind, dir string, opts Options) (*Freezer, error) {
	f := &Freezer{kind: kind, dir: dir, eventsFD: -1, rtPrio: opts.RTPriority}
	if f.rtPrio == 0 {
		f.rtPrio = DefaultRTPriority
	}
	var err error
	switch kind {
	case V1:
		f.ctl, err = os.OpenFile(filepath.Join(dir, "freezer.state"), os.O_RDWR, 0)
	case V2:
		f.ctl, err = os.OpenFile(filepath.Join(dir, "cgroup.freeze"), os.O_RDWR, 0)
		if err == nil {
			f.events, err = os.Open(filepath.Join(dir, "cgroup.events"))
		}
	default:
		return nil, fmt.Errorf("open freezer %s: unknown kind %q", dir, kind)
	}
	if err == nil {
		f.procs, err = openProcs(dir)
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open %s freezer %s: %w", kind, dir, err)
	}
	f.ctlFD = int(f.ctl.Fd())
	if f.events != nil {
		f.eventsFD = int(f.events.Fd())
	}
	return f, nil
}

// FromCgroupPaths picks the freezer runc itself uses for a container, given
// runc's state.json cgroup_paths: the v1 "freezer" controller when present
// (v1 or hybrid host), else the unified ("") path. prefer may force V1 or V2.
func FromCgroupPaths(paths map[string]string, prefer Kind) (*Freezer, error) {
	kind, dir, err := Choose(paths, prefer)
	if err != nil {
		return nil, err
	}
	return Open(kind, dir)
}

// Choose picks the freezer kind and cgroup directory FromCgroupPaths opens,
// without opening anything.
func Choose(paths map[string]string, prefer Kind) (Kind, string, error) {
	v1, v2 := paths["freezer"], paths[""]
	switch {
	case prefer == V2 && v2 != "":
		return V2, v2, nil
	case prefer == V1 && v1 != "":
		return V1, v1, nil
	case prefer != "" && prefer != V1 && prefer != V2:
		return "", "", fmt.Errorf("unknown freezer %q (want v1 or v2)", prefer)
	case v1 != "":
		return V1, v1, nil
	case v2 != "":
		return V2, v2, nil
	}
	return "", "", errors.New("no freezer or unified cgroup path in cgroup_paths")
}

// ForPID finds the freezer of the cgroup that process pid belongs to, using
// /proc/<pid>/cgroup and the host's cgroup mounts.
func ForPID(pid int, prefer Kind) (*Freezer, error) {
	paths, err := PathsForPID(pid)
	if err != nil {
		return nil, err
	}
	return FromCgroupPaths(paths, prefer)
}

// PathsForPID returns the absolute cgroup directories of pid, keyed like
// runc's cgroup_paths: "freezer" for the v1 freezer, "" for the unified one.
func PathsForPID(pid int) (map[string]string, error) {
	rel, err := cgroups.ParseCgroupFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return nil, fmt.Errorf("cgroups of pid %d: %w", pid, err)
	}
	paths := map[string]string{}
	if cgroups.IsCgroup2UnifiedMode() {
		paths[""] = filepath.Join("/sys/fs/cgroup", rel[""])
		return paths, nil
	}
	if p, ok := rel["freezer"]; ok {
		mnt, root, err := cgroups.FindCgroupMountpointAndRoot("", "freezer")
		if err == nil {
			paths["freezer"] = filepath.Join(mnt, strings.TrimPrefix(p, root))
		}
	}
	if p, ok := rel[""]; ok {
		if mnt, err := unifiedMount(); err == nil {
			paths[""] = filepath.Join(mnt, p)
		}
	}
	if len(paths) == 0 {
		return nil, fmt.Errorf("pid %d: no freezer or unified cgroup found", pid)
	}
	return paths, nil
}

func unifiedMount() (string, error) {
	for _, dir := range []string{"/sys/fs/cgroup/unified", "/sys/fs/cgroup"} {
		var st unix.Statfs_t
		if unix.Statfs(dir, &st) == nil && st.Type == unix.CGROUP2_SUPER_MAGIC {
			return dir, nil
		}
	}
	return "", errors.New("no cgroup2 mount")
}

// Kind reports which freezer this is.
func (f *Freezer) Kind() Kind { return f.kind }

// Dir is the cgroup directory.
func (f *Freezer) Dir() string { return f.dir }

// Close releases the pre-opened files.
func (f *Freezer) Close() error {
	for _, file := range []*os.File{f.ctl, f.events} {
		if file != nil {
			file.Close()
		}
	}
	if f.procs != nil {
		f.procs.close()
	}
	return nil
}

// Procs lists the processes of the cgroup and of its descendant cgroups,
// each once, through the cgroup directory opened with the freezer: cheap
// enough to call while frozen (for a cgroup without children, an open and a
// read of cgroup.procs and an fstat of the directory). Not safe for
// concurrent use.
func (f *Freezer) Procs() ([]int, error) {
	pids, err := f.procs.pids("cgroup.procs")
	if err != nil {
		return nil, fmt.Errorf("processes of %s: %w", f.dir, err)
	}
	return pids, nil
}

// Frozen reports whether every task of the cgroup is frozen now.
func (f *Freezer) Frozen() (bool, error) {
	st, err := f.state()
	return st == stateFrozen, err
}

// Freeze stops every task of the cgroup and returns once all are frozen. If
// that does not happen before ctx is done or timeout passes, the cgroup is
// thawed and a *TimeoutError names the tasks that were not frozen.
//
// One write requests the freeze; the state is then re-read after naps of
// 10 µs doubling to 250 µs (v2: ppoll for POLLPRI on cgroup.events, which
// ends a nap early when the kernel notifies). The calling thread runs
// SCHED_FIFO meanwhile, unless the options or the kernel refuse it.
func (f *Freezer) Freeze(ctx context.Context, timeout time.Duration) (Result, error) {
	rt := enterRT(f.rtPrio, true)
	defer rt.leave()
	return f.freezeOrThaw(ctx, timeout, rt)
}

// freezeOrThaw freezes on the calling thread (entered as rt) and returns
// once every task is frozen, or thaws and returns why not.
func (f *Freezer) freezeOrThaw(ctx context.Context, timeout time.Duration, rt rtThread) (Result, error) {
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	start := time.Now()
	deadline := start.Add(timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	res, frozen, err := f.freezeAndConfirm(ctx, start, deadline)
	res.Realtime = rt.realtime()
	if err != nil || !frozen {
		return res, f.failedFreeze(ctx, res, err)
	}
	return res, nil
}

// freezeAndConfirm requests the freeze and waits until it is confirmed
// (frozen true) or the deadline passes (frozen false, err nil).
func (f *Freezer) freezeAndConfirm(ctx context.Context, start, deadline time.Time) (res Result, frozen bool, err error) {
	if err := f.request(); err != nil {
		return res, false, fmt.Errorf("freeze %s: %w", f.dir, err)
	}
	lastWrite := start
	nap := minNap
	for {
		st, err := f.state()
		if err != nil {
			return res, false, fmt.Errorf("freeze %s: read state: %w", f.dir, err)
		}
		now := time.Now()
		res.Wait = now.Sub(start)
		if st == stateFrozen {
			return res, true, nil
		}
		if !now.Before(deadline) || ctx.Err() != nil {
			return res, false, nil
		}
		// v1 stays FREEZING until every task stops; re-asserting FROZEN
		// retries tasks that were mid-syscall. Never THAWED mid-attempt.
		if f.kind == V1 && now.Sub(lastWrite) >= v1Rewrite {
			if err := f.request(); err != nil {
				return res, false, fmt.Errorf("freeze %s: %w", f.dir, err)
			}
			res.Rewrites++
			lastWrite = now
		}
		f.nap(min(nap, deadline.Sub(now)))
		res.Polls++
		nap = min(2*nap, maxNap)
	}
}

// Thaw resumes every task of the cgroup: one write, then one read to
// confirm (it fails when an ancestor keeps the cgroup frozen). The calling
// thread runs SCHED_FIFO meanwhile, so the tasks it wakes do not preempt it.
func (f *Freezer) Thaw() error {
	rt := enterRT(f.rtPrio, false)
	err := f.thaw()
	rt.leave()
	return err
}

func (f *Freezer) thaw() error {
	value := "0"
	if f.kind == V1 {
		value = "THAWED"
	}
	if _, err := unix.Pwrite(f.ctlFD, []byte(value), 0); err != nil {
		return fmt.Errorf("thaw %s: %w", f.dir, err)
	}
	st, err := f.state()
	if err != nil {
		return fmt.Errorf("thaw %s: read state: %w", f.dir, err)
	}
	if st != stateThawed {
		return fmt.Errorf("thaw %s: still frozen (is a parent cgroup frozen?)", f.dir)
	}
	return nil
}

func (f *Freezer) request() error {
	value := "1"
	if f.kind == V1 {
		value = "FROZEN"
	}
	_, err := unix.Pwrite(f.ctlFD, []byte(value), 0)
	return err
}

// nap waits up to d: on v2 until cgroup.events changes, on v1 plainly.
func (f *Freezer) nap(d time.Duration) {
	ts := unix.NsecToTimespec(max(d, 0).Nanoseconds())
	if f.kind == V2 {
		fds := []unix.PollFd{{Fd: int32(f.eventsFD), Events: unix.POLLPRI}}
		_, _ = unix.Ppoll(fds, &ts, nil)
		return
	}
	_ = unix.Nanosleep(&ts, nil)
}

// freezerState is a cgroup's freezer state as read from the kernel.
type freezerState int

const (
	stateThawed freezerState = iota
	stateFreezing
	stateFrozen
)

// state reads freezer.state (v1) or cgroup.events (v2). Reading
// cgroup.events also re-arms its POLLPRI notification.
func (f *Freezer) state() (freezerState, error) {
	var buf [128]byte
	fd := f.ctlFD
	if f.kind == V2 {
		fd = f.eventsFD
	}
	n, err := unix.Pread(fd, buf[:], 0)
	if err != nil {
		return stateThawed, err
	}
	return parseState(f.kind, buf[:n]), nil
}

// parseState interprets the content of freezer.state (v1) or cgroup.events (v2).
func parseState(kind Kind, b []byte) freezerState {
	if kind == V1 {
		switch string(bytes.TrimSpace(b)) {
		case "FROZEN":
			return stateFrozen
		case "FREEZING":
			return stateFreezing
		}
		return stateThawed
	}
	for len(b) > 0 {
		var line []byte
		line, b, _ = bytes.Cut(b, []byte("\n"))
		if v, ok := bytes.CutPrefix(line, []byte("frozen ")); ok {
			if string(bytes.TrimSpace(v)) == "1" {
				return stateFrozen
			}
			return stateThawed
		}
	}
	return stateThawed
}
