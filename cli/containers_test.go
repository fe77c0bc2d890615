package cli

import (
	"encoding/json"
	"net"
	"os"
	"strings"
	"testing"

	"github.com/seamless-snapshot/seamless/config"
	"github.com/seamless-snapshot/seamless/shim"
)

// engineShims registers live-looking shims of several engines.
func engineShims(t *testing.T, infos ...shim.Info) config.Dirs {
	t.Helper()
	dirs := config.Dirs{State: t.TempDir(), Run: t.TempDir()}
	for _, info := range infos {
		l, err := net.Listen("unix", dirs.Socket(info.ContainerID))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		info.ShimPID, info.Socket = os.Getpid(), dirs.Socket(info.ContainerID)
		b, _ := json.Marshal(info)
		if err := os.WriteFile(dirs.ShimInfo(info.ContainerID), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dirs
}

func TestListAcrossEngines(t *testing.T) {
	dirs := engineShims(t,
		shim.Info{ContainerID: "4f2a01", Engine: shim.EngineCRI, Namespace: "k8s.io", Image: "registry.example/app:1", Freezer: "v1"},
		shim.Info{ContainerID: "4f9b02", Engine: shim.EngineDocker, Namespace: "moby", Image: "busybox:1", Freezer: "v2"},
		shim.Info{ContainerID: "7c3d03", Engine: shim.EnginePodman, Image: "localhost/x:1", Freezer: "v1"},
	)
	code, out, errOut := run(t, dirs, "list")
	if code != 0 {
		t.Fatalf("list: exit %d: %s", code, errOut)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 4 || !strings.HasPrefix(lines[0], "CONTAINER") || !strings.Contains(lines[0], "IMAGE") {
		t.Fatalf("list output:\n%s", out)
	}
	for _, want := range [][]string{{"4f2a01", "cri", "k8s.io", "registry.example/app:1", "v1"}, {"4f9b02", "docker", "moby", "busybox:1", "v2"}, {"7c3d03", "podman", "-", "localhost/x:1"}} {
		found := false
		for _, l := range lines[1:] {
			if f := strings.Fields(l); len(f) >= len(want) && strings.Join(f[:len(want)], " ") == strings.Join(want, " ") {
				found = true
			}
		}
		if !found {
			t.Errorf("no line %v in:\n%s", want, out)
		}
	}
	code, out, _ = run(t, dirs, "list", "--output", "json", "4f")
	var got []shim.Info
	if code != 0 || json.Unmarshal([]byte(out), &got) != nil || len(got) != 2 || got[0].Image != "registry.example/app:1" {
		t.Fatalf("list 4f --output json: exit %d\n%s", code, out)
	}
	if code, out, _ = run(t, dirs, "list", "--output", "json", "zz"); code != 0 || strings.TrimSpace(out) != "[]" {
		t.Errorf("list zz: exit %d %q", code, out)
	}
	if code, _, _ = run(t, dirs, "list", "a", "b"); code != 2 {
		t.Errorf("list with two prefixes: exit %d, want 2", code)
	}
	_, _, errOut = run(t, dirs, "snapshot", "--container", "4f", "--target", "r/x:1")
	if !strings.Contains(errOut, "4f2a01 (cri), 4f9b02 (docker)") {
		t.Errorf("ambiguous prefix across engines: %q", errOut)
	}
}
