package overlay

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// fileCap is a VFS_CAP_REVISION_2 security.capability granting
// CAP_NET_BIND_SERVICE (permitted + effective).
var fileCap = []byte{0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}

var fixedMtime = time.Date(2024, 5, 6, 7, 8, 9, 123456789, time.UTC)

// scenario builds an overlay exercising every capture rule through its merged dir.
func scenario(t *testing.T) *testOverlay {
	t.Helper()
	o := newOverlay(t, t.TempDir(), func(lower string) {
		writeFile(t, filepath.Join(lower, "keep.txt"), "keep\n")
		writeFile(t, filepath.Join(lower, "mod.txt"), "original\n")
		writeFile(t, filepath.Join(lower, "del.txt"), "delete me\n")
		writeFile(t, filepath.Join(lower, "olddir/x"), "x\n")
		writeFile(t, filepath.Join(lower, "olddir/sub/y"), "y\n")
		writeFile(t, filepath.Join(lower, "ldir/lfile"), "lf\n")
		writeFile(t, filepath.Join(lower, "ldir/gone"), "gone\n")
	})
	m := func(p string) string { return filepath.Join(o.merged, p) }

	writeFile(t, m("with space.txt"), "hello spaces\n")
	mustNil(t, os.Chtimes(m("with space.txt"), fixedMtime, fixedMtime))
	f, err := os.OpenFile(m("mod.txt"), os.O_APPEND|os.O_WRONLY, 0)
	mustNil(t, err)
	_, err = f.WriteString("appended\n")
	mustNil(t, err)
	mustNil(t, f.Close())
	mustNil(t, os.Remove(m("del.txt")))
	mustNil(t, os.RemoveAll(m("olddir")))
	mustNil(t, os.Mkdir(m("olddir"), 0o755))
	writeFile(t, m("olddir/new.txt"), "new\n")
	writeFile(t, m("ldir/added"), "added\n")
	mustNil(t, os.Remove(m("ldir/gone")))

	mustNil(t, os.Symlink("/etc/shadow", m("abs-link")))
	mustNil(t, os.Mkdir(m("links"), 0o755))
	mustNil(t, os.Symlink("../../../../etc/passwd", m("links/rel-link")))
	writeFile(t, m("hl-a"), "shared\n")
	mustNil(t, os.Link(m("hl-a"), m("hl-b")))

	writeFile(t, m("owned"), "o\n")
	mustNil(t, os.Chmod(m("owned"), 0o640))
	mustNil(t, os.Lchown(m("owned"), 1234, 5678))
	writeFile(t, m("suid"), "#!/bin/true\n")
	mustNil(t, unix.Chmod(m("suid"), 0o4755))

	writeFile(t, m("xattr.txt"), "xattrs\n")
	mustNil(t, unix.Setxattr(m("xattr.txt"), "user.foo", []byte("bar"), 0))
	mustNil(t, unix.Setxattr(m("xattr.txt"), "security.capability", fileCap, 0))
	mustNil(t, os.Mkdir(m("fakeopaque"), 0o755))
	// Not overlay metadata on a trusted.overlay mount: dropped, never honoured.
	mustNil(t, unix.Setxattr(m("fakeopaque"), "user.overlay.opaque", []byte("y"), 0))

	mustNil(t, unix.Mkfifo(m("fifo"), 0o644))
	mustNil(t, unix.Mknod(m("null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))))
	mustNil(t, os.Chmod(m("null"), 0o666))
	makeSocket(t, m("sock"))
	mustNil(t, os.Mkdir(m("emptydir"), 0o700))
	mustNil(t, os.Chmod(m("emptydir"), 0o700))
	mustNil(t, os.WriteFile(m("big.bin"), pseudoRandom(3<<19+123), 0o644))
	writeFile(t, m("empty"), "")
	return o
}

// makeSocket leaves a unix socket inode at p.
func makeSocket(t *testing.T, p string) {
	t.Helper()
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: p, Net: "unix"})
	mustNil(t, err)
	l.SetUnlinkOnClose(false)
	mustNil(t, l.Close())
}

// wantNames are the layer entries of scenario, in order (a whiteout sits
// where the deleted name sorts).
var wantNames = []string{
	"abs-link", "big.bin", ".wh.del.txt", "empty", "emptydir", "fakeopaque", "fifo",
	"hl-a", "hl-b", "ldir", "ldir/added", "ldir/.wh.gone", "links", "links/rel-link",
	"mod.txt", "null", "olddir", "olddir/.wh..wh..opq", "olddir/new.txt", "owned", "suid",
	"with space.txt", "xattr.txt",
}

func TestCaptureAndWriteLayer(t *testing.T) {
	requireRoot(t)
	o := scenario(t)
	snap := filepath.Join(t.TempDir(), "snap")
	m, stats := captureTo(t, o.upper, snap, CaptureOptions{})

	checkManifest(t, m)
	if stats.Entries != len(m.Entries) || stats.Files != 11 || stats.Copied+stats.Reflinked != 9 {
		t.Errorf("stats = %+v, want 11 files, 9 data files", stats)
	}
	if want := int64(3<<19 + 123 + 69); stats.Bytes != want {
		t.Errorf("stats.Bytes = %d, want %d", stats.Bytes, want)
	}
	loaded, err := LoadManifest(snap)
	mustNil(t, err)
	if !reflect.DeepEqual(loaded, m) {
		t.Errorf("LoadManifest differs from the returned manifest")
	}

	layer := layerBytes(t, m, snap)
	entries := readTar(t, layer)
	checkLayer(t, entries)

	if again := layerBytes(t, loaded, snap); sha(again) != sha(layer) {
		t.Errorf("WriteLayer is not deterministic")
	}
	snap2 := filepath.Join(t.TempDir(), "snap2")
	m2, _ := captureTo(t, o.upper, snap2, CaptureOptions{})
	if sha(layerBytes(t, m2, snap2)) != sha(layer) {
		t.Errorf("a second capture of the same upper gives another layer")
	}

	// The capture owns its data: later writes to the upper must not show.
	writeFile(t, filepath.Join(o.merged, "with space.txt"), "changed after capture\n")
	mustNil(t, os.Truncate(filepath.Join(o.upper, "big.bin"), 10))
	mustNil(t, os.WriteFile(filepath.Join(o.upper, "hl-a"), []byte("SHARED\n"), 0o644))
	if sha(layerBytes(t, m, snap)) != sha(layer) {
		t.Errorf("layer changed after the upper dir changed: Capture did not copy the data")
	}
}

// checkManifest asserts the raw capture of scenario.
func checkManifest(t *testing.T, m *Manifest) {
	t.Helper()
	if !sort.SliceIsSorted(m.Entries, func(i, j int) bool { return m.Entries[i].Path < m.Entries[j].Path }) {
		t.Error("manifest entries are not sorted")
	}
	idx := manifestIndex(m)
	if _, ok := idx["keep.txt"]; ok {
		t.Error("an untouched lower file is in the upper capture")
	}
	for _, p := range []string{"del.txt", "ldir/gone"} {
		if e := idx[p]; e.Type != TypeChar || e.RdevMajor != 0 || e.RdevMinor != 0 {
			t.Errorf("%s = %+v, want a 0:0 whiteout", p, e)
		}
	}
	if e := idx["sock"]; e.Type != TypeSocket {
		t.Errorf("sock = %+v, want a socket entry", e)
	}
	if e := idx["olddir"]; string(e.Xattrs["trusted.overlay.opaque"]) != "y" {
		t.Errorf("olddir xattrs = %v, want trusted.overlay.opaque", e.Xattrs)
	}
	if e := idx["mod.txt"]; e.Xattrs["trusted.overlay.origin"] == nil {
		t.Errorf("mod.txt xattrs = %v, want the raw trusted.overlay.origin", e.Xattrs)
	}
	if a, b := idx["hl-a"], idx["hl-b"]; a.Data == "" || a.Data != b.Data || a.Inode != b.Inode || a.Nlink != 2 {
		t.Errorf("hardlinks hl-a %+v / hl-b %+v should share one data file", a, b)
	}
	if e := idx["empty"]; e.Type != TypeFile || e.Size != 0 || e.Data != "" {
		t.Errorf("empty = %+v", e)
	}
}

// checkLayer asserts the translated layer of scenario.
func checkLayer(t *testing.T, entries []tarEntry) {
	t.Helper()
	var names []string
	for _, e := range entries {
		names = append(names, e.name())
		if e.hdr.Format != tar.FormatPAX && e.hdr.Format != tar.FormatUSTAR {
			t.Errorf("%s: format %v", e.hdr.Name, e.hdr.Format)
		}
		if e.hdr.Uname != "" || e.hdr.Gname != "" || !e.hdr.AccessTime.IsZero() || !e.hdr.ChangeTime.IsZero() {
			t.Errorf("%s: non-deterministic fields in %+v", e.hdr.Name, e.hdr)
		}
		for k := range e.hdr.PAXRecords {
			if strings.Contains(k, "overlay.") {
				t.Errorf("%s: overlay xattr %s leaked into the layer", e.hdr.Name, k)
			}
		}
	}
	if !reflect.DeepEqual(names, wantNames) {
		t.Fatalf("layer names:\n got %q\nwant %q", names, wantNames)
	}
	idx := tarIndex(entries)
	checkContents(t, idx)
	checkSpecials(t, idx)
}

func checkContents(t *testing.T, idx map[string]tarEntry) {
	t.Helper()
	want := map[string]string{
		"with space.txt": "hello spaces\n", "mod.txt": "original\nappended\n", "olddir/new.txt": "new\n",
		"ldir/added": "added\n", "hl-a": "shared\n", "owned": "o\n", "xattr.txt": "xattrs\n",
		"big.bin": string(pseudoRandom(3<<19 + 123)), "empty": "",
		".wh.del.txt": "", "ldir/.wh.gone": "", "olddir/.wh..wh..opq": "",
	}
	for name, content := range want {
		e := idx[name]
		if e.hdr.Typeflag != tar.TypeReg || string(e.data) != content {
			t.Errorf("%s: type %c, %d bytes; want a regular file of %d bytes", name, e.hdr.Typeflag, len(e.data), len(content))
		}
	}
	if got := idx["with space.txt"].hdr.ModTime; !got.Equal(fixedMtime) {
		t.Errorf("mtime = %v, want %v", got, fixedMtime)
	}
}

func checkSpecials(t *testing.T, idx map[string]tarEntry) {
	t.Helper()
	if h := idx["hl-b"].hdr; h.Typeflag != tar.TypeLink || h.Linkname != "hl-a" {
		t.Errorf("hl-b = %c -> %q, want a hardlink to hl-a", h.Typeflag, h.Linkname)
	}
	for name, target := range map[string]string{"abs-link": "/etc/shadow", "links/rel-link": "../../../../etc/passwd"} {
		if h := idx[name].hdr; h.Typeflag != tar.TypeSymlink || h.Linkname != target {
			t.Errorf("%s = %c -> %q, want symlink to %q", name, h.Typeflag, h.Linkname, target)
		}
	}
	if h := idx["fifo"].hdr; h.Typeflag != tar.TypeFifo || h.Mode != 0o644 {
		t.Errorf("fifo = %+v", h)
	}
	if h := idx["null"].hdr; h.Typeflag != tar.TypeChar || h.Devmajor != 1 || h.Devminor != 3 || h.Mode != 0o666 {
		t.Errorf("null = %+v", h)
	}
	if h := idx["owned"].hdr; h.Mode != 0o640 || h.Uid != 1234 || h.Gid != 5678 {
		t.Errorf("owned mode %o uid %d gid %d", h.Mode, h.Uid, h.Gid)
	}
	if h := idx["suid"].hdr; h.Mode != 0o4755 {
		t.Errorf("suid mode %o", h.Mode)
	}
	if h := idx["emptydir"].hdr; h.Typeflag != tar.TypeDir || h.Mode != 0o700 {
		t.Errorf("emptydir = %+v", h)
	}
	recs := idx["xattr.txt"].hdr.PAXRecords
	if recs["SCHILY.xattr.user.foo"] != "bar" || !bytes.Equal([]byte(recs["SCHILY.xattr.security.capability"]), fileCap) {
		t.Errorf("xattr.txt records = %q", recs)
	}
	if xattrKeys(idx["fakeopaque"].hdr) != nil {
		t.Errorf("fakeopaque records = %q", idx["fakeopaque"].hdr.PAXRecords)
	}
}

func TestCaptureExclude(t *testing.T) {
	requireRoot(t)
	o := scenario(t)
	snap := filepath.Join(t.TempDir(), "snap")
	m, _ := captureTo(t, o.upper, snap, CaptureOptions{Exclude: []string{"olddir", "big.bin", "links/rel-link", "no/such"}})
	for _, e := range m.Entries {
		if e.Path == "olddir" || strings.HasPrefix(e.Path, "olddir/") || e.Path == "big.bin" || e.Path == "links/rel-link" {
			t.Errorf("excluded %s was captured", e.Path)
		}
	}
	if _, ok := manifestIndex(m)["links"]; !ok {
		t.Error("the parent of an excluded path is missing")
	}
	for _, bad := range []string{"", ".", "/etc", "../x", "a/../b", "a/", "a//b", "./a", ".."} {
		_, _, err := Capture(context.Background(), o.upper, snap, CaptureOptions{Exclude: []string{bad}})
		if err == nil || !strings.Contains(err.Error(), "exclude") {
			t.Errorf("exclude %q: err = %v, want an invalid-exclude error", bad, err)
		}
	}
}

// TestCaptureSymlinkSwap checks that a directory replaced by a symlink is
// recorded as a symlink and never descended, even when swapped mid-walk.
func TestCaptureSymlinkSwap(t *testing.T) {
	requireRoot(t)
	o := newOverlay(t, t.TempDir(), nil)
	writeFile(t, filepath.Join(o.merged, "swap/inner"), "inner\n")
	writeFile(t, filepath.Join(o.merged, "victim"), "victim\n")
	writeFile(t, filepath.Join(o.merged, "dir/file"), "f\n")

	t.Run("before capture", func(t *testing.T) {
		mustNil(t, os.RemoveAll(filepath.Join(o.upper, "swap")))
		mustNil(t, os.Symlink("/", filepath.Join(o.upper, "swap")))
		m, _ := captureTo(t, o.upper, filepath.Join(t.TempDir(), "snap"), CaptureOptions{})
		for _, e := range m.Entries {
			if strings.HasPrefix(e.Path, "swap/") {
				t.Errorf("descended into a symlink: %s", e.Path)
			}
		}
		if e := manifestIndex(m)["swap"]; e.Type != TypeSymlink || e.Link != "/" {
			t.Errorf("swap = %+v, want a symlink to /", e)
		}
	})
	t.Run("dir swapped mid-walk", func(t *testing.T) {
		c := newCapturer(CaptureOptions{})
		c.walker.beforeOpen = func(rel string) {
			if rel == "dir" {
				mustNil(t, os.RemoveAll(filepath.Join(o.upper, "dir")))
				mustNil(t, os.Symlink("/etc", filepath.Join(o.upper, "dir")))
			}
		}
		expectSwapRefused(t, c, o.upper)
	})
	for _, swap := range []string{"symlink", "fifo"} {
		t.Run("file swapped to "+swap+" before copy", func(t *testing.T) {
			writeFile(t, filepath.Join(o.upper, "victim"), "victim\n")
			c := newCapturer(CaptureOptions{})
			c.beforeCopy = func(rel string) {
				if rel != "victim" {
					return
				}
				p := filepath.Join(o.upper, "victim")
				mustNil(t, os.Remove(p))
				if swap == "fifo" {
					mustNil(t, unix.Mkfifo(p, 0o644))
				} else {
					mustNil(t, os.Symlink("/etc/passwd", p))
				}
			}
			expectSwapRefused(t, c, o.upper)
			mustNil(t, os.Remove(filepath.Join(o.upper, "victim")))
		})
	}
}

// expectSwapRefused runs c and expects an error and no host data captured.
func expectSwapRefused(t *testing.T, c *capturer, upper string) {
	t.Helper()
	snap := filepath.Join(t.TempDir(), "snap")
	mustNil(t, os.Mkdir(snap, 0o700))
	done := make(chan error, 1)
	go func() {
		_, _, err := c.run(context.Background(), upper, snap)
		done <- err
	}()
	var err error
	select {
	case err = <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("capture hangs (opened a fifo?)")
	}
	if err == nil {
		t.Fatal("capture of a swapped object succeeded")
	}
	t.Logf("refused as expected: %v", err)
	if _, err := os.Stat(filepath.Join(snap, "manifest.json")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a manifest was written for a failed capture")
	}
	passwd, _ := os.ReadFile("/etc/passwd")
	files, _ := os.ReadDir(filepath.Join(snap, "data"))
	for _, f := range files {
		b, _ := os.ReadFile(filepath.Join(snap, "data", f.Name()))
		if len(passwd) > 0 && bytes.Equal(b, passwd) {
			t.Errorf("host file /etc/passwd was copied into %s", f.Name())
		}
	}
}

func TestCaptureRefusesMetacopy(t *testing.T) {
	requireRoot(t)
	upper := t.TempDir()
	writeFile(t, filepath.Join(upper, "f"), "sparse placeholder")
	mustNil(t, unix.Setxattr(filepath.Join(upper, "f"), "trusted.overlay.metacopy", nil, 0))
	snap := t.TempDir()
	_, _, err := Capture(context.Background(), upper, snap, CaptureOptions{})
	if err == nil || !strings.Contains(err.Error(), "metacopy") {
		t.Fatalf("err = %v, want a metacopy refusal", err)
	}
}

func TestCaptureCancelled(t *testing.T) {
	requireRoot(t)
	upper := t.TempDir()
	writeFile(t, filepath.Join(upper, "a"), "a")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, _, err := Capture(ctx, upper, t.TempDir(), CaptureOptions{}); !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
}

func TestCaptureRefusesNestedSnapDir(t *testing.T) {
	requireRoot(t)
	upper := t.TempDir()
	snap := filepath.Join(upper, "snap")
	mustNil(t, os.Mkdir(snap, 0o700))
	if _, _, err := Capture(context.Background(), upper, snap, CaptureOptions{}); err == nil {
		t.Fatal("capture into a snapshot dir inside the upper dir succeeded")
	}
}

// xattrKeys lists the SCHILY.xattr records of hdr.
func xattrKeys(hdr *tar.Header) []string {
	var keys []string
	for k := range hdr.PAXRecords {
		if strings.HasPrefix(k, "SCHILY.xattr.") {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	return keys
}
