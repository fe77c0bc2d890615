package testenv

import (
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

const loopCmd = "while true; do sleep 1; done"

// TestHarness exercises the whole harness for real and checks that Close
// leaves nothing behind, even with frozen containers still running.
func TestHarness(t *testing.T) {
	SkipIfUnavailable(t)
	ctx := t.Context()

	c, err := StartContainerd(ctx, ContainerdOptions{Env: []string{"SEAMLESS_TESTENV_MARK=42"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() }) // safety net; Close is idempotent
	reg, err := StartRegistry(ctx, RegistryOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = reg.Close() })

	img := buildAndImport(t, c)
	target := reg.Host + "/snapshots/c1:latest"
	runLoop(t, c, "c1", map[string]string{"io.seamless.snapshot.target": target})
	checkAnnotation(t, c, "c1", "io.seamless.snapshot.target", target)
	checkExecInUpper(t, c, "c1")
	pushAndCount(t, c, reg, img)

	// Leave one container v1-frozen and one v2-frozen for Close to handle.
	freezeV1(t, c, "c1")
	wrapper, wrapLog := writeRuncWrapper(t)
	if err := c.Run(ctx, RunOptions{Image: DefaultImageName, ID: "c2", Args: []string{"sh", "-c", loopCmd}, RuncBinary: wrapper}); err != nil {
		t.Fatal(err)
	}
	checkWrapperSawEnv(t, wrapLog)
	freezeV2(t, c, "c2")
	if err := CheckNoFrozenCgroups(c.CgroupParent); err == nil {
		t.Error("CheckNoFrozenCgroups: want an error with frozen containers")
	}
	if _, err := c.Exec(ctx, "c1", "true"); err == nil || !strings.Contains(err.Error(), "frozen") {
		t.Errorf("Exec into frozen c1: err = %v, want a frozen error", err)
	}

	snap := snapshotInstance(t, c)
	if err := c.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	regPID, regDir := reg.PID, reg.Dir
	if err := reg.Close(); err != nil {
		t.Fatalf("registry Close: %v", err)
	}
	snap.checkGone(t)
	if ProcessAlive(regPID) {
		t.Errorf("registry pid %d still alive", regPID)
	}
	if _, err := os.Stat(regDir); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("registry dir %s still exists (%v)", regDir, err)
	}
}

// writeRuncWrapper writes a runc wrapper logging its argv and
// SEAMLESS_TESTENV_MARK (never to stdout: the shim parses runc's stdout).
func writeRuncWrapper(t *testing.T) (wrapper, logPath string) {
	t.Helper()
	dir := t.TempDir()
	wrapper, logPath = filepath.Join(dir, "wrap-runc"), filepath.Join(dir, "wrap.log")
	script := "#!/bin/sh\necho \"mark=$SEAMLESS_TESTENV_MARK $*\" >> " + logPath + "\nexec runc \"$@\"\n"
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return wrapper, logPath
}

func checkWrapperSawEnv(t *testing.T, logPath string) {
	t.Helper()
	raw, err := os.ReadFile(logPath)
	if err != nil {
		t.Fatalf("wrapper log: %v", err)
	}
	if !strings.Contains(string(raw), "mark=42 ") || !strings.Contains(string(raw), " create ") {
		t.Errorf("wrapper log lacks the env mark or a create call:\n%s", raw)
	}
}

func buildAndImport(t *testing.T, c *Containerd) *BuiltImage {
	t.Helper()
	ctx := t.Context()
	img, err := BuildImage(ctx, t.TempDir(), DefaultImageName, nil)
	if err != nil {
		t.Fatal(err)
	}
	again, err := BuildImage(ctx, t.TempDir(), DefaultImageName, nil)
	if err != nil {
		t.Fatal(err)
	}
	if again.ManifestDigest != img.ManifestDigest {
		t.Errorf("build not deterministic: %s vs %s", img.ManifestDigest, again.ManifestDigest)
	}
	if err := c.ImportImage(ctx, img.Archive); err != nil {
		t.Fatal(err)
	}
	out, err := c.Ctr(ctx, "images", "ls", "-q")
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(strings.Fields(string(out)), DefaultImageName) {
		t.Fatalf("imported image not listed as %s: %s", DefaultImageName, out)
	}
	return img
}

func runLoop(t *testing.T, c *Containerd, id string, annotations map[string]string) {
	t.Helper()
	err := c.Run(t.Context(), RunOptions{
		Image:       DefaultImageName,
		ID:          id,
		Args:        []string{"sh", "-c", loopCmd},
		Annotations: annotations,
	})
	if err != nil {
		t.Fatal(err)
	}
}

func checkAnnotation(t *testing.T, c *Containerd, id, key, want string) {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(c.Bundle(id), "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	var spec struct {
		Annotations map[string]string `json:"annotations"`
	}
	if err := json.Unmarshal(raw, &spec); err != nil {
		t.Fatal(err)
	}
	if got := spec.Annotations[key]; got != want {
		t.Errorf("config.json annotation %s = %q, want %q", key, got, want)
	}
}

func checkExecInUpper(t *testing.T, c *Containerd, id string) {
	t.Helper()
	out, err := c.Exec(t.Context(), id, "sh", "-c", "echo hi > /root/x && cat /data/imgfile.txt")
	if err != nil {
		t.Fatal(err)
	}
	if string(out) != "image file\n" {
		t.Errorf("exec output %q, want %q", out, "image file\n")
	}
	ov, err := c.RootfsOverlay(id)
	if err != nil {
		t.Fatal(err)
	}
	if len(ov.Lower) == 0 || ov.Upper == "" || ov.Work == "" {
		t.Fatalf("incomplete overlay: %+v", ov)
	}
	got, err := os.ReadFile(filepath.Join(ov.Upper, "root", "x"))
	if err != nil {
		t.Fatalf("file in upper dir: %v", err)
	}
	if string(got) != "hi\n" {
		t.Errorf("upper root/x = %q, want %q", got, "hi\n")
	}
}

func pushAndCount(t *testing.T, c *Containerd, reg *Registry, img *BuiltImage) {
	t.Helper()
	ctx := t.Context()
	ref := reg.Host + "/test/busybox:1.0"
	if err := c.Tag(ctx, DefaultImageName, ref); err != nil {
		t.Fatal(err)
	}
	if err := c.Push(ctx, ref, true); err != nil {
		t.Fatal(err)
	}
	n, err := reg.BlobUploads(img.LayerDigests[0])
	if err != nil {
		t.Fatal(err)
	}
	if n != 1 {
		t.Errorf("BlobUploads(layer) = %d, want 1; log tail:\n%s", n, logTail(reg.LogPath, 20))
	}
	if n, _ := reg.BlobUploads("sha256:" + strings.Repeat("0", 64)); n != 0 {
		t.Errorf("BlobUploads(unknown) = %d, want 0", n)
	}
	repos, err := reg.Catalog(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(repos, "test/busybox") {
		t.Errorf("catalog %v lacks test/busybox", repos)
	}
}

func freezeV1(t *testing.T, c *Containerd, id string) {
	t.Helper()
	st, err := c.RuncState(id)
	if err != nil {
		t.Fatal(err)
	}
	if st.FreezerV1() == "" {
		t.Skip("no v1 freezer on this host")
	}
	writeAndWait(t, filepath.Join(st.FreezerV1(), "freezer.state"), "FROZEN", func() (bool, error) {
		return cgroupV1Frozen(st.FreezerV1())
	})
	if f, err := c.Frozen(id); err != nil || !f {
		t.Errorf("Frozen(%s) = %v, %v after v1 freeze", id, f, err)
	}
}

func freezeV2(t *testing.T, c *Containerd, id string) {
	t.Helper()
	st, err := c.RuncState(id)
	if err != nil {
		t.Fatal(err)
	}
	if st.Unified() == "" {
		t.Skip("no unified cgroup on this host")
	}
	writeAndWait(t, filepath.Join(st.Unified(), "cgroup.freeze"), "1", func() (bool, error) {
		return cgroupV2Frozen(st.Unified())
	})
}

func writeAndWait(t *testing.T, file, value string, done func() (bool, error)) {
	t.Helper()
	if err := os.WriteFile(file, []byte(value), 0); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		ok, err := done()
		if err != nil {
			t.Fatal(err)
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %s did not take effect", file, value)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// instanceSnapshot records what a Containerd owned, to check it is gone.
type instanceSnapshot struct {
	address, dir, cgroup string
	pid                  int
	shims                []int
	sockets              []string
}

func snapshotInstance(t *testing.T, c *Containerd) instanceSnapshot {
	t.Helper()
	shims, err := c.ShimPIDs()
	if err != nil {
		t.Fatal(err)
	}
	if len(shims) == 0 {
		t.Error("no shim found for running containers")
	}
	s := instanceSnapshot{address: c.Address, dir: c.Dir, cgroup: c.CgroupParent, pid: c.PID, shims: shims, sockets: c.ShimSockets()}
	if len(s.sockets) == 0 {
		t.Error("no shim socket recorded in the bundles")
	}
	return s
}

func (s instanceSnapshot) checkGone(t *testing.T) {
	t.Helper()
	if ProcessAlive(s.pid) {
		t.Errorf("containerd pid %d still alive", s.pid)
	}
	for _, p := range s.shims {
		if ProcessAlive(p) {
			t.Errorf("shim pid %d still alive", p)
		}
	}
	if left, err := ShimPIDs(s.address); err != nil || len(left) > 0 {
		t.Errorf("shims left: %v (%v)", left, err)
	}
	for _, sock := range s.sockets {
		if _, err := os.Lstat(sock); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("shim socket %s still exists (%v)", sock, err)
		}
	}
	if mps, err := MountsUnder(s.dir); err != nil || len(mps) > 0 {
		t.Errorf("mounts left under %s: %v (%v)", s.dir, mps, err)
	}
	if _, err := os.Stat(s.dir); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("dir %s still exists (%v)", s.dir, err)
	}
	if ok, err := CgroupExists(s.cgroup); err != nil || ok {
		t.Errorf("cgroup %s still exists (%v)", s.cgroup, err)
	}
}

// TestStartContainerdBadDir checks that a failed start removes its dir.
func TestStartContainerdBadDir(t *testing.T) {
	SkipIfUnavailable(t)
	long := filepath.Join(t.TempDir(), strings.Repeat("x", 100))
	if err := os.MkdirAll(long, 0o755); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	if c, err := StartContainerd(ctx, ContainerdOptions{Dir: long}); err == nil {
		_ = c.Close()
		t.Fatal("want an error for a too long socket path")
	}
	ents, err := os.ReadDir(long)
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != 0 {
		t.Errorf("failed start left %d entries in %s", len(ents), long)
	}
}

func TestIsBlobUpload(t *testing.T) {
	d := "sha256:" + strings.Repeat("ab", 32)
	enc := strings.Replace(d, ":", "%3A", 1)
	cases := []struct {
		line string
		want bool
	}{
		{`127.0.0.1 - - [09/May/2026:10:00:00 +0000] "PUT /v2/a/b/blobs/uploads/u-1?_state=x&digest=` + enc + ` HTTP/1.1" 201 0 "" "containerd/1.6.20"`, true},
		{`127.0.0.1 - - [09/May/2026:10:00:00 +0000] "PUT /v2/a/b/blobs/uploads/u-1?digest=` + d + ` HTTP/1.1" 201 0 "" "x"`, true},
		{`127.0.0.1 - - [09/May/2026:10:00:00 +0000] "PUT /v2/a/b/blobs/uploads/u-1?digest=` + enc + ` HTTP/1.1" 400 0 "" "x"`, false},
		{`127.0.0.1 - - [09/May/2026:10:00:00 +0000] "POST /v2/a/b/blobs/uploads/?mount=` + enc + `&from=c HTTP/1.1" 201 0 "" "x"`, false},
		{`127.0.0.1 - - [09/May/2026:10:00:00 +0000] "PUT /v2/a/b/manifests/1.0 HTTP/1.1" 201 0 "" "x"`, false},
	}
	for i, tc := range cases {
		if got := isBlobUpload(tc.line, d); got != tc.want {
			t.Errorf("case %d: got %v, want %v", i, got, tc.want)
		}
	}
}

func TestParseMountinfo(t *testing.T) {
	line := `120 30 0:50 / /tmp/sl-ctd-1/state/b\040c/rootfs rw,relatime shared:1 - overlay overlay rw,lowerdir=/l2:/l1,upperdir=/u,workdir=/w,index=off`
	m, err := parseMountinfoLine(line)
	if err != nil {
		t.Fatal(err)
	}
	if m.Mountpoint != "/tmp/sl-ctd-1/state/b c/rootfs" || m.FSType != "overlay" {
		t.Errorf("parsed %+v", m)
	}
	ov := parseOverlay(m.Mountpoint, m.SuperOptions)
	if !slices.Equal(ov.Lower, []string{"/l2", "/l1"}) || ov.Upper != "/u" || ov.Work != "/w" {
		t.Errorf("overlay %+v", ov)
	}
	if _, err := parseMountinfoLine("garbage"); err == nil {
		t.Error("want an error for a malformed line")
	}
}

// TestCloseAfterContainerdDied checks Close still cleans up (shim, mounts,
// cgroups) when containerd itself is already gone.
func TestCloseAfterContainerdDied(t *testing.T) {
	SkipIfUnavailable(t)
	c := StartContainerdT(t, ContainerdOptions{})
	ImportImageT(t, c, DefaultImageName, nil)
	runLoop(t, c, "c1", nil)
	freezeV1(t, c, "c1")
	snap := snapshotInstance(t, c)
	if err := c.d.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-c.d.done
	if err := c.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	snap.checkGone(t)
}

// TestCleanStale checks that an instance whose owner died is torn down by
// CleanStale, and that one with a live owner is left alone.
func TestCleanStale(t *testing.T) {
	SkipIfUnavailable(t)
	base, err := os.MkdirTemp("/tmp", "sl-t-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(base) })
	live := StartContainerdT(t, ContainerdOptions{Dir: base})
	c := StartContainerdT(t, ContainerdOptions{Dir: base})
	reg := StartRegistryT(t, RegistryOptions{Dir: base})
	ImportImageT(t, c, DefaultImageName, nil)
	runLoop(t, c, "c1", nil)
	snap := snapshotInstance(t, c)
	for _, dir := range []string{c.Dir, reg.Dir} {
		rec, err := readRecord(dir)
		if err != nil {
			t.Fatal(err)
		}
		rec.OwnerStart++ // pretend the owner died (its PID was reused)
		if err := writeRecord(dir, rec); err != nil {
			t.Fatal(err)
		}
	}
	cleaned, err := CleanStale(base)
	if err != nil {
		t.Fatalf("CleanStale: %v", err)
	}
	slices.Sort(cleaned)
	want := []string{c.Dir, reg.Dir}
	slices.Sort(want)
	if !slices.Equal(cleaned, want) {
		t.Errorf("cleaned %v, want %v", cleaned, want)
	}
	snap.checkGone(t)
	if ProcessAlive(reg.PID) {
		t.Errorf("registry pid %d still alive", reg.PID)
	}
	if !ProcessAlive(live.PID) {
		t.Errorf("live instance's containerd %d was stopped", live.PID)
	}
}
