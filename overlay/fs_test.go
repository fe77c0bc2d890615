package overlay

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestCaptureUserXattr captures an overlay mounted with userxattr, whose
// opaque dirs are marked with user.overlay.opaque.
func TestCaptureUserXattr(t *testing.T) {
	requireRoot(t)
	base := t.TempDir()
	o := &testOverlay{lower: filepath.Join(base, "l"), upper: filepath.Join(base, "u"), work: filepath.Join(base, "w"), merged: filepath.Join(base, "m")}
	for _, d := range []string{o.upper, o.work, o.merged} {
		mustNil(t, os.Mkdir(d, 0o755))
	}
	writeFile(t, filepath.Join(o.lower, "d/old"), "old\n")
	mountOverlay(t, o.merged, "userxattr,lowerdir="+o.lower+",upperdir="+o.upper+",workdir="+o.work)
	mustNil(t, os.RemoveAll(filepath.Join(o.merged, "d")))
	writeFile(t, filepath.Join(o.merged, "d/new"), "new\n")

	mnt, err := FindMount("/proc/self/mountinfo", o.merged)
	mustNil(t, err)
	if !mnt.UserXattr() || mnt.CheckCapturable() != nil || mnt.Upperdir != o.upper {
		t.Fatalf("mount = %+v", mnt)
	}
	snap := filepath.Join(t.TempDir(), "snap")
	m, _ := captureTo(t, mnt.Upperdir, snap, CaptureOptions{UserXattr: mnt.UserXattr()})
	if !m.UserXattr {
		t.Error("manifest does not record userxattr")
	}
	var names []string
	for _, e := range readTar(t, layerBytes(t, m, snap)) {
		names = append(names, e.name())
		if len(xattrKeys(e.hdr)) != 0 {
			t.Errorf("%s: xattrs %q leaked", e.name(), xattrKeys(e.hdr))
		}
	}
	if got := strings.Join(names, ","); got != "d,d/.wh..wh..opq,d/new" {
		t.Errorf("layer = %s, want d,d/.wh..wh..opq,d/new", got)
	}
}

// TestCaptureReflinkXFS captures an overlay whose upper and snapshot share a
// reflink-capable XFS (a loop image), exercising the FICLONE path.
func TestCaptureReflinkXFS(t *testing.T) {
	dir := mountXFS(t)
	o := newOverlay(t, dir, nil)
	big := pseudoRandom(4<<20 + 7)
	mustNil(t, os.WriteFile(filepath.Join(o.merged, "big"), big, 0o644))
	writeFile(t, filepath.Join(o.merged, "small"), "small\n")

	snap := filepath.Join(dir, "snap")
	m, st := captureTo(t, o.upper, snap, CaptureOptions{})
	if st.Reflinked != 2 || st.Copied != 0 {
		t.Errorf("stats = %+v, want 2 reflinked", st)
	}
	mustNil(t, os.WriteFile(filepath.Join(o.upper, "big"), []byte("overwritten"), 0o644))
	idx := tarIndex(readTar(t, layerBytes(t, m, snap)))
	if string(idx["big"].data) != string(big) || string(idx["small"].data) != "small\n" {
		t.Error("reflinked data differs from what was written")
	}
}

// mountXFS mounts a fresh reflink-enabled XFS loop image and returns its
// mount point; the image is unmounted and its loop device released in Cleanup.
// It skips the test when not root, in -short mode or without mkfs.xfs.
func mountXFS(t *testing.T) string {
	t.Helper()
	requireRoot(t)
	if testing.Short() {
		t.Skip("short mode")
	}
	mkfs, err := exec.LookPath("mkfs.xfs")
	if err != nil {
		t.Skip("mkfs.xfs not installed")
	}
	base := t.TempDir()
	img, dir := filepath.Join(base, "xfs.img"), filepath.Join(base, "mnt")
	mustNil(t, os.Mkdir(dir, 0o755))
	f, err := os.Create(img)
	mustNil(t, err)
	mustNil(t, f.Truncate(512<<20))
	mustNil(t, f.Close())
	if out, err := exec.Command(mkfs, "-q", "-m", "reflink=1", img).CombinedOutput(); err != nil {
		t.Skipf("mkfs.xfs: %v: %s", err, out)
	}
	if out, err := exec.Command("mount", "-o", "loop", img, dir).CombinedOutput(); err != nil {
		t.Skipf("loop mount: %v: %s", err, out)
	}
	t.Cleanup(func() {
		unmount(t, dir)
		detachLoop(t, img)
	})
	return dir
}

// detachLoop releases any loop device still backed by img (mount -o loop
// sets autoclear, so normally there is none).
func detachLoop(t *testing.T, img string) {
	t.Helper()
	out, err := exec.Command("losetup", "-j", img, "-O", "NAME", "-n").Output()
	if err != nil {
		return
	}
	for _, dev := range strings.Fields(string(out)) {
		if err := exec.Command("losetup", "-d", dev).Run(); err != nil {
			t.Errorf("losetup -d %s: %v", dev, err)
		}
	}
}
