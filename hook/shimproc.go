package hook

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/seamless-snapshot/seamless/config"
	"github.com/seamless-snapshot/seamless/shim"
	"github.com/seamless-snapshot/seamless/uploader"
	"github.com/seamless-snapshot/seamless/watchdog"
)

// runcState is the part of runc's <root>/<id>/state.json that seamless reads.
type runcState struct {
	ID        string `json:"id"`
	InitPID   int    `json:"init_process_pid"`
	InitStart uint64 `json:"init_process_start"`
	Config    struct {
		Rootfs string   `json:"rootfs"`
		Labels []string `json:"labels"`
	} `json:"config"`
	CgroupPaths map[string]string `json:"cgroup_paths"`
}

func loadRuncState(root, id string) (*runcState, error) {
	if id == "" || strings.ContainsAny(id, "/\x00") || id == "." || id == ".." {
		return nil, fmt.Errorf("invalid container id %q", id)
	}
	path := filepath.Join(root, id, "state.json")
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("runc state of %s: %w", id, err)
	}
	var st runcState
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("decode %s: %w", path, err)
	}
	return &st, nil
}

func (s *runcState) bundle() string {
	for _, l := range s.Config.Labels {
		if v, ok := strings.CutPrefix(l, "bundle="); ok {
			return v
		}
	}
	return ""
}

// ShimConfigFromRunc builds the shim config of a container runc has just
// created, from runc's state and the bundle's spec. The containerd address
// and namespace come from the calling runc v2 shim (or CONTAINERD_ADDRESS);
// the engine is detected as for the OCI hook (detectEngine).
func ShimConfigFromRunc(call *RuncCall, dirs config.Dirs) (*shim.Config, error) {
	st, err := loadRuncState(call.Root, call.ContainerID)
	if err != nil {
		return nil, err
	}
	bundle := st.bundle()
	if bundle == "" {
		bundle = call.Bundle
	}
	spec, err := loadSpec(bundle)
	if err != nil {
		return nil, fmt.Errorf("container %s: %w", call.ContainerID, err)
	}
	ann := spec.Annotations
	cfg := &shim.Config{
		ContainerID: call.ContainerID, Bundle: bundle, RuncRoot: call.Root,
		InitPID: st.InitPID, InitStart: st.InitStart, Rootfs: st.Config.Rootfs,
		CgroupPaths: st.CgroupPaths, Annotations: ann,
		Freezer:  freezerChoice(ann),
		StateDir: dirs.State, RunDir: dirs.Run,
	}
	detectEngine(cfg, spec, engineHints{runcRoot: call.Root, shimPID: os.Getppid()})
	return cfg, nil
}

// EnvFreezer ("v1" or "v2") picks the freezer for every container; the
// io.seamless.freezer annotation overrides it per container.
const EnvFreezer = "SEAMLESS_FREEZER"

func freezerChoice(ann map[string]string) string {
	if v := ann[shim.AnnotationFreezer]; v != "" {
		return v
	}
	return os.Getenv(EnvFreezer)
}

// StartShim starts the shim for cfg, under its thaw watchdog, as a detached
// process tree (new session, stdio on /dev/null, no fd of the caller) and
// waits until the shim listens or fails. It returns the watchdog's pid; the
// watchdog (argv[0] "seamless-watchdog") is the shim's parent, thaws the
// container if the shim dies while it is frozen, and restarts the shim.
func StartShim(exe string, cfg *shim.Config, timeout time.Duration) (pid int, err error) {
	args, err := watchdogArgs(exe, cfg)
	if err != nil {
		return 0, err
	}
	r, w, err := os.Pipe()
	if err != nil {
		return 0, fmt.Errorf("start shim: %w", err)
	}
	defer r.Close()
	devnull, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		w.Close()
		return 0, fmt.Errorf("start shim: %w", err)
	}
	defer devnull.Close()
	cmd := exec.Command(exe, args...)
	cmd.Args[0] = "seamless-watchdog"
	cmd.Env = append(os.Environ(), uploader.EnvRole+"="+watchdog.Role, shim.EnvReadyFD+"=3")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = devnull, devnull, devnull
	cmd.ExtraFiles = []*os.File{w}
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	err = cmd.Start()
	w.Close()
	if err != nil {
		return 0, fmt.Errorf("start shim for %s: %w", cfg.ContainerID, err)
	}
	pid = cmd.Process.Pid
	cmd.Process.Release()

	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(r).ReadString('\n')
		line <- strings.TrimSpace(s)
	}()
	select {
	case s := <-line:
		if strings.HasPrefix(s, "ready") {
			return pid, nil
		}
		if s == "" {
			s = "exited without a word"
		}
		return pid, fmt.Errorf("shim for %s: %s", cfg.ContainerID, strings.TrimPrefix(s, "error: "))
	case <-time.After(timeout):
		return pid, fmt.Errorf("shim for %s: not ready after %v", cfg.ContainerID, timeout)
	}
}

// watchdogArgs is the watchdog's command line (after argv[0]) for the shim
// of cfg: the watchdog runs exe as "seamless-shim CONFIG" and logs next to it.
func watchdogArgs(exe string, cfg *shim.Config) ([]string, error) {
	arg, err := cfg.Encode()
	if err != nil {
		return nil, err
	}
	wcfg := &watchdog.Config{
		ContainerID: cfg.ContainerID, InitPID: cfg.InitPID, InitStart: cfg.InitStart,
		CgroupPaths: cfg.CgroupPaths, ReadyEnv: shim.EnvReadyFD,
		ChildEnv: []string{uploader.EnvRole + "=" + shim.RoleShim},
	}
	if cfg.RunDir != "" && cfg.ContainerID != "" {
		wcfg.LogPath = filepath.Join(cfg.RunDir, cfg.ContainerID+".log")
	}
	return watchdog.Args(wcfg, watchdog.Child{Path: exe, Args: []string{"seamless-shim", arg}})
}

// StopShim asks the shim of container id to stop (SIGTERM), after checking
// that the pid in its info file still belongs to a seamless shim, and waits
// up to timeout for it to exit. A missing shim is not an error.
func StopShim(dirs config.Dirs, id string, timeout time.Duration) error {
	b, err := os.ReadFile(dirs.ShimInfo(id))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("stop shim of %s: %w", id, err)
	}
	var info shim.Info
	if err := json.Unmarshal(b, &info); err != nil {
		return fmt.Errorf("stop shim of %s: decode info: %w", id, err)
	}
	if info.ShimPID <= 0 || !isShim(info.ShimPID) {
		os.Remove(dirs.ShimInfo(id))
		os.Remove(dirs.Socket(id))
		return nil
	}
	if err := syscall.Kill(info.ShimPID, syscall.SIGTERM); err != nil {
		return nil
	}
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if !isShim(info.ShimPID) {
			return nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return fmt.Errorf("stop shim of %s: pid %d still running after %v", id, info.ShimPID, timeout)
}

// isShim reports whether pid is a live seamless shim (argv[0] "seamless-shim").
func isShim(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	argv0, _, _ := strings.Cut(string(b), "\x00")
	if argv0 != "seamless-shim" {
		return false
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	return err == nil && !strings.Contains(string(stat), ") Z ")
}
