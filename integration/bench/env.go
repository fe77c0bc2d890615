package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/seamless-snapshot/seamless/config"
	"github.com/seamless-snapshot/seamless/integration/bench/contract"
	"github.com/seamless-snapshot/seamless/integration/testenv"
	"github.com/seamless-snapshot/seamless/shim"
)

// Filesystems an environment can live on.
const (
	fsExt4 = "ext4" // the root filesystem (/tmp)
	fsXFS  = "xfs"  // a loop-mounted XFS image with reflink
)

const (
	// benchDirPattern names the bench's work dirs in /tmp.
	benchDirPattern = "sl-bench-*"
	// ownerFile records which process owns a work dir.
	ownerFile = "owner.json"
	// imageName is the image every bench container runs.
	imageName = "localhost/seamless-bench:1.0"
	// xfsImageSize is the sparse size of the XFS loop image.
	xfsImageSize = 16 << 30
)

// bench is one run: its work dir, the binaries it built and the
// environments it started.
type bench struct {
	opts  Options
	dir   string // /tmp/sl-bench-XXXX
	bin   string // seamless, seamless-runc, testbin (static)
	clock contract.Clock

	mu   sync.Mutex
	envs []*Env // started and not yet stopped
}

// Env is one stack on one filesystem: containerd (runc through
// seamless-runc), a registry, the bench image, seamless's directories and a
// scratch dir for the strategies' temporary captures, all on FS.
type Env struct {
	FS      string
	Opts    Options
	Dir     string
	Bin     string
	Dirs    config.Dirs
	Ctd     *testenv.Containerd
	Reg     *testenv.Registry
	Scratch string
	Clock   contract.Clock

	xfs      *xfsMount
	pushOnce sync.Once
}

// owner identifies the process that owns a work dir.
type owner struct {
	PID   int    `json:"pid"`
	Start uint64 `json:"start"`
}

// newBench cleans up what killed runs left, creates the work dir and builds
// the binaries.
func newBench(ctx context.Context, opts Options) (*bench, error) {
	if err := testenv.Prereqs(); err != nil {
		return nil, fmt.Errorf("%w (run 'make deps' as root)", err)
	}
	cleanStale()
	dir, err := os.MkdirTemp("", "sl-bench-")
	if err != nil {
		return nil, fmt.Errorf("work dir: %w", err)
	}
	b := &bench{opts: opts, dir: dir, bin: filepath.Join(dir, "bin"), clock: contract.NewClock()}
	if err := writeOwner(dir); err != nil {
		return nil, errors.Join(err, b.Close())
	}
	logf("work dir %s; building seamless, seamless-runc and testbin (static)", dir)
	if err := buildBinaries(ctx, b.bin); err != nil {
		return nil, errors.Join(err, b.Close())
	}
	return b, nil
}

func writeOwner(dir string) error {
	start, err := shim.ProcessStartTime(os.Getpid())
	if err != nil {
		return fmt.Errorf("own start time: %w", err)
	}
	data, err := json.Marshal(owner{PID: os.Getpid(), Start: start})
	if err != nil {
		return fmt.Errorf("encode owner: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, ownerFile), data, 0o644); err != nil {
		return fmt.Errorf("write owner: %w", err)
	}
	return nil
}

// ownerAlive reports whether the process recorded in dir still runs.
func ownerAlive(dir string) bool {
	data, err := os.ReadFile(filepath.Join(dir, ownerFile))
	if err != nil {
		return false
	}
	var o owner
	if json.Unmarshal(data, &o) != nil {
		return false
	}
	start, err := shim.ProcessStartTime(o.PID)
	return err == nil && start == o.Start && testenv.ProcessAlive(o.PID)
}

// cleanStale tears down what runs killed before their clean-up left: testenv
// instances in /tmp and in dead benches' work dirs, their XFS mounts, and
// the dirs themselves. Live runs (other users') are left alone.
func cleanStale() {
	if cleaned, err := testenv.CleanStale(""); err != nil {
		logf("clean stale testenv instances: %v", err)
	} else if len(cleaned) > 0 {
		logf("cleaned stale testenv instances: %v", cleaned)
	}
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), benchDirPattern))
	for _, dir := range dirs {
		if ownerAlive(dir) {
			continue
		}
		if err := cleanStaleDir(dir); err != nil {
			logf("clean stale bench dir %s: %v", dir, err)
			continue
		}
		logf("cleaned stale bench dir %s", dir)
	}
}

func cleanStaleDir(dir string) error {
	var errs []error
	for _, sub := range []string{filepath.Join(dir, fsExt4), filepath.Join(dir, fsXFS)} {
		if _, err := testenv.CleanStale(sub); err != nil {
			errs = append(errs, err)
		}
	}
	if err := killOurProcesses(filepath.Join(dir, "bin")); err != nil {
		logf("%v", err) // orphaned shims or uploaders of the dead run
	}
	errs = append(errs, (&xfsMount{dir: filepath.Join(dir, fsXFS), img: filepath.Join(dir, "xfs.img")}).unmount())
	errs = append(errs, removeUnlessMounted(dir))
	return errors.Join(errs...)
}

// removeUnlessMounted deletes dir unless something is still mounted in it.
func removeUnlessMounted(dir string) error {
	if left, err := testenv.MountsUnder(dir); err != nil || len(left) > 0 {
		return fmt.Errorf("not removing %s: mounts left %v (%v)", dir, left, err)
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove %s: %w", dir, err)
	}
	return nil
}

// buildBinaries builds the seamless binaries and testbin, static, into dir,
// from the module the working directory belongs to.
func buildBinaries(ctx context.Context, dir string) error {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	gomod := strings.TrimSpace(string(out))
	if err != nil || gomod == "" || gomod == os.DevNull {
		return fmt.Errorf("find the seamless module (run from the repository): go env GOMOD: %q %v", gomod, err)
	}
	cmd := exec.CommandContext(ctx, "go", "build", "-o", dir+"/", "./cmd/seamless", "./cmd/seamless-runc", "./integration/testbin")
	cmd.Dir = filepath.Dir(gomod)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build: %w\n%s", err, out)
	}
	return nil
}

// startEnv starts the stack for fsKind: for XFS first the loop mount.
func (b *bench) startEnv(ctx context.Context, fsKind string) (*Env, error) {
	env := &Env{FS: fsKind, Opts: b.opts, Dir: filepath.Join(b.dir, fsKind), Bin: b.bin, Clock: b.clock}
	b.mu.Lock()
	b.envs = append(b.envs, env)
	b.mu.Unlock()
	if err := env.start(ctx, b.dir); err != nil {
		return nil, errors.Join(fmt.Errorf("start %s environment: %w", fsKind, err), b.stopEnv(env))
	}
	return env, nil
}

func (e *Env) start(ctx context.Context, benchDir string) error {
	if e.FS == fsXFS {
		m, err := mountXFS(ctx, filepath.Join(benchDir, "xfs.img"), e.Dir, xfsImageSize)
		if err != nil {
			return err
		}
		e.xfs = m
	} else if err := os.MkdirAll(e.Dir, 0o755); err != nil {
		return err
	}
	e.Dirs = config.Dirs{State: filepath.Join(e.Dir, "state"), Run: filepath.Join(e.Dir, "run")}
	e.Scratch = filepath.Join(e.Dir, "scratch")
	if err := os.MkdirAll(e.Scratch, 0o700); err != nil {
		return err
	}
	logf("[%s] starting containerd and a registry in %s", e.FS, e.Dir)
	var err error
	e.Ctd, err = testenv.StartContainerd(ctx, testenv.ContainerdOptions{Dir: e.Dir, Env: []string{
		config.EnvStateDir + "=" + e.Dirs.State,
		config.EnvRunDir + "=" + e.Dirs.Run,
	}})
	if err != nil {
		return err
	}
	if e.Reg, err = testenv.StartRegistry(ctx, testenv.RegistryOptions{Dir: e.Dir}); err != nil {
		return err
	}
	img, err := testenv.BuildImage(ctx, e.Dir, imageName, map[string]testenv.FileSpec{
		"/usr/bin/testbin": {Mode: 0o755, Source: filepath.Join(e.Bin, "testbin")},
	})
	if err != nil {
		return err
	}
	return e.Ctd.ImportImage(ctx, img.Archive)
}

// stopEnv tears env down and reports anything the run left behind:
// frozen cgroups, processes of our binaries, mounts.
func (b *bench) stopEnv(env *Env) error {
	b.mu.Lock()
	for i, e := range b.envs {
		if e == env {
			b.envs = append(b.envs[:i], b.envs[i+1:]...)
			break
		}
	}
	b.mu.Unlock()
	return env.stop()
}

func (e *Env) stop() error {
	var errs []error
	if e.Ctd != nil {
		if err := testenv.CheckNoFrozenCgroups(e.Ctd.CgroupParent); err != nil {
			errs = append(errs, fmt.Errorf("left frozen: %w", err))
		}
	}
	if e.Reg != nil {
		errs = append(errs, e.Reg.Close())
	}
	if e.Ctd != nil {
		errs = append(errs, e.Ctd.Close())
	}
	errs = append(errs, killOurProcesses(e.Bin))
	if e.xfs != nil {
		errs = append(errs, e.xfs.unmount())
	}
	errs = append(errs, removeUnlessMounted(e.Dir))
	return errors.Join(errs...)
}

// Close stops every environment still running, checks that no process of
// our binaries is left and removes the work dir.
func (b *bench) Close() error {
	b.mu.Lock()
	envs := b.envs
	b.envs = nil
	b.mu.Unlock()
	var errs []error
	for _, e := range envs {
		errs = append(errs, e.stop())
	}
	errs = append(errs, killOurProcesses(b.bin))
	errs = append(errs, (&xfsMount{dir: filepath.Join(b.dir, fsXFS), img: filepath.Join(b.dir, "xfs.img")}).unmount())
	errs = append(errs, removeUnlessMounted(b.dir))
	return errors.Join(errs...)
}

// killOurProcesses kills, by pid, processes still running one of our
// binaries (shims, uploaders) and reports them: a clean run leaves none.
func killOurProcesses(bin string) error {
	pids := testenv.ProcessesOf(bin)
	if len(pids) == 0 {
		return nil
	}
	for _, pid := range pids {
		if p, err := os.FindProcess(pid); err == nil {
			p.Kill()
		}
	}
	return fmt.Errorf("processes of %s were left running (killed): %v", bin, pids)
}

// claimPush returns true once per environment: the first seamless snapshot
// is pushed to the registry and awaited, proving the whole path works.
func (e *Env) claimPush() bool {
	first := false
	e.pushOnce.Do(func() { first = true })
	return first
}

// waitFor polls cond every interval until it holds or timeout passes.
func waitFor(ctx context.Context, timeout, interval time.Duration, cond func() (bool, error)) error {
	deadline := time.Now().Add(timeout)
	for {
		done, err := cond()
		if done || err != nil {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not done after %v", timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(interval):
		}
	}
}
