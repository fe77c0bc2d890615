package testenv

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// CRINamespace is the containerd namespace of the CRI plugin's containers.
const CRINamespace = "k8s.io"

// CrictlVersion is the crictl built from the Go module proxy when none is in PATH.
const CrictlVersion = "v1.34.0"

// CRIOptions enable containerd's CRI plugin (the Kubernetes path) in
// StartContainerd. The instance stays isolated: CNI dirs, runc state (the
// runc runtime's Root option) and the stream server (loopback, random port)
// are its own; pods should put their cgroups under CgroupParent.
type CRIOptions struct {
	// SandboxImage is the pause image; it must be imported into the
	// instance (namespace k8s.io) before the first pod, it is never pulled.
	SandboxImage string
	// RuntimesTOML is appended to the config: extra runtimes, e.g.
	// [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.seamless].
	// "@RUNC_ROOT@" in it is replaced by the instance's RuncRoot.
	RuntimesTOML string
	// PlainHTTPRegistries are registries ("127.0.0.1:5000") the CRI plugin
	// pulls from over plain HTTP.
	PlainHTTPRegistries []string
}

// CNIDir is the instance's CNI directory (bin/ and net.d/, both empty: host
// network pods need no CNI).
func (c *Containerd) CNIDir() string { return filepath.Join(c.Dir, "cni") }

// criConfig renders containerd's config with the CRI plugin enabled.
// restrict_oom_score_adj is required where the process lacks
// CAP_SYS_RESOURCE (the sandbox asks for oom_score_adj -998).
func (c *Containerd) criConfig(level string, o *CRIOptions) string {
	var b strings.Builder
	b.WriteString(c.baseConfig(level, ""))
	fmt.Fprintf(&b, `  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = %q
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    enable_selinux = false
    disable_apparmor = true
    restrict_oom_score_adj = true
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          Root = %q
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = %q
      conf_dir = %q
`, o.SandboxImage, c.RuncRoot, filepath.Join(c.CNIDir(), "bin"), filepath.Join(c.CNIDir(), "net.d"))
	for _, host := range o.PlainHTTPRegistries {
		fmt.Fprintf(&b, `    [plugins."io.containerd.grpc.v1.cri".registry.mirrors.%q]
      endpoint = [%q]
`, host, "http://"+host)
	}
	if o.RuntimesTOML != "" {
		b.WriteString("\n" + strings.ReplaceAll(o.RuntimesTOML, "@RUNC_ROOT@", c.RuncRoot) + "\n")
	}
	return b.String()
}

// Crictl runs crictl against one containerd's CRI endpoint.
type Crictl struct {
	// Bin is the crictl binary.
	Bin string
	// Config is the crictl.yaml naming the endpoints (absolute unix:// URLs).
	Config string
}

// FindCrictl returns crictl from PATH or, failing that, builds
// CrictlVersion with `go install` into gobin (the Go build cache makes later
// builds quick).
func FindCrictl(ctx context.Context, gobin string) (string, error) {
	if p, err := exec.LookPath("crictl"); err == nil {
		return p, nil
	}
	cmd := exec.CommandContext(ctx, "go", "install", "sigs.k8s.io/cri-tools/cmd/crictl@"+CrictlVersion)
	cmd.Env = append(os.Environ(), "GOBIN="+gobin, "GOFLAGS=-buildvcs=false")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go install crictl@%s: %w\n%s", CrictlVersion, err, out)
	}
	return filepath.Join(gobin, "crictl"), nil
}

// NewCrictl writes a crictl config for c in c's dir.
func NewCrictl(c *Containerd, bin string) (*Crictl, error) {
	cfg := filepath.Join(c.Dir, "crictl.yaml")
	text := fmt.Sprintf("runtime-endpoint: unix://%s\nimage-endpoint: unix://%s\ntimeout: 60\n", c.Address, c.Address)
	if err := os.WriteFile(cfg, []byte(text), 0o644); err != nil {
		return nil, fmt.Errorf("write crictl config: %w", err)
	}
	return &Crictl{Bin: bin, Config: cfg}, nil
}

// Run runs crictl with args and returns its stdout; the error carries stderr.
func (k *Crictl) Run(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, k.Bin, append([]string{"--config", k.Config}, args...)...)
	cmd.WaitDelay = 5 * time.Second
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("crictl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}

// PodSpec is the part of a CRI PodSandboxConfig the tests set.
type PodSpec struct {
	Name, Namespace, UID string
	// CgroupParent is the pod's cgroup (put it under Containerd.CgroupParent).
	CgroupParent string
	// LogDir is where container logs go.
	LogDir string
	// Annotations are pod annotations.
	Annotations map[string]string
}

// RunPod writes a host-network pod config and runs the pod with runtime
// handler (crictl runp --runtime); it returns the pod sandbox id.
func (k *Crictl) RunPod(ctx context.Context, dir, handler string, p PodSpec) (podID, configPath string, err error) {
	cfg := map[string]any{
		"metadata":      map[string]any{"name": p.Name, "namespace": p.Namespace, "uid": p.UID, "attempt": 0},
		"log_directory": p.LogDir,
		"annotations":   p.Annotations,
		"linux": map[string]any{
			"cgroup_parent": p.CgroupParent,
			// NODE network (2): no CNI needed; own pid namespace per container (1).
			"security_context": map[string]any{"namespace_options": map[string]any{"network": 2, "pid": 1, "ipc": 0}},
		},
	}
	configPath = filepath.Join(dir, p.Name+"-pod.json")
	if err := writeJSONFile(configPath, cfg); err != nil {
		return "", "", err
	}
	out, err := k.Run(ctx, "runp", "--runtime", handler, configPath)
	if err != nil {
		return "", "", err
	}
	return strings.TrimSpace(out), configPath, nil
}

// CreateContainer creates and starts a container running args from image in
// the pod; it returns the container id.
func (k *Crictl) CreateContainer(ctx context.Context, dir, podID, podConfig, name, image string, args []string) (string, error) {
	cfg := map[string]any{
		"metadata": map[string]any{"name": name},
		"image":    map[string]any{"image": image},
		"command":  args,
		"log_path": name + ".log",
		"linux":    map[string]any{},
	}
	path := filepath.Join(dir, name+"-ctr.json")
	if err := writeJSONFile(path, cfg); err != nil {
		return "", err
	}
	out, err := k.Run(ctx, "create", podID, path, podConfig)
	if err != nil {
		return "", err
	}
	id := strings.TrimSpace(out)
	if _, err := k.Run(ctx, "start", id); err != nil {
		return id, err
	}
	return id, nil
}

// RemovePod stops and removes the pod and its containers.
func (k *Crictl) RemovePod(ctx context.Context, podID string) error {
	_, errStop := k.Run(ctx, "stopp", podID)
	_, errRm := k.Run(ctx, "rmp", "-f", podID)
	if errRm != nil {
		return errors.Join(errStop, errRm)
	}
	return nil
}

// CrictlT returns a crictl for c, building crictl if need be, for a test.
func CrictlT(t testing.TB, c *Containerd) *Crictl {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	bin, err := FindCrictl(ctx, t.TempDir())
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	k, err := NewCrictl(c, bin)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	return k
}

func writeJSONFile(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("encode %s: %w", filepath.Base(path), err)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
