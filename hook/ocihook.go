package hook

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/seamless-snapshot/seamless/baseimage"
	"github.com/seamless-snapshot/seamless/config"
	"github.com/seamless-snapshot/seamless/freezer"
	"github.com/seamless-snapshot/seamless/shim"
)

// OCI hook stages seamless-hook serves.
const (
	// StageCreateRuntime starts the shim (prestart and poststart, which run
	// in the same namespaces, are accepted too).
	StageCreateRuntime = "createRuntime"
	// StagePoststop stops the shim (the state then has no pid).
	StagePoststop = "poststop"
)

// maxStateSize bounds the state read from stdin.
const maxStateSize = 1 << 20

// ReadOCIState decodes the container state an OCI runtime (or podman, for
// poststop) writes to a hook's stdin.
func ReadOCIState(r io.Reader) (*specs.State, error) {
	b, err := io.ReadAll(io.LimitReader(r, maxStateSize+1))
	if err != nil {
		return nil, fmt.Errorf("read hook state: %w", err)
	}
	if len(b) > maxStateSize {
		return nil, fmt.Errorf("hook state larger than %d bytes", maxStateSize)
	}
	var st specs.State
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("decode hook state: %w", err)
	}
	if err := validContainerID(st.ID); err != nil {
		return nil, fmt.Errorf("hook state: %w", err)
	}
	return &st, nil
}

// validContainerID refuses ids that cannot name a file in the run dir.
func validContainerID(id string) error {
	if id == "" || id == "." || id == ".." || len(id) > 1024 {
		return fmt.Errorf("invalid container id %q", id)
	}
	for _, r := range id {
		if r == '/' || r == 0 {
			return fmt.Errorf("invalid container id %q", id)
		}
	}
	return nil
}

// HookStage returns the stage to run: the stage argument when given, else
// the one the state implies (a pid means the container is being created;
// none, or status "stopped", that it is gone).
func HookStage(arg string, st *specs.State) (string, error) {
	switch arg {
	case StageCreateRuntime, "prestart", "poststart":
		return StageCreateRuntime, nil
	case StagePoststop:
		return StagePoststop, nil
	case "createContainer", "startContainer":
		return "", fmt.Errorf("stage %s runs inside the container; register seamless-hook for %s and %s", arg, StageCreateRuntime, StagePoststop)
	case "":
		if st.Pid > 0 && st.Status != specs.StateStopped {
			return StageCreateRuntime, nil
		}
		return StagePoststop, nil
	}
	return "", fmt.Errorf("unknown hook stage %q (want %s or %s)", arg, StageCreateRuntime, StagePoststop)
}

// ShimConfigFromOCIState builds the shim config of a container from the state
// a createRuntime hook receives. Without runc's state.json, the rootfs comes
// from the bundle's spec (root.path, relative to the bundle or absolute), the
// cgroups from /proc/<pid>/cgroup and the init's start time from
// /proc/<pid>/stat.
func ShimConfigFromOCIState(st *specs.State, dirs config.Dirs) (*shim.Config, error) {
	if st.Pid <= 0 {
		return nil, fmt.Errorf("container %s: hook state has no pid", st.ID)
	}
	if !filepath.IsAbs(st.Bundle) {
		return nil, fmt.Errorf("container %s: bundle %q is not an absolute path", st.ID, st.Bundle)
	}
	spec, err := loadSpec(st.Bundle)
	if err != nil {
		return nil, fmt.Errorf("container %s: %w", st.ID, err)
	}
	rootfs, err := rootfsOf(spec, st.Bundle)
	if err != nil {
		return nil, fmt.Errorf("container %s: %w", st.ID, err)
	}
	start, err := shim.ProcessStartTime(st.Pid)
	if err != nil {
		return nil, fmt.Errorf("container %s: init pid %d: %w", st.ID, st.Pid, err)
	}
	cgroups, err := freezer.PathsForPID(st.Pid)
	if err != nil {
		return nil, fmt.Errorf("container %s: %w", st.ID, err)
	}
	ann := st.Annotations
	if len(ann) == 0 {
		ann = spec.Annotations
	}
	cfg := &shim.Config{
		ContainerID: st.ID, Bundle: st.Bundle,
		InitPID: st.Pid, InitStart: start, Rootfs: rootfs,
		CgroupPaths: cgroups, Annotations: ann,
		Freezer:  freezerChoice(ann),
		StateDir: dirs.State, RunDir: dirs.Run,
	}
	// The hook's parent is runc; runc's parent is containerd's shim, if any.
	var shimPID int
	if runcPID := os.Getppid(); runcPID > 1 {
		shimPID, _ = baseimage.ParentPID(runcPID)
	}
	detectEngine(cfg, spec, engineHints{shimPID: shimPID})
	return cfg, nil
}

// OCIHook is seamless-hook: an OCI hook that starts a container's shim at
// createRuntime and stops it at poststop. Starting is idempotent with the
// seamless-runc wrapper: a second shim for the same container finds the
// first one's socket and exits.
type OCIHook struct {
	// Exe is the binary re-executed as the shim (and, by it, the uploader).
	Exe string
	// Dirs are seamless's state and run dirs.
	Dirs config.Dirs
	// StartTimeout bounds the wait for the shim to listen; StopTimeout the
	// wait for it to exit.
	StartTimeout, StopTimeout time.Duration
}

// Run serves one hook invocation. A shim that cannot be started does not
// fail the container: Run logs why to <run-dir>/<id>.log and returns nil.
// Errors are for invocations that make no sense (unknown stage).
func (h OCIHook) Run(stage string, st *specs.State) error {
	stage, err := HookStage(stage, st)
	if err != nil {
		return err
	}
	switch stage {
	case StageCreateRuntime:
		if err := h.start(st); err != nil {
			h.warn(st.ID, fmt.Errorf("no snapshots for this container: %w", err))
		}
	case StagePoststop:
		if err := StopShim(h.Dirs, st.ID, h.stopTimeout()); err != nil {
			h.warn(st.ID, err)
			return nil
		}
		if err := os.Remove(filepath.Join(h.Dirs.Run, st.ID+".log")); err != nil && !errors.Is(err, os.ErrNotExist) {
			h.warn(st.ID, fmt.Errorf("remove shim log: %w", err))
		}
	}
	return nil
}

func (h OCIHook) start(st *specs.State) error {
	cfg, err := ShimConfigFromOCIState(st, h.Dirs)
	if err != nil {
		return err
	}
	timeout := h.StartTimeout
	if timeout <= 0 {
		timeout = 5 * time.Second
	}
	_, err = StartShim(h.Exe, cfg, timeout)
	return err
}

func (h OCIHook) stopTimeout() time.Duration {
	if h.StopTimeout > 0 {
		return h.StopTimeout
	}
	return 5 * time.Second
}

// warn appends a line to the container's shim log (and stderr, which the
// engine may show or drop).
func (h OCIHook) warn(id string, err error) {
	line := fmt.Sprintf("%s seamless-hook: %v\n", time.Now().UTC().Format(time.RFC3339Nano), err)
	fmt.Fprint(os.Stderr, line)
	if h.Dirs.Run == "" || validContainerID(id) != nil {
		return
	}
	if err := os.MkdirAll(h.Dirs.Run, 0o700); err != nil {
		return
	}
	f, ferr := os.OpenFile(filepath.Join(h.Dirs.Run, id+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if ferr != nil {
		return
	}
	defer f.Close()
	f.WriteString(line)
}
