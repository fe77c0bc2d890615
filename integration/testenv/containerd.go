package testenv

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// DefaultNamespace is the containerd namespace used unless overridden.
const DefaultNamespace = "default"

// maxSocketPath is the longest usable unix socket path (sun_path is 108 bytes).
const maxSocketPath = 107

// ContainerdOptions configures StartContainerd.
type ContainerdOptions struct {
	// Dir is where the instance's temp dir is created; default /tmp. Keep it
	// short: the sockets live inside and unix socket paths are limited.
	Dir string
	// Env is extra environment (KEY=VALUE) for containerd; it reaches the runc
	// v2 shim and from there the runc binary (or wrapper).
	Env []string
	// Namespace is the namespace used by Ctr, Run and friends; default "default".
	Namespace string
	// LogLevel is containerd's log level; default "info".
	LogLevel string
	// StartTimeout bounds the wait for the API; default 30s.
	StartTimeout time.Duration
	// CRI, when set, enables the CRI plugin (see cri.go); Namespace then
	// defaults to "k8s.io".
	CRI *CRIOptions
}

// Containerd is an isolated containerd started by StartContainerd.
type Containerd struct {
	// Address is the grpc socket.
	Address string
	// Dir is the instance's private directory (removed by Close).
	Dir string
	// Root and State are containerd's root and state dirs.
	Root, State string
	// RuncRoot is the runc state root passed with ctr run --runc-root; runc
	// keeps <RuncRoot>/<namespace>/<id>/state.json.
	RuncRoot string
	// FifoDir holds ctr's stdio fifos (--fifo-dir).
	FifoDir string
	// LogDir holds the containers' stdout/stderr logs (<id>.log).
	LogDir string
	// LogPath is containerd's own log.
	LogPath string
	// Namespace is the containerd namespace used by the helpers.
	Namespace string
	// CgroupParent (e.g. "/seamless-test-1a2b3c4d") is unique to this
	// instance; Run places containers at <CgroupParent>/<id>.
	CgroupParent string
	// PID is containerd's process id.
	PID int

	d        *daemon
	pidStart uint64 // guards PID reuse when stopping a recorded PID
	// runDirsCreated are the shim run dirs missing at start (rmdir'd by
	// Close when empty and no containerd runs any more).
	runDirsCreated []string
	execSeq        atomic.Uint64
	closed         atomic.Bool
	closeOnce      sync.Once
	closeErr       error
}

// StartContainerd starts an isolated containerd and waits until its API
// answers. Call Close to tear it down with everything it started.
func StartContainerd(ctx context.Context, opts ContainerdOptions) (*Containerd, error) {
	base := opts.Dir
	if base == "" {
		base = "/tmp"
	}
	dir, err := os.MkdirTemp(base, "sl-ctd-")
	if err != nil {
		return nil, fmt.Errorf("containerd dir: %w", err)
	}
	c, err := newContainerd(dir, opts)
	if err == nil {
		err = c.start(ctx, opts)
	}
	if err != nil {
		if c != nil {
			return nil, errors.Join(fmt.Errorf("start containerd: %w", err), c.Close())
		}
		return nil, errors.Join(fmt.Errorf("start containerd: %w", err), os.RemoveAll(dir))
	}
	return c, nil
}

// newContainerd lays out the instance dir and writes the config.
func newContainerd(dir string, opts ContainerdOptions) (*Containerd, error) {
	suffix, err := randomHex(4)
	if err != nil {
		return nil, err
	}
	c := containerdLayout(dir)
	c.Namespace = opts.Namespace
	c.CgroupParent = "/seamless-test-" + suffix
	c.runDirsCreated = missingDirs(shimSocketDir, shimRunDir)
	if c.Namespace == "" && opts.CRI != nil {
		c.Namespace = CRINamespace
	}
	if c.Namespace == "" {
		c.Namespace = DefaultNamespace
	}
	if n := len(c.Address + ".ttrpc"); n > maxSocketPath {
		return nil, fmt.Errorf("socket path %s.ttrpc is %d bytes, limit %d: use a shorter Dir", c.Address, n, maxSocketPath)
	}
	for _, d := range []string{c.Root, c.State, c.RuncRoot, c.FifoDir, c.LogDir, c.optDir()} {
		if err := os.MkdirAll(d, 0o711); err != nil {
			return nil, fmt.Errorf("mkdir: %w", err)
		}
	}
	level := opts.LogLevel
	if level == "" {
		level = "info"
	}
	text := c.config(level)
	if opts.CRI != nil {
		text = c.criConfig(level, opts.CRI)
	}
	if err := os.WriteFile(c.configPath(), []byte(text), 0o644); err != nil {
		return nil, fmt.Errorf("write config: %w", err)
	}
	return c, nil
}

// containerdLayout returns an instance with every path derived from dir.
func containerdLayout(dir string) *Containerd {
	return &Containerd{
		Address:  filepath.Join(dir, "containerd.sock"),
		Dir:      dir,
		Root:     filepath.Join(dir, "root"),
		State:    filepath.Join(dir, "state"),
		RuncRoot: filepath.Join(dir, "runc"),
		FifoDir:  filepath.Join(dir, "fifo"),
		LogDir:   filepath.Join(dir, "logs"),
		LogPath:  filepath.Join(dir, "containerd.log"),
	}
}

func (c *Containerd) configPath() string { return filepath.Join(c.Dir, "containerd.toml") }
func (c *Containerd) optDir() string     { return filepath.Join(c.Dir, "opt") }

// config renders containerd's TOML config, CRI plugin disabled.
func (c *Containerd) config(level string) string {
	return c.baseConfig(level, `  "io.containerd.grpc.v1.cri",
`)
}

// baseConfig renders the config every instance shares: its own root, state,
// sockets and opt dir; extraDisabled lists more disabled plugins (quoted,
// one per line, indented, each followed by a comma). Plugin sections may be
// appended after it.
func (c *Containerd) baseConfig(level, extraDisabled string) string {
	return fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = [
%s  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
]

[grpc]
  address = %q

[ttrpc]
  address = %q

[debug]
  address = %q
  level = %q

[metrics]
  address = ""

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = %q
`, c.Root, c.State, extraDisabled, c.Address, c.Address+".ttrpc", filepath.Join(c.Dir, "debug.sock"), level, c.optDir())
}

// start launches containerd and waits for `ctr version` to answer.
func (c *Containerd) start(ctx context.Context, opts ContainerdOptions) error {
	d, err := startDaemon("containerd", []string{"--config", c.configPath()}, opts.Env, c.LogPath)
	if err != nil {
		return err
	}
	c.d, c.PID = d, d.pid()
	c.pidStart = processStartTime(c.PID)
	if err := writeRecord(c.Dir, c.record()); err != nil {
		return err
	}
	timeout := opts.StartTimeout
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	return d.waitReady(ctx, timeout, func(ctx context.Context) error {
		_, err := c.Ctr(ctx, "version")
		return err
	})
}

func randomHex(n int) (string, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("random: %w", err)
	}
	return hex.EncodeToString(b), nil
}

// Ctr runs `ctr -a Address -n Namespace args...` and returns its combined
// output; the error includes the output.
func (c *Containerd) Ctr(ctx context.Context, args ...string) ([]byte, error) {
	return c.ctrNS(ctx, c.Namespace, args...)
}

func (c *Containerd) ctrNS(ctx context.Context, ns string, args ...string) ([]byte, error) {
	full := append([]string{"-a", c.Address, "-n", ns}, args...)
	cmd := exec.CommandContext(ctx, "ctr", full...)
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("ctr %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return out, nil
}

// RunOptions describes a detached container for Containerd.Run.
type RunOptions struct {
	// Image is the image reference (must already be in the content store).
	Image string
	// ID is the container id (also its snapshot key).
	ID string
	// Args is the command; empty uses the image's default.
	Args []string
	// RuncBinary replaces runc (e.g. a wrapper); empty uses runc from PATH.
	RuncBinary string
	// Cgroup overrides the cgroup path; default <CgroupParent>/<ID>. Paths
	// outside CgroupParent are not removed by Close.
	Cgroup string
	// Annotations are OCI annotations written to config.json (ctr --annotation).
	Annotations map[string]string
	// Labels are containerd container labels (ctr --label).
	Labels map[string]string
	// Env is extra process environment (KEY=VALUE).
	Env []string
	// ExtraFlags are passed to ctr run before the image.
	ExtraFlags []string
}

// Run starts a detached container with the runc v2 shim. Its stdout and
// stderr go to ContainerLog(ID).
func (c *Containerd) Run(ctx context.Context, o RunOptions) error {
	if o.Image == "" || o.ID == "" {
		return errors.New("run: Image and ID are required")
	}
	args := []string{"run", "-d", "--runtime", "io.containerd.runc.v2",
		"--runc-root", c.RuncRoot, "--fifo-dir", c.FifoDir,
		"--log-uri", "file://" + c.ContainerLog(o.ID)}
	if o.RuncBinary != "" {
		args = append(args, "--runc-binary", o.RuncBinary)
	}
	cg := o.Cgroup
	if cg == "" {
		cg = c.CgroupParent + "/" + o.ID
	}
	args = append(args, "--cgroup", cg)
	args = append(args, keyValueFlags("--annotation", o.Annotations)...)
	args = append(args, keyValueFlags("--label", o.Labels)...)
	for _, e := range o.Env {
		args = append(args, "--env", e)
	}
	args = append(args, o.ExtraFlags...)
	args = append(args, o.Image, o.ID)
	args = append(args, o.Args...)
	if _, err := c.Ctr(ctx, args...); err != nil {
		if strings.Contains(err.Error(), "already exists") {
			return fmt.Errorf("run %s: %w", o.ID, err) // not ours to remove
		}
		// A failed ctr run can leave the container (and its snapshot) behind.
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		return errors.Join(fmt.Errorf("run %s: %w", o.ID, err), c.Remove(rctx, o.ID))
	}
	return nil
}

// keyValueFlags renders a map as repeated `flag k=v`, sorted by key.
func keyValueFlags(flag string, m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var out []string
	for _, k := range keys {
		out = append(out, flag, k+"="+m[k])
	}
	return out
}

// ContainerLog is the file receiving the container's stdout and stderr.
func (c *Containerd) ContainerLog(id string) string {
	return filepath.Join(c.LogDir, id+".log")
}

// Exec runs args in the running container id and returns the combined
// output. It refuses to exec into a frozen container (that can wedge the
// shim).
func (c *Containerd) Exec(ctx context.Context, id string, args ...string) ([]byte, error) {
	if len(args) == 0 {
		return nil, errors.New("exec: no command")
	}
	frozen, err := c.Frozen(id)
	if err != nil {
		return nil, fmt.Errorf("exec %s: %w", id, err)
	}
	if frozen {
		return nil, fmt.Errorf("exec %s: container is frozen", id)
	}
	execID := fmt.Sprintf("exec-%d-%d", os.Getpid(), c.execSeq.Add(1))
	full := append([]string{"task", "exec", "--exec-id", execID, "--fifo-dir", c.FifoDir, id}, args...)
	return c.Ctr(ctx, full...)
}

// Kill sends SIGKILL to every process of the task id (thawing it first).
func (c *Containerd) Kill(ctx context.Context, id string) error {
	return c.killIn(ctx, c.Namespace, id)
}

func (c *Containerd) killIn(ctx context.Context, ns, id string) error {
	// A v1-frozen task cannot die; resume it through containerd when it was
	// paused there, then thaw the cgroups directly in case it was not.
	_, _ = c.ctrNS(ctx, ns, "task", "resume", id)
	thawErr := c.thawIn(ns, id)
	_, err := c.ctrNS(ctx, ns, "task", "kill", "-a", "-s", "SIGKILL", id)
	if err != nil && !isNotFound(err) {
		return errors.Join(fmt.Errorf("kill %s: %w", id, err), thawErr)
	}
	return nil
}

// Remove kills the task id, deletes it and deletes the container with its
// snapshot. Missing tasks or containers are not an error.
func (c *Containerd) Remove(ctx context.Context, id string) error {
	return c.removeIn(ctx, c.Namespace, id)
}

func (c *Containerd) removeIn(ctx context.Context, ns, id string) error {
	killErr := c.killIn(ctx, ns, id)
	if _, err := c.ctrNS(ctx, ns, "task", "rm", "-f", id); err != nil && !isNotFound(err) {
		return errors.Join(fmt.Errorf("task rm %s: %w", id, err), killErr)
	}
	if _, err := c.ctrNS(ctx, ns, "containers", "rm", id); err != nil && !isNotFound(err) {
		return fmt.Errorf("container rm %s: %w", id, err)
	}
	return nil
}

func isNotFound(err error) bool {
	s := err.Error()
	return strings.Contains(s, "not found") || strings.Contains(s, "no such")
}

// ImportImage imports an OCI or docker archive (ctr images import) and
// unpacks it.
func (c *Containerd) ImportImage(ctx context.Context, archive string) error {
	if _, err := c.Ctr(ctx, "images", "import", archive); err != nil {
		return fmt.Errorf("import %s: %w", archive, err)
	}
	return nil
}

// Pull pulls ref (ctr images pull), over plain HTTP if plainHTTP.
func (c *Containerd) Pull(ctx context.Context, ref string, plainHTTP bool) error {
	return c.remoteOp(ctx, "pull", ref, plainHTTP)
}

// Push pushes ref (ctr images push), over plain HTTP if plainHTTP.
func (c *Containerd) Push(ctx context.Context, ref string, plainHTTP bool) error {
	return c.remoteOp(ctx, "push", ref, plainHTTP)
}

func (c *Containerd) remoteOp(ctx context.Context, op, ref string, plainHTTP bool) error {
	args := []string{"images", op}
	if plainHTTP {
		args = append(args, "--plain-http")
	}
	if _, err := c.Ctr(ctx, append(args, ref)...); err != nil {
		return fmt.Errorf("%s %s: %w", op, ref, err)
	}
	return nil
}

// Tag gives image src the additional name dst (ctr images tag --force).
func (c *Containerd) Tag(ctx context.Context, src, dst string) error {
	if _, err := c.Ctr(ctx, "images", "tag", "--force", src, dst); err != nil {
		return fmt.Errorf("tag %s %s: %w", src, dst, err)
	}
	return nil
}

// Bundle is the runc bundle dir of container id (config.json, rootfs/).
func (c *Containerd) Bundle(id string) string {
	return c.bundleIn(c.Namespace, id)
}

func (c *Containerd) bundleIn(ns, id string) string {
	return filepath.Join(c.State, "io.containerd.runtime.v2.task", ns, id)
}

// RootfsOverlay returns the overlay mounted at the container's rootfs.
func (c *Containerd) RootfsOverlay(id string) (*Overlay, error) {
	return OverlayAt(filepath.Join(c.Bundle(id), "rootfs"))
}
