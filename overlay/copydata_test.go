package overlay

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestCopyDataFallbacks forces each copy method in turn, and copies across
// filesystems (copy_file_range EXDEV → read/write) when /dev/shm is tmpfs.
func TestCopyDataFallbacks(t *testing.T) {
	src := t.TempDir()
	want := pseudoRandom(2<<20 + 5)
	mustNil(t, os.WriteFile(filepath.Join(src, "f"), want, 0o644))
	dsts := map[string]string{"same fs": t.TempDir()}
	var sfs unix.Statfs_t
	if unix.Statfs("/dev/shm", &sfs) == nil && sfs.Type == unix.TMPFS_MAGIC {
		shm, err := os.MkdirTemp("/dev/shm", "overlay-test")
		mustNil(t, err)
		t.Cleanup(func() { os.RemoveAll(shm) })
		dsts["tmpfs"] = shm
	}
	dirfd, err := unix.Open(src, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	mustNil(t, err)
	defer unix.Close(dirfd)
	for name, dst := range dsts {
		for _, c := range []copier{{}, {noClone: true}, {noClone: true, noRange: true}} {
			out := filepath.Join(dst, "copy")
			res, err := c.copyData(dirfd, "f", out, 0)
			mustNil(t, err)
			got, err := os.ReadFile(out)
			mustNil(t, err)
			if res.Size != int64(len(want)) || !bytes.Equal(got, want) {
				t.Errorf("%s %+v: copied %d bytes, content equal %v", name, c, res.Size, bytes.Equal(got, want))
			}
			if name == "tmpfs" && (!c.noClone || !c.noRange || res.Reflinked) {
				t.Errorf("tmpfs: copier %+v did not fall back to read/write", c)
			}
		}
	}
}

// TestCopyDataPlainBelow: files under plainBelow are copied with read and
// write (never sharing extents), in place over a longer earlier copy; larger
// ones take the normal path.
func TestCopyDataPlainBelow(t *testing.T) {
	src, dst := t.TempDir(), t.TempDir()
	dirfd, err := unix.Open(src, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	mustNil(t, err)
	defer unix.Close(dirfd)
	var c copier
	out := filepath.Join(dst, "copy")
	for _, size := range []int{pausePlainCopy + 1, 0, 1, 4096, pausePlainCopy - 1, 10} {
		want := pseudoRandom(size)
		mustNil(t, os.WriteFile(filepath.Join(src, "f"), want, 0o644))
		res, err := c.copyData(dirfd, "f", out, pausePlainCopy)
		mustNil(t, err)
		got, err := os.ReadFile(out)
		mustNil(t, err)
		if res.Size != int64(size) || !bytes.Equal(got, want) {
			t.Errorf("size %d: copied %d bytes, content equal %v (len %d)", size, res.Size, bytes.Equal(got, want), len(got))
		}
		if size < pausePlainCopy && res.Reflinked {
			t.Errorf("size %d: a small file was reflinked", size)
		}
	}
}

func TestCopyDataRefusesNonRegular(t *testing.T) {
	requireRoot(t)
	src := t.TempDir()
	mustNil(t, unix.Mkfifo(filepath.Join(src, "fifo"), 0o644))
	mustNil(t, unix.Mknod(filepath.Join(src, "dev"), unix.S_IFCHR|0o644, int(unix.Mkdev(1, 5))))
	mustNil(t, os.Symlink("/etc/passwd", filepath.Join(src, "link")))
	mustNil(t, os.Mkdir(filepath.Join(src, "sub"), 0o755))
	writeFile(t, filepath.Join(src, "sub/f"), "f")
	mustNil(t, os.Symlink("sub", filepath.Join(src, "dirlink")))
	dirfd, err := unix.Open(src, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	mustNil(t, err)
	defer unix.Close(dirfd)
	dst := filepath.Join(t.TempDir(), "out")
	var c copier
	for _, name := range []string{"fifo", "dev", "link", "dirlink/f", "../" + filepath.Base(src) + "/sub/f", "/etc/passwd"} {
		if _, err := c.copyData(dirfd, name, dst, 0); err == nil {
			t.Errorf("copyData(%q) succeeded", name)
		}
	}
	if _, err := c.copyData(dirfd, "sub/f", dst, 0); err != nil {
		t.Errorf("copyData(sub/f): %v", err)
	}
}

// TestCopyDataRewritesInPlace: copying over an existing, longer copy leaves
// exactly the new content, in the same inode.
func TestCopyDataRewritesInPlace(t *testing.T) {
	src, dst := t.TempDir(), filepath.Join(t.TempDir(), "copy")
	dirfd, err := unix.Open(src, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	mustNil(t, err)
	defer unix.Close(dirfd)
	var c copier
	var ino uint64
	for i, size := range []int{3 << 20, 10, 0, 5000} {
		want := pseudoRandom(size)
		mustNil(t, os.WriteFile(filepath.Join(src, "f"), want, 0o644))
		res, err := c.copyData(dirfd, "f", dst, 0)
		mustNil(t, err)
		got, err := os.ReadFile(dst)
		mustNil(t, err)
		var st unix.Stat_t
		mustNil(t, unix.Stat(dst, &st))
		if res.Size != int64(size) || !bytes.Equal(got, want) || (i > 0 && st.Ino != ino) {
			t.Errorf("copy %d of %d bytes: got %d bytes (equal %v), inode %d then %d", i, size, len(got), bytes.Equal(got, want), ino, st.Ino)
		}
		ino = st.Ino
	}
}
