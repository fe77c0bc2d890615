package testenv

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// The runc v2 shim always listens under shimSocketDir, whatever the state dir.
const (
	shimRunDir    = "/run/containerd"
	shimSocketDir = "/run/containerd/s"
)

// recordFile is the instance record written into each instance dir.
const recordFile = "instance.json"

// instanceRecord is what CleanStale needs to tear down an instance whose
// owner died without calling Close.
type instanceRecord struct {
	Kind           string   `json:"kind"` // "containerd" or "registry"
	OwnerPID       int      `json:"owner_pid"`
	OwnerStart     uint64   `json:"owner_start"`
	PID            int      `json:"pid"`
	PIDStart       uint64   `json:"pid_start"`
	Namespace      string   `json:"namespace,omitempty"`
	CgroupParent   string   `json:"cgroup_parent,omitempty"`
	RunDirsCreated []string `json:"run_dirs_created,omitempty"`
}

func (c *Containerd) record() instanceRecord {
	return instanceRecord{
		Kind: "containerd", OwnerPID: os.Getpid(), OwnerStart: processStartTime(os.Getpid()),
		PID: c.PID, PIDStart: c.pidStart, Namespace: c.Namespace,
		CgroupParent: c.CgroupParent, RunDirsCreated: c.runDirsCreated,
	}
}

func writeRecord(dir string, rec instanceRecord) error {
	data, err := json.Marshal(rec)
	if err != nil {
		return fmt.Errorf("encode instance record: %w", err)
	}
	tmp := filepath.Join(dir, recordFile+".tmp")
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return fmt.Errorf("write instance record: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, recordFile)); err != nil {
		return fmt.Errorf("write instance record: %w", err)
	}
	return nil
}

func readRecord(dir string) (instanceRecord, error) {
	var rec instanceRecord
	data, err := os.ReadFile(filepath.Join(dir, recordFile))
	if err != nil {
		return rec, fmt.Errorf("read instance record: %w", err)
	}
	if err := json.Unmarshal(data, &rec); err != nil {
		return rec, fmt.Errorf("parse %s/%s: %w", dir, recordFile, err)
	}
	return rec, nil
}

// processStartTime returns the start time (clock ticks since boot) of pid,
// or 0 if unknown. Together with the PID it identifies a process.
func processStartTime(pid int) uint64 {
	stat, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0
	}
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0
	}
	// Fields after the command name start at field 3 (state); starttime is field 22.
	fields := strings.Fields(string(stat[i+1:]))
	if len(fields) < 20 {
		return 0
	}
	v, _ := strconv.ParseUint(fields[19], 10, 64)
	return v
}

// sameProcess reports whether pid is alive and still the process that had
// start time start.
func sameProcess(pid int, start uint64) bool {
	return start != 0 && ProcessAlive(pid) && processStartTime(pid) == start
}

// stopRecordedPID stops a process that is not our child, identified by PID
// and start time: SIGTERM, wait grace, SIGKILL.
func stopRecordedPID(pid int, start uint64, grace time.Duration) error {
	if !sameProcess(pid, start) {
		return nil
	}
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("SIGTERM %d: %w", pid, err)
	}
	if waitGone([]int{pid}, grace) == nil {
		return nil
	}
	if !sameProcess(pid, start) {
		return nil
	}
	return killPIDs([]int{pid})
}

// missingDirs returns those of dirs that do not exist.
func missingDirs(dirs ...string) []string {
	var out []string
	for _, d := range dirs {
		if _, err := os.Stat(d); errors.Is(err, fs.ErrNotExist) {
			out = append(out, d)
		}
	}
	return out
}

// removeRunDirs rmdirs the shim run dirs this instance saw created, if they
// are empty and no containerd or shim process runs on the host any more (so
// no other instance can be about to use them).
func removeRunDirs(dirs []string) error {
	if len(dirs) == 0 {
		return nil
	}
	busy, err := containerdRunning()
	if err != nil || busy {
		return err
	}
	for _, d := range dirs { // deepest first, as recorded
		if err := os.Remove(d); err != nil && !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, syscall.ENOTEMPTY) && !errors.Is(err, syscall.EEXIST) {
			return fmt.Errorf("rmdir %s: %w", d, err)
		}
	}
	return nil
}

// containerdRunning reports whether any containerd or containerd-shim*
// process exists (looked up read-only, to decide whether shared dirs may go).
func containerdRunning() (bool, error) {
	procs, err := processCmdlines()
	if err != nil {
		return false, err
	}
	for pid, argv := range procs {
		base := filepath.Base(argv[0])
		if (base == "containerd" || strings.HasPrefix(base, "containerd-shim")) && ProcessAlive(pid) {
			return true, nil
		}
	}
	return false, nil
}

// CleanStale tears down instances left under base (default /tmp) by owners
// that died without calling Close (e.g. a test binary killed by -timeout):
// each sl-ctd-* or sl-reg-* dir whose instance record names an owner process
// that no longer exists is closed as its owner would have. Dirs without a
// record or with a live owner are left alone. It returns the dirs cleaned.
func CleanStale(base string) ([]string, error) {
	if base == "" {
		base = "/tmp"
	}
	var cleaned []string
	var errs []error
	for _, pattern := range []string{"sl-ctd-*", "sl-reg-*"} {
		dirs, err := filepath.Glob(filepath.Join(base, pattern))
		if err != nil {
			return nil, fmt.Errorf("glob: %w", err)
		}
		for _, dir := range dirs {
			rec, err := readRecord(dir)
			if err != nil || sameProcess(rec.OwnerPID, rec.OwnerStart) {
				continue
			}
			if err := closeStale(dir, rec); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", dir, err))
				continue
			}
			cleaned = append(cleaned, dir)
		}
	}
	return cleaned, errors.Join(errs...)
}

func closeStale(dir string, rec instanceRecord) error {
	switch rec.Kind {
	case "containerd":
		c := containerdLayout(dir)
		c.Namespace, c.CgroupParent = rec.Namespace, rec.CgroupParent
		c.PID, c.pidStart, c.runDirsCreated = rec.PID, rec.PIDStart, rec.RunDirsCreated
		return c.Close()
	case "registry":
		return errors.Join(stopRecordedPID(rec.PID, rec.PIDStart, 10*time.Second), os.RemoveAll(dir))
	}
	return fmt.Errorf("unknown instance kind %q", rec.Kind)
}
