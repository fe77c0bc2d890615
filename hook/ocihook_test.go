package hook

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/seamless-snapshot/seamless/baseimage"
	"github.com/seamless-snapshot/seamless/config"
	"github.com/seamless-snapshot/seamless/shim"
)

func TestReadOCIState(t *testing.T) {
	st, err := ReadOCIState(strings.NewReader(`{"ociVersion":"1.0.2-dev","id":"f8e3","status":"creating","pid":21153,"bundle":"/b/userdata","annotations":{"io.container.manager":"libpod"}}`))
	if err != nil {
		t.Fatal(err)
	}
	if st.ID != "f8e3" || st.Pid != 21153 || st.Bundle != "/b/userdata" || st.Annotations["io.container.manager"] != "libpod" {
		t.Fatalf("state = %+v", st)
	}
	for _, bad := range []string{``, `{`, `{"id":""}`, `{"id":"../x"}`, `{"id":".."}`} {
		if _, err := ReadOCIState(strings.NewReader(bad)); err == nil {
			t.Errorf("ReadOCIState(%q): no error", bad)
		}
	}
}

func TestHookStage(t *testing.T) {
	running := &specs.State{Pid: 5, Status: specs.StateCreating}
	stopped := &specs.State{Status: specs.StateStopped}
	for _, tc := range []struct {
		arg  string
		st   *specs.State
		want string
	}{
		{"createRuntime", stopped, StageCreateRuntime},
		{"prestart", running, StageCreateRuntime},
		{"poststart", running, StageCreateRuntime},
		{"poststop", running, StagePoststop},
		{"", running, StageCreateRuntime},
		{"", stopped, StagePoststop},
		{"", &specs.State{Pid: 5, Status: specs.StateStopped}, StagePoststop},
	} {
		got, err := HookStage(tc.arg, tc.st)
		if err != nil || got != tc.want {
			t.Errorf("HookStage(%q, %+v) = %q, %v; want %q", tc.arg, tc.st, got, err, tc.want)
		}
	}
	for _, bad := range []string{"createContainer", "startContainer", "nope"} {
		if _, err := HookStage(bad, running); err == nil {
			t.Errorf("HookStage(%q): no error", bad)
		}
	}
}

func TestRootfsOf(t *testing.T) {
	for _, tc := range []struct {
		path, want string
	}{
		{"rootfs", "/b/rootfs"},
		{"/var/lib/x/merged/", "/var/lib/x/merged"},
	} {
		got, err := rootfsOf(&specs.Spec{Root: &specs.Root{Path: tc.path}}, "/b")
		if err != nil || got != tc.want {
			t.Errorf("rootfsOf(%q) = %q, %v; want %q", tc.path, got, err, tc.want)
		}
	}
	if _, err := rootfsOf(&specs.Spec{}, "/b"); err == nil {
		t.Error("no root: no error")
	}
}

// dockerSpec is the part of a Docker 20.10 spec the engine detection reads.
func dockerSpec(dockerdPID int, dataRoot string) *specs.Spec {
	return &specs.Spec{
		Root: &specs.Root{Path: dataRoot + "/overlay2/x/merged"},
		Hooks: &specs.Hooks{Prestart: []specs.Hook{{ //nolint:staticcheck // what dockerd writes
			Path: "/proc/" + itoa(dockerdPID) + "/exe",
			Args: []string{"libnetwork-setkey", "-exec-root=/var/run/docker", "cid", "ctrl"},
		}}},
		Mounts: []specs.Mount{{Destination: "/etc/hostname", Source: dataRoot + "/containers/cid/hostname"}},
	}
}

func itoa(i int) string { b, _ := json.Marshal(i); return string(b) }

func TestDockerHostDiscovery(t *testing.T) {
	// A stand-in for dockerd whose command line names its socket.
	cmd := exec.Command("sh", "-c", "sleep 30; :", "dockerd", "--data-root", "/x", "-H", "unix:///tmp/seamless-test-docker.sock")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	spec := dockerSpec(cmd.Process.Pid, t.TempDir())
	if got := dockerdPID(spec); got != cmd.Process.Pid {
		t.Fatalf("dockerdPID = %d, want %d", got, cmd.Process.Pid)
	}
	noenv := func(string) string { return "" }
	if got := dockerHost(spec, noenv); got != "/tmp/seamless-test-docker.sock" {
		t.Errorf("dockerHost from dockerd's -H = %q", got)
	}
	env := func(k string) string {
		if k == EnvDockerHost {
			return "unix:///run/other.sock"
		}
		return ""
	}
	if got := dockerHost(spec, env); got != "/run/other.sock" {
		t.Errorf("dockerHost with DOCKER_HOST = %q", got)
	}
	if got := dockerHost(&specs.Spec{}, noenv); got != baseimage.DefaultDockerHost {
		t.Errorf("dockerHost without hints = %q", got)
	}
}

func TestDetectEngine(t *testing.T) {
	t.Setenv(baseimage.EnvContainerdAddress, "")
	t.Setenv(baseimage.EnvContainerdNamespace, "")
	noShim := engineHints{shimPID: os.Getpid(), getenv: func(string) string { return "" }}

	t.Run("docker by runc root", func(t *testing.T) {
		dataRoot := t.TempDir()
		os.MkdirAll(filepath.Join(dataRoot, "containers/cid"), 0o700)
		os.WriteFile(filepath.Join(dataRoot, "containers/cid/config.v2.json"), []byte(`{"Config":{"Image":"127.0.0.1:5000/app:1"}}`), 0o600)
		spec := dockerSpec(0, dataRoot)
		cfg := &shim.Config{ContainerID: "cid"}
		h := noShim
		h.runcRoot = "/var/run/docker/runtime-runc/moby"
		detectEngine(cfg, spec, h)
		if cfg.Engine != shim.EngineDocker || cfg.Image != "127.0.0.1:5000/app:1" || cfg.DockerHost != baseimage.DefaultDockerHost {
			t.Fatalf("config = %+v", cfg)
		}
	})
	t.Run("podman by annotation", func(t *testing.T) {
		graph := t.TempDir()
		bundle := filepath.Join(graph, "overlay-containers/c1/userdata")
		os.MkdirAll(bundle, 0o700)
		os.WriteFile(filepath.Join(graph, "overlay-containers/containers.json"), []byte(`[{"id":"c1","image":"i1","metadata":"{\"image-name\":\"reg/x:1\"}"}]`), 0o600)
		os.MkdirAll(filepath.Join(graph, "overlay-images"), 0o700)
		os.WriteFile(filepath.Join(graph, "overlay-images/images.json"), []byte(`[{"id":"i1","names":["reg/x:1"]}]`), 0o600)
		cfg := &shim.Config{ContainerID: "c1", Bundle: bundle, Annotations: map[string]string{"io.container.manager": "libpod"}}
		detectEngine(cfg, &specs.Spec{}, noShim)
		if cfg.Engine != shim.EnginePodman || cfg.PodmanContainersDir != filepath.Join(graph, "overlay-containers") || cfg.Image != "reg/x:1" {
			t.Fatalf("config = %+v", cfg)
		}
	})
	t.Run("cri by annotation", func(t *testing.T) {
		t.Setenv(baseimage.EnvContainerdAddress, "/run/test/containerd.sock")
		t.Setenv(baseimage.EnvContainerdNamespace, "k8s.io")
		cfg := &shim.Config{ContainerID: "c2", Annotations: map[string]string{
			shim.AnnotationCRIContainerType: "container", shim.AnnotationCRIImageName: "localhost/busybox:1.0",
		}}
		detectEngine(cfg, &specs.Spec{}, noShim)
		if cfg.Engine != shim.EngineCRI || cfg.ContainerdNamespace != "k8s.io" || cfg.Image != "localhost/busybox:1.0" {
			t.Fatalf("config = %+v", cfg)
		}
	})
	t.Run("unknown", func(t *testing.T) {
		cfg := &shim.Config{ContainerID: "c3"}
		detectEngine(cfg, &specs.Spec{}, noShim)
		if cfg.Engine != "" {
			t.Fatalf("engine %q without any hint", cfg.Engine)
		}
	})
}

// TestShimConfigFromOCIState builds a config for a real process, as the hook
// does at createRuntime.
func TestShimConfigFromOCIState(t *testing.T) {
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	bundle := t.TempDir()
	spec := `{"ociVersion":"1.0.2","root":{"path":"rootfs"},"annotations":{"io.seamless.freezer":"v2","a":"from-spec"}}`
	if err := os.WriteFile(filepath.Join(bundle, "config.json"), []byte(spec), 0o600); err != nil {
		t.Fatal(err)
	}
	dirs := config.Dirs{State: "/s", Run: "/r"}
	st := &specs.State{ID: "c1", Pid: cmd.Process.Pid, Bundle: bundle, Status: specs.StateCreating,
		Annotations: map[string]string{"io.seamless.freezer": "v2", "a": "from-state"}}
	cfg, err := ShimConfigFromOCIState(st, dirs)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Rootfs != filepath.Join(bundle, "rootfs") || cfg.InitPID != cmd.Process.Pid || cfg.InitStart == 0 ||
		len(cfg.CgroupPaths) == 0 || cfg.Freezer != "v2" || cfg.Annotations["a"] != "from-state" || cfg.RunDir != "/r" {
		t.Fatalf("config = %+v", cfg)
	}
	if start, _ := shim.ProcessStartTime(cmd.Process.Pid); start != cfg.InitStart {
		t.Errorf("InitStart %d, want %d", cfg.InitStart, start)
	}
	st.Pid = 0
	if _, err := ShimConfigFromOCIState(st, dirs); err == nil {
		t.Error("no pid: no error")
	}
	st.Pid, st.Bundle = cmd.Process.Pid, "relative/bundle"
	if _, err := ShimConfigFromOCIState(st, dirs); err == nil {
		t.Error("relative bundle: no error")
	}
}

// TestOCIHookNeverFailsTheContainer: a shim that cannot start is logged to
// the container's shim log, and the hook succeeds; poststop of a container
// without a shim succeeds and removes that log.
func TestOCIHookNeverFailsTheContainer(t *testing.T) {
	dirs := config.Dirs{State: t.TempDir(), Run: t.TempDir()}
	h := OCIHook{Exe: "/nonexistent/seamless-hook", Dirs: dirs}
	st := &specs.State{ID: "gone", Pid: 1 << 22, Bundle: t.TempDir(), Status: specs.StateCreating}
	if err := h.Run(StageCreateRuntime, st); err != nil {
		t.Fatalf("createRuntime: %v", err)
	}
	logPath := filepath.Join(dirs.Run, "gone.log")
	b, err := os.ReadFile(logPath)
	if err != nil || !strings.Contains(string(b), "no snapshots for this container") {
		t.Fatalf("shim log: %q, %v", b, err)
	}
	if err := h.Run("", &specs.State{ID: "gone", Status: specs.StateStopped}); err != nil {
		t.Fatalf("poststop: %v", err)
	}
	if _, err := os.Stat(logPath); !os.IsNotExist(err) {
		t.Errorf("shim log left after poststop: %v", err)
	}
	if err := h.Run("createContainer", st); err == nil {
		t.Error("createContainer accepted")
	}
}
