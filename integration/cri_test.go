package integration

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/seamless-snapshot/seamless/integration/testenv"
	"github.com/seamless-snapshot/seamless/shim"
	"github.com/seamless-snapshot/seamless/snapshot"
)

// pauseImageName is the CRI sandbox image of TestCRISnapshot (never pulled).
const pauseImageName = "localhost/seamless-pause:1.0"

// TestCRISnapshot is the Kubernetes path: containerd's CRI plugin with the
// runtime from packaging/containerd/seamless.toml, a host-network pod with
// runtime handler "seamless" (what a RuntimeClass with handler seamless
// makes the kubelet send) and a busybox container. Both the pause container
// and the container get a shim; the container, changed through crictl exec,
// is snapshotted by id prefix from containerd's content store (namespace
// k8s.io), pulled back by CRI and run in the pod; the sandbox is refused.
func TestCRISnapshot(t *testing.T) {
	dir := t.TempDir()
	reg := testenv.StartRegistryT(t, testenv.RegistryOptions{})
	ctx, cancel := context.WithTimeout(t.Context(), 6*time.Minute)
	defer cancel()
	pause, err := testenv.BuildImageWithCmd(ctx, dir, pauseImageName, nil, []string{"sleep", "2147483647"})
	if err != nil {
		t.Fatal(err)
	}
	// The packaged runtime, with this build's wrapper and runc's state kept
	// in the instance (the Root option).
	runtime := packagingFile(t, "containerd/seamless.toml", map[string]string{"/usr/local/bin/seamless-runc": filepath.Join(env.bin, "seamless-runc")}) +
		"    Root = \"@RUNC_ROOT@\"\n"
	ctd := testenv.StartContainerdT(t, testenv.ContainerdOptions{Env: suiteEnv(), CRI: &testenv.CRIOptions{
		SandboxImage: pauseImageName, RuntimesTOML: runtime, PlainHTTPRegistries: []string{reg.Host},
	}})
	for _, archive := range []string{env.image.Archive, pause.Archive} {
		if err := ctd.ImportImage(ctx, archive); err != nil {
			t.Fatal(err)
		}
	}
	k := testenv.CrictlT(t, ctd)
	logDir := filepath.Join(dir, "logs")
	os.MkdirAll(logDir, 0o755)
	podID, podConfig, err := k.RunPod(ctx, dir, "seamless", testenv.PodSpec{
		Name: "snap-pod", Namespace: "default", UID: "uid-snap-pod",
		CgroupParent: ctd.CgroupParent + "/snap-pod", LogDir: logDir,
	})
	if err != nil {
		t.Fatal(err)
	}
	podGone := false
	t.Cleanup(func() {
		if !podGone {
			cctx, ccancel := context.WithTimeout(context.Background(), time.Minute)
			defer ccancel()
			if err := k.RemovePod(cctx, podID); err != nil {
				t.Errorf("remove pod: %v", err)
			}
		}
	})
	cid, err := k.CreateContainer(ctx, dir, podID, podConfig, "work", baseImageName, loopScript)
	if err != nil {
		t.Fatal(err)
	}

	sandbox := waitShim(t, podID)
	if sandbox.Engine != shim.EngineCRI || sandbox.Namespace != testenv.CRINamespace {
		t.Errorf("sandbox shim: engine %q namespace %q; want cri, k8s.io", sandbox.Engine, sandbox.Namespace)
	}
	info := waitShim(t, cid)
	if info.Engine != shim.EngineCRI || info.Namespace != testenv.CRINamespace || info.Image != baseImageName {
		t.Errorf("container shim: %+v; want engine cri, namespace k8s.io, image %s", info, baseImageName)
	}
	listed(t, cid)
	if _, err := k.Run(ctx, "exec", cid, "sh", "-c", fmt.Sprintf(engineChanges, "cri")); err != nil {
		t.Fatal(err)
	}

	target := reg.Host + "/cri/snap:1"
	st := snapshotWait(t, cid[:12], target)
	if st.Base.Source != "containerd" || st.Base.ContainerdNamespace != testenv.CRINamespace || st.Base.Ref == "" {
		t.Errorf("base = %+v; want containerd's image in namespace k8s.io", st.Base)
	}
	t.Logf("base of the CRI container: %s", st.Base.Ref)

	// The sandbox (pause container) is refused, clearly.
	res := seamless(t, "snapshot", "--container", podID, "--target", reg.Host+"/cri/pause:1", "--plain-http")
	if res.code != 2 || !strings.Contains(res.stderr, "pod sandbox") || !strings.Contains(res.stderr, "default/snap-pod") {
		t.Errorf("snapshot of the sandbox: exit %d, stderr %q; want exit 2 naming the pod sandbox", res.code, res.stderr)
	}
	if all, _ := (snapshot.Store{Root: env.dirs.SnapshotsDir()}).List(); len(all) > 0 {
		for _, s := range all {
			if s.Container == podID {
				t.Errorf("a snapshot of the sandbox was recorded: %s", s.ID)
			}
		}
	}

	// Pulled back through CRI and run in the same pod.
	if _, err := k.Run(ctx, "pull", target); err != nil {
		t.Fatal(err)
	}
	check, err := k.CreateContainer(ctx, dir, podID, podConfig, "check", target, []string{"sleep", "600"})
	if err != nil {
		t.Fatal(err)
	}
	out, err := k.Run(ctx, "exec", check, "sh", "-c", engineCheck)
	if err != nil {
		t.Fatal(err)
	}
	assertEngineCheck(t, out, "cri")

	if err := k.RemovePod(ctx, podID); err != nil {
		t.Fatal(err)
	}
	podGone = true
	for _, id := range []string{cid, check, podID} {
		waitShimGone(t, id)
	}
}
