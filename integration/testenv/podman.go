package testenv

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// podmanRuncRoot is where runc keeps podman's containers (podman passes
// runc no --root).
const podmanRuncRoot = "/run/runc"

// PodmanOptions configures NewPodman.
type PodmanOptions struct {
	// Dir is where the instance's temp dir is created; default /tmp.
	Dir string
	// Hooks are OCI hook files (name -> JSON content) for the hooks dir.
	Hooks map[string]string
	// ExtraConf is appended to containers.conf (e.g. [engine.runtimes]).
	ExtraConf string
}

// Podman is an isolated podman configuration: its own containers.conf and
// storage.conf (graph root, run root, tmp dir, events, hooks dir) under Dir,
// cgroupfs with every container under CgroupParent, no network. Podman has
// no daemon: Run invokes the CLI with CONTAINERS_CONF and
// CONTAINERS_STORAGE_CONF set (never run podman without them: it would
// create host-wide state). One host path remains shared: podman 4.3 keeps
// its blob info cache in /var/lib/containers/cache whatever the config.
type Podman struct {
	// Dir holds everything (removed by Close).
	Dir string
	// Conf and StorageConf are the two config files.
	Conf, StorageConf string
	// GraphRoot and RunRoot are the storage's dirs.
	GraphRoot, RunRoot string
	// HooksDir is the OCI hooks dir.
	HooksDir string
	// CgroupParent ("/seamless-podman-<hex>") holds every container and
	// conmon; Close kills what is left in it and removes it.
	CgroupParent string

	closeOnce sync.Once
	closeErr  error
}

// NewPodman lays out an isolated podman configuration.
func NewPodman(opts PodmanOptions) (*Podman, error) {
	if _, err := exec.LookPath("podman"); err != nil {
		return nil, fmt.Errorf("podman: %w", err)
	}
	dir, err := newEngineDir(opts.Dir, "sl-pm-")
	if err != nil {
		return nil, fmt.Errorf("podman: %w", err)
	}
	suffix, err := randomHex(4)
	if err != nil {
		return nil, errors.Join(err, os.RemoveAll(dir))
	}
	p := podmanLayout(dir, "/seamless-podman-"+suffix)
	if err := writeOwnerRecord(dir, ownerRecord{CgroupParent: p.CgroupParent}); err != nil {
		return nil, errors.Join(err, os.RemoveAll(dir))
	}
	if err := p.write(opts); err != nil {
		return nil, errors.Join(err, p.Close())
	}
	return p, nil
}

// podmanLayout returns an instance with every path derived from dir.
func podmanLayout(dir, cgroupParent string) *Podman {
	return &Podman{
		Dir: dir, Conf: filepath.Join(dir, "containers.conf"), StorageConf: filepath.Join(dir, "storage.conf"),
		GraphRoot: filepath.Join(dir, "root"), RunRoot: filepath.Join(dir, "runroot"),
		HooksDir: filepath.Join(dir, "hooks.d"), CgroupParent: cgroupParent,
	}
}

func (p *Podman) write(opts PodmanOptions) error {
	for _, d := range []string{p.HooksDir, filepath.Join(p.Dir, "net"), filepath.Join(p.Dir, "tmp")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("mkdir: %w", err)
		}
	}
	storage := fmt.Sprintf("[storage]\ndriver = \"overlay\"\ngraphroot = %q\nrunroot = %q\n", p.GraphRoot, p.RunRoot)
	// default_ulimits: podman's default nofile/nproc exceed the hard limits
	// of a process without CAP_SYS_RESOURCE. static_dir stays unset, or
	// conmon's cleanup command cannot find the database.
	conf := fmt.Sprintf(`[containers]
netns = "none"
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[network]
network_config_dir = %q
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = %q
tmp_dir = %q
volume_path = %q
hooks_dir = [%q]
`, filepath.Join(p.Dir, "net"), filepath.Join(p.Dir, "events.log"), filepath.Join(p.Dir, "tmp"),
		filepath.Join(p.Dir, "volumes"), p.HooksDir)
	if opts.ExtraConf != "" {
		conf += opts.ExtraConf + "\n"
	}
	if err := os.WriteFile(p.StorageConf, []byte(storage), 0o644); err != nil {
		return fmt.Errorf("write storage.conf: %w", err)
	}
	if err := os.WriteFile(p.Conf, []byte(conf), 0o644); err != nil {
		return fmt.Errorf("write containers.conf: %w", err)
	}
	for name, content := range opts.Hooks {
		if err := os.WriteFile(filepath.Join(p.HooksDir, name), []byte(content), 0o644); err != nil {
			return fmt.Errorf("write hook %s: %w", name, err)
		}
	}
	return nil
}

// Env is the environment that points podman at this configuration.
func (p *Podman) Env() []string {
	return []string{"CONTAINERS_CONF=" + p.Conf, "CONTAINERS_STORAGE_CONF=" + p.StorageConf}
}

// Run runs podman with args and returns its stdout; the error carries stderr.
func (p *Podman) Run(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "podman", args...)
	cmd.Env = append(os.Environ(), p.Env()...)
	cmd.WaitDelay = 5 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("podman %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// RunContainer starts a detached container (no network, cgroup under
// CgroupParent) and returns its full id. extra flags go before the image.
func (p *Podman) RunContainer(ctx context.Context, name, image string, extra []string, args ...string) (string, error) {
	full := append([]string{"run", "-d", "--name", name, "--network", "none", "--cgroup-parent", p.CgroupParent}, extra...)
	full = append(append(full, image), args...)
	out, err := p.Run(ctx, full...)
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(out), nil
}

// Close removes every container and image, kills what is left in
// CgroupParent, unmounts what is left under Dir and removes Dir and the
// cgroups. Later calls return the first call's result.
func (p *Podman) Close() error {
	p.closeOnce.Do(func() {
		var errs []error
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		ids, _ := p.Run(ctx, "ps", "-a", "-q", "--no-trunc")
		if _, err := p.Run(ctx, "rm", "-a", "-f", "-t", "0"); err != nil {
			errs = append(errs, err)
		}
		if _, err := p.Run(ctx, "rmi", "-a", "-f"); err != nil {
			errs = append(errs, err)
		}
		errs = append(errs, killCgroup(p.CgroupParent))
		// podman's runc keeps its state in /run/runc: drop what a failed
		// removal left there for this instance's containers.
		for _, id := range strings.Fields(ids) {
			if _, err := os.Stat(filepath.Join(podmanRuncRoot, id)); err == nil {
				if out, err := exec.CommandContext(ctx, "runc", "--root", podmanRuncRoot, "delete", "--force", id).CombinedOutput(); err != nil {
					errs = append(errs, fmt.Errorf("runc delete %s: %w: %s", id, err, out))
				}
			}
		}
		errs = append(errs, unmountUnder(p.Dir))
		errs = append(errs, removeCgroupTree(p.CgroupParent))
		if left, err := MountsUnder(p.Dir); err != nil || len(left) > 0 {
			errs = append(errs, fmt.Errorf("not removing %s: mounts left %v (%v)", p.Dir, left, err))
		} else {
			errs = append(errs, os.RemoveAll(p.Dir))
		}
		p.closeErr = errors.Join(errs...)
	})
	return p.closeErr
}

// NewPodmanT is NewPodman for a test, closed at cleanup.
func NewPodmanT(t testing.TB, opts PodmanOptions) *Podman {
	t.Helper()
	p, err := NewPodman(opts)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Errorf("testenv: close podman: %v", err)
		}
	})
	return p
}
