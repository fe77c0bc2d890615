package testenv

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// DockerdOptions configures StartDockerd.
type DockerdOptions struct {
	// Containerd is the containerd dockerd uses (--containerd); its Close
	// then also reaps what dockerd's containers leave in its cgroup parent.
	Containerd *Containerd
	// DaemonJSON is the content of dockerd's --config-file (e.g. runtimes).
	DaemonJSON string
	// AddRuntimes are dockerd --add-runtime NAME=PATH flags.
	AddRuntimes map[string]string
	// Dir is where the instance's temp dir is created; default /tmp.
	Dir string
	// StartTimeout bounds the wait for the API; default 60s.
	StartTimeout time.Duration
}

// Dockerd is an isolated dockerd: its own data root, exec root, socket and
// pidfile, no bridge, no iptables, containers' cgroups under the
// containerd's CgroupParent.
type Dockerd struct {
	// Host is the API socket path; DockerHost is it as unix:// URL.
	Host, DockerHost string
	// Dir holds everything (removed by Close).
	Dir string
	// DataRoot and ExecRoot are dockerd's --data-root and --exec-root.
	DataRoot, ExecRoot string
	// LogPath is dockerd's log.
	LogPath string
	// PID is dockerd's process id.
	PID int
	// CLI is the docker client binary matching the daemon.
	CLI string

	d               *daemon
	hostDirsCreated []string
	closeOnce       sync.Once
	closeErr        error
}

// dockerHostDirs are host paths dockerd creates whatever its roots (plugin
// discovery), deepest first; Close removes those it created, when empty.
func dockerHostDirs() []string { return []string{"/run/docker/plugins", "/run/docker"} }

// DockerCLI returns the Debian docker client (/usr/bin/docker) when present,
// else docker from PATH.
func DockerCLI() (string, error) {
	if fi, err := os.Stat("/usr/bin/docker"); err == nil && fi.Mode()&0o111 != 0 {
		return "/usr/bin/docker", nil
	}
	return exec.LookPath("docker")
}

// StartDockerd starts dockerd on opts.Containerd and waits for its API.
func StartDockerd(ctx context.Context, opts DockerdOptions) (*Dockerd, error) {
	if opts.Containerd == nil {
		return nil, errors.New("start dockerd: no containerd")
	}
	cli, err := DockerCLI()
	if err != nil {
		return nil, fmt.Errorf("start dockerd: docker client: %w", err)
	}
	dir, err := newEngineDir(opts.Dir, "sl-dkr-")
	if err != nil {
		return nil, fmt.Errorf("start dockerd: %w", err)
	}
	d := &Dockerd{
		Host: filepath.Join(dir, "docker.sock"), Dir: dir, CLI: cli,
		DataRoot: filepath.Join(dir, "root"), ExecRoot: filepath.Join(dir, "exec"),
		LogPath: filepath.Join(dir, "dockerd.log"),
	}
	d.DockerHost = "unix://" + d.Host
	if err := d.start(ctx, opts); err != nil {
		return nil, errors.Join(fmt.Errorf("start dockerd: %w", err), d.Close())
	}
	return d, nil
}

func (d *Dockerd) start(ctx context.Context, opts DockerdOptions) error {
	cfg := filepath.Join(d.Dir, "daemon.json")
	daemonCfg := map[string]any{}
	if opts.DaemonJSON != "" {
		if err := json.Unmarshal([]byte(opts.DaemonJSON), &daemonCfg); err != nil {
			return fmt.Errorf("daemon.json: %w", err)
		}
	}
	// dockerd 20.10 otherwise creates /etc/docker/key.json.
	daemonCfg["deprecated-key-path"] = filepath.Join(d.Dir, "key.json")
	if err := writeJSONFile(cfg, daemonCfg); err != nil {
		return err
	}
	d.hostDirsCreated = missingDirs(dockerHostDirs()...)
	args := []string{
		"--config-file", cfg, "--data-root", d.DataRoot, "--exec-root", d.ExecRoot,
		"--pidfile", filepath.Join(d.Dir, "docker.pid"), "-H", d.DockerHost,
		"--containerd", opts.Containerd.Address, "--cgroup-parent", opts.Containerd.CgroupParent,
		"--bridge", "none", "--iptables=false", "--ip6tables=false", "--ip-masq=false",
		"--userland-proxy=false", "--oom-score-adjust", "0", "--storage-driver", "overlay2",
	}
	args = append(args, keyValueFlags("--add-runtime", opts.AddRuntimes)...)
	dm, err := startDaemon("dockerd", args, []string{"DOCKER_CONFIG=" + filepath.Join(d.Dir, "cli")}, d.LogPath)
	if err != nil {
		return err
	}
	d.d, d.PID = dm, dm.pid()
	if err := writeOwnerRecord(d.Dir, ownerRecord{PID: d.PID, PIDStart: processStartTime(d.PID), HostDirsCreated: d.hostDirsCreated}); err != nil {
		return err
	}
	timeout := opts.StartTimeout
	if timeout == 0 {
		timeout = 60 * time.Second
	}
	return dm.waitReady(ctx, timeout, d.ping)
}

// ping asks GET /_ping on the API socket.
func (d *Dockerd) ping(ctx context.Context) error {
	c := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var dl net.Dialer
		return dl.DialContext(ctx, "unix", d.Host)
	}}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://docker/_ping", nil)
	if err != nil {
		return err
	}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET /_ping: %s", resp.Status)
	}
	return nil
}

// Docker runs the docker client against this daemon and returns its
// stdout; the error carries stderr.
func (d *Dockerd) Docker(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, d.CLI, args...)
	cmd.Env = append(os.Environ(), "DOCKER_HOST="+d.DockerHost, "DOCKER_CONFIG="+filepath.Join(d.Dir, "cli"))
	cmd.WaitDelay = 5 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("docker %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// Close removes every container, stops dockerd by PID, unmounts what is
// left under Dir and removes Dir. Later calls return the first result.
func (d *Dockerd) Close() error {
	d.closeOnce.Do(func() {
		var errs []error
		if d.d != nil && !d.d.exited() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			if ids, err := d.Docker(ctx, "ps", "-aq"); err == nil && strings.TrimSpace(ids) != "" {
				if _, err := d.Docker(ctx, append([]string{"rm", "-f"}, strings.Fields(ids)...)...); err != nil {
					errs = append(errs, err)
				}
			}
			cancel()
			errs = append(errs, d.d.stop(20*time.Second))
		}
		errs = append(errs, d.cleanupDir())
		d.closeErr = errors.Join(errs...)
	})
	return d.closeErr
}

// cleanupDir unmounts what is left under Dir, removes it and the host dirs
// this instance created (if empty and no other dockerd runs).
func (d *Dockerd) cleanupDir() error {
	var errs []error
	errs = append(errs, unmountUnder(d.Dir))
	if left, err := MountsUnder(d.Dir); err != nil || len(left) > 0 {
		errs = append(errs, fmt.Errorf("not removing %s: mounts left %v (%v)", d.Dir, left, err))
	} else {
		errs = append(errs, os.RemoveAll(d.Dir))
	}
	if len(d.hostDirsCreated) > 0 && !processRunning("dockerd") {
		for _, dir := range d.hostDirsCreated {
			os.Remove(dir) // only when empty
		}
	}
	return errors.Join(errs...)
}

// StartDockerdT starts dockerd for a test and closes it at cleanup (before
// the containerd it runs on, if that was started earlier in the test).
func StartDockerdT(t testing.TB, opts DockerdOptions) *Dockerd {
	t.Helper()
	d, err := StartDockerd(t.Context(), opts)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("dockerd log tail (%s):\n%s", d.LogPath, logTail(d.LogPath, 40))
		}
		if err := d.Close(); err != nil {
			t.Errorf("testenv: close dockerd: %v", err)
		}
	})
	return d
}
