package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/seamless-snapshot/seamless/config"
	"github.com/seamless-snapshot/seamless/integration/testenv"
	"github.com/seamless-snapshot/seamless/shim"
	"github.com/seamless-snapshot/seamless/snapshot"
)

// loopScript keeps a container running until SIGTERM.
var loopScript = []string{"sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"}

// engineChanges and engineCheck are a small change set made inside a
// container and its check in a container of the snapshot (the full set of
// change kinds is covered by TestSnapshotEndToEnd).
const (
	engineChanges = `set -e; echo "from %s" > /root/engine.txt; rm /data/imgfile.txt; rm -rf /data/imgdir; mkdir /data/imgdir; echo fresh > /data/imgdir/new.txt`
	engineCheck   = `cat /root/engine.txt; [ ! -e /data/imgfile.txt ] && echo deleted-ok; [ "$(ls /data/imgdir)" = new.txt ] && echo opaque-ok`
)

func assertEngineCheck(t *testing.T, out, engine string) {
	t.Helper()
	for _, want := range []string{"from " + engine, "deleted-ok", "opaque-ok"} {
		if !strings.Contains(out, want) {
			t.Errorf("container of the snapshot lacks %q; output:\n%s", want, out)
		}
	}
}

// suiteEnv is the environment that makes seamless use the suite's dirs.
func suiteEnv() []string {
	return []string{config.EnvStateDir + "=" + env.dirs.State, config.EnvRunDir + "=" + env.dirs.Run}
}

// pushBase pushes the suite's base image to repo in reg (from the suite's
// containerd) and returns its reference. Engine tests use registries of
// their own: the suite's counts its base layer uploads.
func pushBase(t *testing.T, reg *testenv.Registry, repo string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	ref := reg.Host + "/" + repo + ":1"
	if err := env.ctd.Tag(ctx, baseImageName, ref); err != nil {
		t.Fatal(err)
	}
	if err := env.ctd.Push(ctx, ref, true); err != nil {
		t.Fatal(err)
	}
	return ref
}

// waitShim waits for the shim of container id to answer and returns its info.
func waitShim(t *testing.T, id string) shim.Info {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		info, err := shim.NewClient(env.dirs.Socket(id)).Info(t.Context())
		if err == nil {
			return *info
		}
		if time.Now().After(deadline) {
			t.Fatalf("no shim answers for %s: %v\nshim log: %s", id, err, readFile(filepath.Join(env.dirs.Run, id+".log")))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitShimGone waits until container id has no shim process and no socket.
func waitShimGone(t *testing.T, id string) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		procs := shimProcesses(id)
		_, err := os.Stat(env.dirs.Socket(id))
		if len(procs) == 0 && os.IsNotExist(err) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("shim of %s still there after its container went: processes %v, socket err %v", id, procs, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// shimProcesses returns the live shim processes serving container id, with
// the config each was started with.
func shimProcesses(id string) map[int]shim.Config {
	pids := map[int]shim.Config{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		var pid int
		if _, err := fmt.Sscan(e.Name(), &pid); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		argv := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
		if len(argv) < 2 || argv[0] != "seamless-shim" {
			continue
		}
		var cfg shim.Config
		if json.Unmarshal([]byte(argv[1]), &cfg) == nil && cfg.ContainerID == id && testenv.ProcessAlive(pid) {
			pids[pid] = cfg
		}
	}
	return pids
}

// listed returns the `seamless list --output json` entry of container id.
func listed(t *testing.T, id string) shim.Info {
	t.Helper()
	res := seamless(t, "list", "--output", "json", id[:8])
	var all []shim.Info
	if res.code != 0 || json.Unmarshal([]byte(res.stdout), &all) != nil {
		t.Fatalf("seamless list: exit %d\n%s%s", res.code, res.stdout, res.stderr)
	}
	for _, info := range all {
		if info.ContainerID == id {
			return info
		}
	}
	t.Fatalf("seamless list %s does not show %s:\n%s", id[:8], id, res.stdout)
	return shim.Info{}
}

// snapshotWait snapshots container prefix to target and returns the final state.
func snapshotWait(t *testing.T, prefix, target string, extra ...string) *snapshot.State {
	t.Helper()
	args := append([]string{"snapshot", "--container", prefix, "--target", target, "--plain-http", "--wait"}, extra...)
	res := seamless(t, args...)
	if res.code != 0 {
		t.Fatalf("snapshot of %s: exit %d\n%s", prefix, res.code, res.stderr)
	}
	st := loadState(t, snapshotID(t, res.stdout))
	if st.Phase != snapshot.PhaseDone {
		t.Fatalf("snapshot %s: %s: %s", st.ID, st.Phase, st.Error)
	}
	return st
}

// TestDockerSnapshot: dockerd (Debian docker.io) with the runtime from
// packaging/docker/daemon.json (and the same with --add-runtime) runs a
// container through seamless-runc; the
// snapshot, by id prefix, is based on the image's registry digest from the
// Docker API (its layers mounted, not sent again), and the image pulled
// back into Docker shows the changes.
func TestDockerSnapshot(t *testing.T) {
	if _, err := exec.LookPath("dockerd"); err != nil {
		t.Fatalf("dockerd not installed (make deps): %v", err)
	}
	reg := testenv.StartRegistryT(t, testenv.RegistryOptions{})
	base := pushBase(t, reg, "docker/base")
	ctd := testenv.StartContainerdT(t, testenv.ContainerdOptions{Env: suiteEnv()})
	daemonJSON := packagingFile(t, "docker/daemon.json", map[string]string{"/usr/local/bin/seamless-runc": filepath.Join(env.bin, "seamless-runc")})
	d := testenv.StartDockerdT(t, testenv.DockerdOptions{Containerd: ctd, DaemonJSON: daemonJSON,
		AddRuntimes: map[string]string{"seamless-flag": filepath.Join(env.bin, "seamless-runc")}})
	ctx, cancel := context.WithTimeout(t.Context(), 4*time.Minute)
	defer cancel()
	docker := func(args ...string) string {
		t.Helper()
		out, err := d.Docker(ctx, args...)
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(out)
	}
	docker("pull", base)
	id := docker(append([]string{"run", "-d", "--runtime", "seamless", "--network", "none", "--name", "dk-snap", base}, loopScript...)...)
	info := waitShim(t, id)
	if info.Engine != shim.EngineDocker || info.Image != base {
		t.Errorf("shim info: engine %q image %q; want docker, %s", info.Engine, info.Image, base)
	}
	if l := listed(t, id); l.Engine != shim.EngineDocker || l.Image != base || l.Freezer == "" {
		t.Errorf("seamless list: %+v", l)
	}
	docker("exec", "dk-snap", "sh", "-c", fmt.Sprintf(engineChanges, "docker"))

	layer := env.image.LayerDigests[0]
	before, err := reg.BlobUploads(layer)
	if err != nil {
		t.Fatal(err)
	}
	target := reg.Host + "/docker/snap:1"
	st := snapshotWait(t, id[:12], target)
	if st.Base.Source != "registry" || !strings.HasPrefix(st.Base.Ref, reg.Host+"/docker/base@sha256:") || len(st.Base.DiffIDs) != 1 {
		t.Errorf("base = %+v; want the registry digest of %s with its diff ids", st.Base, base)
	}
	if after, _ := reg.BlobUploads(layer); after != before {
		t.Errorf("base layer uploaded %d more times; want it mounted from docker/base", after-before)
	}
	docker("pull", target)
	assertEngineCheck(t, docker("run", "--rm", "--network", "none", target, "sh", "-c", engineCheck), "docker")

	docker("rm", "-f", "dk-snap")
	waitShimGone(t, id)

	// The same runtime given with dockerd --add-runtime.
	id = docker(append([]string{"run", "-d", "--runtime", "seamless-flag", "--network", "none", "--name", "dk-flag", base}, loopScript...)...)
	if info := waitShim(t, id); info.Engine != shim.EngineDocker {
		t.Errorf("--add-runtime container: engine %q", info.Engine)
	}
	if n := len(shimProcesses(id)); n != 1 {
		t.Errorf("--add-runtime container: %d shims, want 1", n)
	}
	docker("rm", "-f", "dk-flag")
	waitShimGone(t, id)
}
