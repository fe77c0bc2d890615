// Package freezer freezes and thaws a container's cgroup (v1 freezer.state or
// v2 cgroup.freeze) directly, confirming each transition and always thawing
// when a freeze cannot complete.
package freezer

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
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
}

// Result times one freeze.
type Result struct {
	// Wait is the time from the freeze request to every task being frozen.
	Wait time.Duration
	// Polls is how many times the state was re-read before it was frozen.
	Polls int
}

// Open prepares the freezer of the cgroup directory dir.
func Open(kind Kind, dir string) (*Freezer, error) {
	f := &Freezer{kind: kind, dir: dir}
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
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open %s freezer %s: %w", kind, dir, err)
	}
	return f, nil
}

// FromCgroupPaths picks the freezer runc itself uses for a container, given
// runc's state.json cgroup_paths: the v1 "freezer" controller when present
// (v1 or hybrid host), else the unified ("") path. prefer may force V1 or V2.
func FromCgroupPaths(paths map[string]string, prefer Kind) (*Freezer, error) {
	v1, v2 := paths["freezer"], paths[""]
	switch {
	case prefer == V2 && v2 != "":
		return Open(V2, v2)
	case prefer == V1 && v1 != "":
		return Open(V1, v1)
	case prefer != "" && prefer != V1 && prefer != V2:
		return nil, fmt.Errorf("unknown freezer %q (want v1 or v2)", prefer)
	case v1 != "":
		return Open(V1, v1)
	case v2 != "":
		return Open(V2, v2)
	}
	return nil, errors.New("no freezer or unified cgroup path in cgroup_paths")
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
	return nil
}

// Frozen reports whether every task of the cgroup is frozen now.
func (f *Freezer) Frozen() (bool, error) {
	if f.kind == V1 {
		s, err := readAt(f.ctl)
		return s == "FROZEN", err
	}
	s, err := readAt(f.events)
	return eventsFrozen(s), err
}

// Freeze stops every task of the cgroup and returns once all are frozen. If
// that does not happen before ctx is done or timeout passes, the cgroup is
// thawed and an error names the tasks that were still running.
func (f *Freezer) Freeze(ctx context.Context, timeout time.Duration) (Result, error) {
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	start := time.Now()
	deadline := start.Add(timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	if err := f.request(); err != nil {
		return Result{}, f.abort(fmt.Errorf("freeze %s: %w", f.dir, err))
	}
	var res Result
	nap := 10 * time.Microsecond
	lastWrite := start
	for {
		frozen, err := f.Frozen()
		if err != nil {
			return res, f.abort(fmt.Errorf("freeze %s: read state: %w", f.dir, err))
		}
		if frozen {
			res.Wait = time.Since(start)
			return res, nil
		}
		res.Polls++
		now := time.Now()
		if now.After(deadline) || ctx.Err() != nil {
			return res, f.abort(fmt.Errorf("freeze %s: not frozen after %v; tasks still running: %s",
				f.dir, now.Sub(start).Round(time.Microsecond), f.runningTasks()))
		}
		// v1 reports FREEZING until every task stops; re-asserting FROZEN
		// retries tasks that were mid-syscall. v2 needs no re-write.
		if f.kind == V1 && now.Sub(lastWrite) > 5*time.Millisecond {
			if err := f.request(); err != nil {
				return res, f.abort(fmt.Errorf("freeze %s: %w", f.dir, err))
			}
			lastWrite = now
		}
		f.nap(nap)
		if nap < 250*time.Microsecond {
			nap *= 2
		}
	}
}

// Thaw resumes every task of the cgroup and confirms it.
func (f *Freezer) Thaw() error {
	var err error
	if f.kind == V1 {
		_, err = f.ctl.WriteAt([]byte("THAWED"), 0)
	} else {
		_, err = f.ctl.WriteAt([]byte("0"), 0)
	}
	if err != nil {
		return fmt.Errorf("thaw %s: %w", f.dir, err)
	}
	frozen, err := f.Frozen()
	if err != nil {
		return fmt.Errorf("thaw %s: read state: %w", f.dir, err)
	}
	if frozen {
		return fmt.Errorf("thaw %s: still frozen (is a parent cgroup frozen?)", f.dir)
	}
	return nil
}

func (f *Freezer) request() error {
	var err error
	if f.kind == V1 {
		_, err = f.ctl.WriteAt([]byte("FROZEN"), 0)
	} else {
		_, err = f.ctl.WriteAt([]byte("1"), 0)
	}
	return err
}

// abort thaws after a failed freeze and returns err, joined with any thaw error.
func (f *Freezer) abort(err error) error {
	if terr := f.Thaw(); terr != nil {
		return errors.Join(err, terr)
	}
	return err
}

// nap waits up to d: on v2 until cgroup.events changes, on v1 plainly.
func (f *Freezer) nap(d time.Duration) {
	if f.kind == V2 {
		ts := unix.NsecToTimespec(d.Nanoseconds())
		fds := []unix.PollFd{{Fd: int32(f.events.Fd()), Events: unix.POLLPRI}}
		_, _ = unix.Ppoll(fds, &ts, nil)
		return
	}
	ts := unix.NsecToTimespec(d.Nanoseconds())
	_ = unix.Nanosleep(&ts, nil)
}

// runningTasks lists the tasks of the cgroup that are not frozen, with their
// state and kernel wait channel, to explain a freeze that timed out.
func (f *Freezer) runningTasks() string {
	pids, err := cgroups.GetPids(f.dir)
	if err != nil {
		return "unknown (" + err.Error() + ")"
	}
	var out []string
	for _, pid := range pids {
		stat, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		wchan, _ := os.ReadFile(fmt.Sprintf("/proc/%d/wchan", pid))
		state := procState(stat)
		if string(wchan) == "__refrigerator" || string(wchan) == "do_freezer_trap" {
			continue
		}
		out = append(out, fmt.Sprintf("%d(state %s, wchan %s)", pid, state, wchan))
	}
	if len(out) == 0 {
		return "none visible"
	}
	return strings.Join(out, ", ")
}

func procState(stat []byte) string {
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 || i+2 >= len(stat) {
		return "?"
	}
	return string(stat[i+2])
}

func readAt(f *os.File) (string, error) {
	var buf [256]byte
	n, err := f.ReadAt(buf[:], 0)
	if n > 0 {
		err = nil
	}
	return strings.TrimSpace(string(buf[:n])), err
}

func eventsFrozen(events string) bool {
	for _, line := range strings.Split(events, "\n") {
		k, v, ok := strings.Cut(line, " ")
		if ok && k == "frozen" {
			n, _ := strconv.Atoi(v)
			return n == 1
		}
	}
	return false
}
