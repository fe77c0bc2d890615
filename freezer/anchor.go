package freezer

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/opencontainers/cgroups"
)

// AnchorName is the name of the v1 freezer anchor cgroup, directly under the
// v1 freezer hierarchy's root.
//
// While any v1 freezer cgroup is freezing or frozen, the kernel keeps its
// freezer static key enabled; when none is, every freeze and thaw patches
// kernel text (about 100 µs each, ms outliers on a busy machine). An empty
// cgroup kept FROZEN for good (the anchor) removes that cost: freeze 132 →
// 16 µs, thaw 85 → 3 µs for one idle task (notes/freezer-measurements.md).
// Tools that list frozen cgroups will show it; it holds no task.
const AnchorName = "seamless.anchor"

// DefaultAnchorDir is where the anchor lives: <v1 freezer root>/seamless.anchor.
func DefaultAnchorDir() (string, error) {
	root, err := cgroups.FindCgroupMountpoint("", "freezer")
	if err != nil {
		return "", fmt.Errorf("v1 freezer anchor: %w", err)
	}
	return filepath.Join(root, AnchorName), nil
}

// EnsureAnchor creates the v1 cgroup dir if needed and keeps it FROZEN. dir
// must not be an ancestor or a descendant of a cgroup that is ever frozen
// (a child inherits its parent's freezing). An anchor that holds tasks is
// thawed and refused: it would keep them frozen forever.
func EnsureAnchor(dir string) error {
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("freezer anchor %s: %w", dir, err)
	}
	procs, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return fmt.Errorf("freezer anchor %s: %w", dir, err)
	}
	if pids := strings.Fields(string(procs)); len(pids) > 0 {
		thawErr := writeState(dir, "THAWED")
		return errors.Join(fmt.Errorf("freezer anchor %s holds processes %v: thawed, not used", dir, pids), thawErr)
	}
	if err := writeState(dir, "FROZEN"); err != nil {
		return fmt.Errorf("freezer anchor %s: %w", dir, err)
	}
	return nil
}

// AnchorFrozen reports whether the anchor at dir exists and is FROZEN.
func AnchorFrozen(dir string) bool {
	b, err := os.ReadFile(filepath.Join(dir, "freezer.state"))
	return err == nil && strings.TrimSpace(string(b)) == "FROZEN"
}

// RemoveAnchor thaws and removes the anchor at dir; a missing one is fine.
func RemoveAnchor(dir string) error {
	err := writeState(dir, "THAWED")
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if rerr := os.Remove(dir); rerr != nil && !errors.Is(rerr, fs.ErrNotExist) {
		return errors.Join(err, fmt.Errorf("remove freezer anchor: %w", rerr))
	}
	return err
}

func writeState(dir, state string) error {
	return os.WriteFile(filepath.Join(dir, "freezer.state"), []byte(state), 0)
}
