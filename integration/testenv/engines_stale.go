package testenv

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// ownerFile records, in a dockerd or podman instance dir, who owns it, so
// that an instance whose owner died (a test binary killed by -timeout) can
// be torn down by the next one (CleanStaleEngines).
const ownerFile = "owner.json"

// ownerRecord is the content of ownerFile.
type ownerRecord struct {
	OwnerPID   int    `json:"owner_pid"`
	OwnerStart uint64 `json:"owner_start"`
	// PID and PIDStart identify dockerd (0 for podman, which has no daemon).
	PID      int    `json:"pid,omitempty"`
	PIDStart uint64 `json:"pid_start,omitempty"`
	// CgroupParent is podman's cgroup parent.
	CgroupParent string `json:"cgroup_parent,omitempty"`
	// HostDirsCreated are host dirs dockerd created (removed when empty).
	HostDirsCreated []string `json:"host_dirs_created,omitempty"`
}

// writeOwnerRecord writes rec, owned by this process, into dir.
func writeOwnerRecord(dir string, rec ownerRecord) error {
	rec.OwnerPID, rec.OwnerStart = os.Getpid(), processStartTime(os.Getpid())
	b, err := json.Marshal(rec)
	if err != nil {
		return fmt.Errorf("encode owner record: %w", err)
	}
	tmp := filepath.Join(dir, ownerFile+".tmp")
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return fmt.Errorf("write owner record: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, ownerFile)); err != nil {
		return fmt.Errorf("write owner record: %w", err)
	}
	return nil
}

// CleanStaleEngines tears down the dockerd (sl-dkr-*) and podman (sl-pm-*)
// instances under base (default /tmp) whose owner process is gone: dockerd
// is stopped by its recorded PID and start time, podman's containers are
// removed and its cgroup emptied, mounts under the dir are undone and the
// dir removed. Dirs without a record or with a live owner are left alone.
func CleanStaleEngines(base string) ([]string, error) {
	if base == "" {
		base = "/tmp"
	}
	var cleaned []string
	var errs []error
	for _, pattern := range []string{"sl-dkr-*", "sl-pm-*"} {
		dirs, err := filepath.Glob(filepath.Join(base, pattern))
		if err != nil {
			return nil, fmt.Errorf("glob: %w", err)
		}
		for _, dir := range dirs {
			var rec ownerRecord
			if err := readJSONFile(filepath.Join(dir, ownerFile), &rec); err != nil || sameProcess(rec.OwnerPID, rec.OwnerStart) {
				continue
			}
			var cerr error
			if strings.HasPrefix(filepath.Base(dir), "sl-dkr-") {
				cerr = errors.Join(stopRecordedPID(rec.PID, rec.PIDStart, 20*time.Second),
					(&Dockerd{Dir: dir, hostDirsCreated: rec.HostDirsCreated}).cleanupDir())
			} else {
				cerr = podmanLayout(dir, rec.CgroupParent).Close()
			}
			if cerr != nil {
				errs = append(errs, fmt.Errorf("%s: %w", dir, cerr))
				continue
			}
			cleaned = append(cleaned, dir)
		}
	}
	return cleaned, errors.Join(errs...)
}

func readJSONFile(path string, v any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	return json.Unmarshal(b, v)
}

// processRunning reports whether a process whose argv[0] base name is name runs.
func processRunning(name string) bool {
	procs, err := processCmdlines()
	if err != nil {
		return true // when unsure, assume it does
	}
	for pid, argv := range procs {
		if filepath.Base(argv[0]) == name && ProcessAlive(pid) {
			return true
		}
	}
	return false
}

// newEngineDir tears down stale engine instances under base (default /tmp)
// and makes a fresh private directory for a new one, named prefix*.
func newEngineDir(base, prefix string) (string, error) {
	if base == "" {
		base = "/tmp"
	}
	if _, err := CleanStaleEngines(base); err != nil {
		return "", err
	}
	dir, err := os.MkdirTemp(base, prefix)
	if err != nil {
		return "", fmt.Errorf("engine dir: %w", err)
	}
	return dir, nil
}
