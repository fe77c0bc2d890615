package integration

import (
	"context"
	"encoding/json"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// repoRoot is the checkout (the tests run in integration/).
const repoRoot = ".."

// packagingFile reads packaging/<rel> with each key of repl replaced by its
// value: the tests install what users install, with their own paths.
func packagingFile(t *testing.T, rel string, repl map[string]string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot, "packaging", rel))
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	for k, v := range repl {
		if !strings.Contains(s, k) {
			t.Fatalf("packaging/%s does not contain %q", rel, k)
		}
		s = strings.ReplaceAll(s, k, v)
	}
	return s
}

// installedFiles are the files `make install` and `make install-hook` put
// under DESTDIR with the default PREFIX; the README must name each.
var installedFiles = []string{
	"/usr/local/bin/seamless",
	"/usr/local/bin/seamless-runc",
	"/usr/local/bin/seamless-hook",
	"/usr/local/share/seamless/containerd/seamless.toml",
	"/usr/local/share/seamless/containerd/seamless-v3.toml",
	"/usr/local/share/seamless/kubernetes/runtimeclass.yaml",
	"/usr/local/share/seamless/kubernetes/install-node.sh",
	"/usr/local/share/seamless/docker/daemon.json",
	"/usr/local/share/seamless/podman/containers.conf",
	"/usr/local/share/seamless/oci-hooks/seamless-hook.json",
	"/usr/share/containers/oci/hooks.d/seamless-hook.json",
}

func runMake(t *testing.T, args ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "make", append([]string{"-C", repoRoot, "--no-print-directory"}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("make %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	t.Logf("$ make %s\n%s", strings.Join(args, " "), out)
}

// TestInstall: `make install` (+ install-hook) puts the binaries and examples
// where the README says, with the binaries' paths in the examples, and
// `make uninstall` removes every file again.
func TestInstall(t *testing.T) {
	readme, err := os.ReadFile(filepath.Join(repoRoot, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	dest := t.TempDir()
	bin := t.TempDir()
	runMake(t, "install", "DESTDIR="+dest, "BIN="+bin)
	runMake(t, "install-hook", "DESTDIR="+dest)
	for _, f := range installedFiles {
		fi, err := os.Stat(filepath.Join(dest, f))
		if err != nil {
			t.Errorf("not installed: %v", err)
			continue
		}
		if strings.Contains(f, "/bin/") && fi.Mode()&0o111 == 0 {
			t.Errorf("%s is not executable", f)
		}
		if !strings.Contains(string(readme), f) {
			t.Errorf("README.md does not say where %s goes", f)
		}
	}
	var hook struct {
		Hook struct {
			Path string `json:"path"`
		} `json:"hook"`
		Stages []string `json:"stages"`
	}
	b, _ := os.ReadFile(filepath.Join(dest, "/usr/share/containers/oci/hooks.d/seamless-hook.json"))
	if err := json.Unmarshal(b, &hook); err != nil || hook.Hook.Path != "/usr/local/bin/seamless-hook" || len(hook.Stages) != 2 {
		t.Errorf("installed hook: %+v, %v", hook, err)
	}
	// A PREFIX is written into the examples.
	dest2 := t.TempDir()
	runMake(t, "install", "DESTDIR="+dest2, "BIN="+bin, "PREFIX=/opt/seamless")
	if b, _ := os.ReadFile(filepath.Join(dest2, "/opt/seamless/share/seamless/docker/daemon.json")); !strings.Contains(string(b), `"/opt/seamless/bin/seamless-runc"`) {
		t.Errorf("PREFIX not applied to daemon.json:\n%s", b)
	}

	runMake(t, "uninstall", "DESTDIR="+dest)
	var left []string
	filepath.WalkDir(dest, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			left = append(left, strings.TrimPrefix(p, dest))
		}
		return nil
	})
	if len(left) > 0 {
		t.Errorf("left after uninstall: %v", left)
	}
}

// TestInstallNodeScript: the Kubernetes node recipe adds the runtime to a
// containerd 1.x config without losing its other CRI settings (an import
// would replace the whole CRI section), as containerd itself reads it; it is
// idempotent and --uninstall restores the config.
func TestInstallNodeScript(t *testing.T) {
	root := t.TempDir()
	cfgPath := filepath.Join(root, "etc/containerd/config.toml")
	os.MkdirAll(filepath.Dir(cfgPath), 0o755)
	orig := `version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "example.com/pause:9"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = true
`
	if err := os.WriteFile(cfgPath, []byte(orig), 0o644); err != nil {
		t.Fatal(err)
	}
	script := filepath.Join(repoRoot, "packaging/kubernetes/install-node.sh")
	run := func(args ...string) string {
		t.Helper()
		out, err := exec.CommandContext(t.Context(), script, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("install-node.sh %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	for range 2 {
		t.Log(run("--from", env.bin, "--root", root, "--containerd-major", "1"))
	}
	for _, b := range []string{"seamless", "seamless-runc", "seamless-hook"} {
		if _, err := os.Stat(filepath.Join(root, "usr/local/bin", b)); err != nil {
			t.Errorf("binary not installed: %v", err)
		}
	}
	cfg, _ := os.ReadFile(cfgPath)
	if n := strings.Count(string(cfg), "runtimes.seamless]"); n != 1 {
		t.Errorf("runtime defined %d times after two runs:\n%s", n, cfg)
	}
	dump, err := exec.CommandContext(t.Context(), "containerd", "--config", cfgPath, "config", "dump").CombinedOutput()
	if err != nil {
		t.Fatalf("containerd config dump: %v\n%s", err, dump)
	}
	for _, want := range []string{`BinaryName = "/usr/local/bin/seamless-runc"`, `sandbox_image = "example.com/pause:9"`, `SystemdCgroup = true`, `bin_dir = "/usr/lib/cni"`} {
		if !strings.Contains(string(dump), want) {
			t.Errorf("containerd's view of the config lacks %s", want)
		}
	}
	t.Log(run("--root", root, "--uninstall", "--containerd-major", "1"))
	if cfg, _ := os.ReadFile(cfgPath); string(cfg) != orig {
		t.Errorf("config after --uninstall differs:\n%s", cfg)
	}
	if _, err := os.Stat(filepath.Join(root, "usr/local/bin/seamless-runc")); err == nil {
		t.Error("binary left after --uninstall")
	}
}
