package testenv

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// RuncState is the subset of runc's state.json the tests need.
type RuncState struct {
	ID      string `json:"id"`
	InitPID int    `json:"init_process_pid"`
	// CgroupPaths maps a v1 controller to its dir; "" is the unified (v2) dir.
	CgroupPaths map[string]string `json:"cgroup_paths"`
	Config      RuncConfig        `json:"config"`
}

// RuncConfig is the subset of state.json's "config" the tests need.
type RuncConfig struct {
	Rootfs  string     `json:"rootfs"`
	Labels  []string   `json:"labels"`
	Cgroups RuncCgroup `json:"cgroups"`
}

// RuncCgroup is state.json's "config.cgroups".
type RuncCgroup struct {
	Path string `json:"path"`
}

// FreezerV1 is the container's v1 freezer dir, or "".
func (s *RuncState) FreezerV1() string { return s.CgroupPaths["freezer"] }

// Unified is the container's cgroup v2 dir, or "".
func (s *RuncState) Unified() string { return s.CgroupPaths[""] }

// RuncState reads runc's state.json for container id.
func (c *Containerd) RuncState(id string) (*RuncState, error) {
	return c.runcStateIn(c.Namespace, id)
}

func (c *Containerd) runcStateIn(ns, id string) (*RuncState, error) {
	path := filepath.Join(c.runcRootOf(ns, id), ns, id, "state.json")
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("runc state of %s: %w", id, err)
	}
	var st RuncState
	if err := json.Unmarshal(raw, &st); err != nil {
		return nil, fmt.Errorf("parse %s: %w", path, err)
	}
	return &st, nil
}

// runcRootOf returns the runc root the shim uses for the container: the
// "root" recorded in the bundle's options.json, else RuncRoot.
func (c *Containerd) runcRootOf(ns, id string) string {
	raw, err := os.ReadFile(filepath.Join(c.bundleIn(ns, id), "options.json"))
	if err == nil {
		var o struct {
			Root string `json:"root"`
		}
		if json.Unmarshal(raw, &o) == nil && o.Root != "" {
			return o.Root
		}
	}
	return c.RuncRoot
}

// Frozen reports whether the container's v1 freezer or v2 cgroup is frozen.
// A container without runc state (not running) is not frozen.
func (c *Containerd) Frozen(id string) (bool, error) {
	st, err := c.RuncState(id)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if dir := st.FreezerV1(); dir != "" {
		if f, err := cgroupV1Frozen(dir); err != nil || f {
			return f, err
		}
	}
	if dir := st.Unified(); dir != "" {
		return cgroupV2Frozen(dir)
	}
	return false, nil
}

// Thaw thaws the container's v1 freezer and v2 cgroup directly (not through
// containerd, whose view of a paused task is not updated).
func (c *Containerd) Thaw(id string) error {
	return c.thawIn(c.Namespace, id)
}

func (c *Containerd) thawIn(ns, id string) error {
	st, err := c.runcStateIn(ns, id)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var errs []error
	if dir := st.FreezerV1(); dir != "" {
		errs = append(errs, thawCgroupDir(cgroupHierarchy{opts: "freezer"}, dir))
	}
	if dir := st.Unified(); dir != "" {
		errs = append(errs, thawCgroupDir(cgroupHierarchy{v2: true}, dir))
	}
	return errors.Join(errs...)
}
