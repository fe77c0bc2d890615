package testenv

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

// cgroupHierarchy is one mounted cgroup hierarchy.
type cgroupHierarchy struct {
	root string // mountpoint, e.g. /sys/fs/cgroup/freezer
	v2   bool
	opts string // superblock options (v1 controllers)
}

// cgroupHierarchies lists the mounted cgroup v1 and v2 hierarchies.
func cgroupHierarchies() ([]cgroupHierarchy, error) {
	all, err := Mounts()
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	var out []cgroupHierarchy
	for _, m := range all {
		if (m.FSType != "cgroup" && m.FSType != "cgroup2") || seen[m.Mountpoint] {
			continue
		}
		seen[m.Mountpoint] = true
		out = append(out, cgroupHierarchy{root: m.Mountpoint, v2: m.FSType == "cgroup2", opts: m.SuperOptions})
	}
	return out, nil
}

func (h cgroupHierarchy) isFreezer() bool {
	for _, o := range strings.Split(h.opts, ",") {
		if o == "freezer" {
			return true
		}
	}
	return false
}

// cgroupRelPath validates a cgroup path like "/seamless-test-x" and returns
// it without the leading slash. The root cgroup is refused.
func cgroupRelPath(p string) (string, error) {
	rel := strings.Trim(filepath.Clean("/"+p), "/")
	if rel == "" || rel == "." {
		return "", fmt.Errorf("refusing the root cgroup (%q)", p)
	}
	return rel, nil
}

// cgroupDirs returns every directory of the tree rooted at dir, parents
// before children. A missing dir gives nil.
func cgroupDirs(dir string) ([]string, error) {
	var out []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if d.IsDir() {
			out = append(out, p)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("walk %s: %w", dir, err)
	}
	return out, nil
}

// forEachCgroupDir calls fn for each dir of the tree at prefix in every
// hierarchy, parents first.
func forEachCgroupDir(prefix string, fn func(h cgroupHierarchy, dir string) error) error {
	rel, err := cgroupRelPath(prefix)
	if err != nil {
		return err
	}
	hs, err := cgroupHierarchies()
	if err != nil {
		return err
	}
	var errs []error
	for _, h := range hs {
		dirs, err := cgroupDirs(filepath.Join(h.root, rel))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, d := range dirs {
			if err := fn(h, d); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// thawCgroupDir thaws one cgroup dir: v1 freezer.state, v2 cgroup.freeze.
func thawCgroupDir(h cgroupHierarchy, dir string) error {
	var file, value string
	switch {
	case h.v2:
		file, value = filepath.Join(dir, "cgroup.freeze"), "0"
	case h.isFreezer():
		file, value = filepath.Join(dir, "freezer.state"), "THAWED"
	default:
		return nil
	}
	if err := os.WriteFile(file, []byte(value), 0); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("thaw %s: %w", file, err)
	}
	return nil
}

// ThawCgroups thaws every cgroup at or below prefix (e.g. "/seamless-test-x")
// in the v1 freezer and the unified hierarchy.
func ThawCgroups(prefix string) error {
	return forEachCgroupDir(prefix, thawCgroupDir)
}

// CgroupPIDs returns the PIDs in any cgroup at or below prefix, across all
// hierarchies.
func CgroupPIDs(prefix string) ([]int, error) {
	set := map[int]bool{}
	err := forEachCgroupDir(prefix, func(_ cgroupHierarchy, dir string) error {
		raw, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return fmt.Errorf("read %s/cgroup.procs: %w", dir, err)
		}
		for _, f := range strings.Fields(string(raw)) {
			if pid, err := strconv.Atoi(f); err == nil {
				set[pid] = true
			}
		}
		return nil
	})
	pids := make([]int, 0, len(set))
	for p := range set {
		pids = append(pids, p)
	}
	sort.Ints(pids)
	return pids, err
}

// killCgroup thaws the tree at prefix and SIGKILLs every process in it.
func killCgroup(prefix string) error {
	errThaw := ThawCgroups(prefix)
	pids, errList := CgroupPIDs(prefix)
	var errKill error
	if len(pids) > 0 {
		errKill = killPIDs(pids)
	}
	return errors.Join(errThaw, errList, errKill)
}

// removeCgroupTree rmdirs the tree at prefix in every hierarchy, children
// first, retrying briefly while the kernel still reports it busy.
func removeCgroupTree(prefix string) error {
	rel, err := cgroupRelPath(prefix)
	if err != nil {
		return err
	}
	hs, err := cgroupHierarchies()
	if err != nil {
		return err
	}
	var errs []error
	for _, h := range hs {
		dirs, err := cgroupDirs(filepath.Join(h.root, rel))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for i := len(dirs) - 1; i >= 0; i-- {
			if err := rmdirRetry(dirs[i], 3*time.Second); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

func rmdirRetry(dir string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		err := os.Remove(dir)
		if err == nil || errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("rmdir %s: %w", dir, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// CgroupExists reports whether the cgroup path exists in any hierarchy.
func CgroupExists(path string) (bool, error) {
	rel, err := cgroupRelPath(path)
	if err != nil {
		return false, err
	}
	hs, err := cgroupHierarchies()
	if err != nil {
		return false, err
	}
	for _, h := range hs {
		if _, err := os.Stat(filepath.Join(h.root, rel)); err == nil {
			return true, nil
		}
	}
	return false, nil
}

// CheckNoFrozenCgroups returns an error naming every cgroup at or below prefix
// that is frozen: a v1 freezer.state other than THAWED, or "frozen 1" in a
// cgroup v2 cgroup.events. A prefix that does not exist is fine.
func CheckNoFrozenCgroups(prefix string) error {
	var frozen []string
	err := forEachCgroupDir(prefix, func(h cgroupHierarchy, dir string) error {
		is, err := cgroupDirFrozen(h, dir)
		if is {
			frozen = append(frozen, dir)
		}
		return err
	})
	if err != nil {
		return err
	}
	if len(frozen) > 0 {
		return fmt.Errorf("frozen cgroups: %s", strings.Join(frozen, ", "))
	}
	return nil
}

// cgroupDirFrozen reports whether one cgroup dir is frozen (or freezing).
func cgroupDirFrozen(h cgroupHierarchy, dir string) (bool, error) {
	switch {
	case h.v2:
		return cgroupV2Frozen(dir)
	case h.isFreezer():
		return cgroupV1Frozen(dir)
	}
	return false, nil
}

func cgroupV1Frozen(dir string) (bool, error) {
	raw, err := os.ReadFile(filepath.Join(dir, "freezer.state"))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("read freezer.state: %w", err)
	}
	return strings.TrimSpace(string(raw)) != "THAWED", nil
}

func cgroupV2Frozen(dir string) (bool, error) {
	raw, err := os.ReadFile(filepath.Join(dir, "cgroup.events"))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("read cgroup.events: %w", err)
	}
	for _, line := range strings.Split(string(raw), "\n") {
		if strings.TrimSpace(line) == "frozen 1" {
			return true, nil
		}
	}
	// A freeze in progress shows in cgroup.freeze before cgroup.events.
	ctl, err := os.ReadFile(filepath.Join(dir, "cgroup.freeze"))
	if err == nil && strings.TrimSpace(string(ctl)) == "1" {
		return true, nil
	}
	return false, nil
}
