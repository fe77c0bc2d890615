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

	"github.com/seamless-snapshot/seamless/integration/testenv"
	"github.com/seamless-snapshot/seamless/shim"
)

// startPodman sets up an isolated podman with the OCI hook from
// packaging/oci-hooks/seamless-hook.json and the runtime "seamless" from
// packaging/podman/containers.conf. Both get the suite's dirs: the hook via
// its env (runc gives hooks only that), the runtime via a script, since
// podman and conmon pass the runtime a filtered environment.
func startPodman(t *testing.T) *testenv.Podman {
	t.Helper()
	if _, err := exec.LookPath("podman"); err != nil {
		t.Fatalf("podman not installed (make deps): %v", err)
	}
	var hook map[string]any
	raw := packagingFile(t, "oci-hooks/seamless-hook.json", map[string]string{"/usr/local/bin/seamless-hook": filepath.Join(env.bin, "seamless-hook")})
	if err := json.Unmarshal([]byte(raw), &hook); err != nil {
		t.Fatal(err)
	}
	h := hook["hook"].(map[string]any)
	h["env"] = append(h["env"].([]any), anySlice(suiteEnv())...)
	hookJSON, _ := json.MarshalIndent(hook, "", "  ")

	wrapper := filepath.Join(t.TempDir(), "seamless-runc")
	script := "#!/bin/sh\nexport " + strings.Join(suiteEnv(), " ") + "\nexec " + filepath.Join(env.bin, "seamless-runc") + " \"$@\"\n"
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	runtimes := packagingFile(t, "podman/containers.conf", map[string]string{"/usr/local/bin/seamless-runc": wrapper})
	return testenv.NewPodmanT(t, testenv.PodmanOptions{
		Hooks:     map[string]string{"seamless-hook.json": string(hookJSON)},
		ExtraConf: runtimes,
	})
}

func anySlice(ss []string) []any {
	out := make([]any, len(ss))
	for i, s := range ss {
		out[i] = s
	}
	return out
}

// TestPodmanHookSnapshot: with the OCI hook and podman's plain runc, a
// container gets one shim (createRuntime) that poststop stops; the snapshot,
// by id prefix, is based on the registry digest podman's storage records and
// comes back through podman. A container of a locally loaded image cannot
// name its base: the error says to use --base, and --base works.
func TestPodmanHookSnapshot(t *testing.T) {
	reg := testenv.StartRegistryT(t, testenv.RegistryOptions{})
	base := pushBase(t, reg, "podman/base")
	p := startPodman(t)
	ctx, cancel := context.WithTimeout(t.Context(), 4*time.Minute)
	defer cancel()
	podman := func(args ...string) string {
		t.Helper()
		out, err := p.Run(ctx, args...)
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(out)
	}
	podman("pull", "--tls-verify=false", base)
	id, err := p.RunContainer(ctx, "pm-hook", base, nil, loopScript...)
	if err != nil {
		t.Fatal(err)
	}
	info := waitShim(t, id)
	if info.Engine != shim.EnginePodman || info.Image != base {
		t.Errorf("shim info: engine %q image %q; want podman, %s", info.Engine, info.Image, base)
	}
	if n := len(shimProcesses(id)); n != 1 {
		t.Errorf("%d shims for %s, want 1", n, id)
	}
	listed(t, id)
	podman("exec", "pm-hook", "sh", "-c", fmt.Sprintf(engineChanges, "podman"))

	target := reg.Host + "/podman/snap:1"
	st := snapshotWait(t, id[:12], target)
	if st.Base.Source != "registry" || !strings.HasPrefix(st.Base.Ref, reg.Host+"/podman/base@sha256:") || len(st.Base.DiffIDs) != 1 {
		t.Errorf("base = %+v; want the registry digest of %s with its diff ids", st.Base, base)
	}
	assertThawed(t, p, "pm-hook")
	podman("pull", "--tls-verify=false", target)
	assertEngineCheck(t, podman("run", "--rm", "--network", "none", "--cgroup-parent", p.CgroupParent, target, "sh", "-c", engineCheck), "podman")

	// A locally loaded image has no registry digest: --base names it. Same
	// layers as the base, another config, so another image.
	localImg, err := testenv.BuildImageWithCmd(ctx, t.TempDir(), "localhost/seamless-local:1.0", map[string]testenv.FileSpec{
		"/usr/bin/testbin": {Mode: 0o755, Source: filepath.Join(env.bin, "testbin")},
	}, []string{"/bin/sh", "-c", "echo local"})
	if err != nil {
		t.Fatal(err)
	}
	if localImg.LayerDigests[0] != env.image.LayerDigests[0] {
		t.Fatalf("local image layer %s differs from the base's %s", localImg.LayerDigests[0], env.image.LayerDigests[0])
	}
	podman("load", "-i", localImg.Archive)
	local, err := p.RunContainer(ctx, "pm-local", localImg.Name, nil, loopScript...)
	if err != nil {
		t.Fatal(err)
	}
	waitShim(t, local)
	podman("exec", "pm-local", "sh", "-c", fmt.Sprintf(engineChanges, "podman-local"))
	res := seamless(t, "snapshot", "--container", local[:12], "--target", reg.Host+"/podman/local:1", "--plain-http", "--wait")
	if res.code != 1 || !strings.Contains(res.stderr, "--base REF") || !strings.Contains(res.stderr, "no registry digest") {
		t.Errorf("snapshot of a local image without --base: exit %d, stderr %q; want exit 1 naming --base REF", res.code, res.stderr)
	}
	st = snapshotWait(t, local[:12], reg.Host+"/podman/local:2", "--base", base)
	if st.Base.Ref != base || st.Base.Source != "registry" {
		t.Errorf("base with --base = %+v", st.Base)
	}
	podman("pull", "--tls-verify=false", reg.Host+"/podman/local:2")
	assertEngineCheck(t, podman("run", "--rm", "--network", "none", "--cgroup-parent", p.CgroupParent, reg.Host+"/podman/local:2", "sh", "-c", engineCheck), "podman-local")

	podman("rm", "-f", "-t", "0", "pm-hook", "pm-local")
	waitShimGone(t, id)
	waitShimGone(t, local)
}

// assertThawed checks that a podman container still runs commands.
func assertThawed(t *testing.T, p *testenv.Podman, name string) {
	t.Helper()
	out, err := p.Run(t.Context(), "exec", name, "echo", "alive")
	if err != nil || strings.TrimSpace(out) != "alive" {
		t.Fatalf("container %s after snapshot: %q, %v", name, out, err)
	}
}

// TestPodmanRuntimeAndHook: podman with --runtime seamless (the wrapper)
// gives a container one shim, alone and with the OCI hook active too; the
// shim stops when the container is removed.
func TestPodmanRuntimeAndHook(t *testing.T) {
	reg := testenv.StartRegistryT(t, testenv.RegistryOptions{})
	base := pushBase(t, reg, "podman/base")
	p := startPodman(t)
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	if _, err := p.Run(ctx, "pull", "--tls-verify=false", base); err != nil {
		t.Fatal(err)
	}
	noHooks := t.TempDir()
	for _, tc := range []struct {
		name  string
		hooks bool
	}{{"pm-rt", false}, {"pm-rt-hook", true}} {
		run := []string{"--runtime", "seamless"}
		if !tc.hooks {
			run = append(run, "--hooks-dir", noHooks)
		}
		id, err := p.RunContainer(ctx, tc.name, base, run, loopScript...)
		if err != nil {
			t.Fatal(err)
		}
		if out, err := p.Run(ctx, "inspect", "-f", "{{.OCIRuntime}}", id); err != nil || strings.TrimSpace(out) != "seamless" {
			t.Fatalf("OCI runtime of %s: %q, %v", tc.name, out, err)
		}
		info := waitShim(t, id)
		if info.Engine != shim.EnginePodman || info.Image != base {
			t.Errorf("%s: engine %q image %q, want podman, %s", tc.name, info.Engine, info.Image, base)
		}
		shims := shimProcesses(id)
		if len(shims) != 1 {
			t.Fatalf("%s (hook %v): shims %v, want exactly one", tc.name, tc.hooks, shims)
		}
		// The hook runs inside runc create, before the wrapper's turn: with
		// it, the shim is the hook's (no runc root) and the wrapper's was
		// turned away; without it, the wrapper's.
		for _, cfg := range shims {
			if byHook := cfg.RuncRoot == ""; byHook != tc.hooks {
				t.Errorf("%s: shim started by the hook: %v, want %v", tc.name, byHook, tc.hooks)
			}
		}
		if _, err := p.Run(ctx, "rm", "-f", "-t", "0", id); err != nil {
			t.Fatal(err)
		}
		waitShimGone(t, id)
	}
}
