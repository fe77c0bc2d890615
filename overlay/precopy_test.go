package overlay

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// opsOverlay is an overlay with lower files, lower dirs and upper content to
// exercise copy-ups, whiteouts, opaque dirs, hardlinks and renames.
func opsOverlay(t *testing.T) *testOverlay {
	t.Helper()
	o := newOverlay(t, t.TempDir(), func(lower string) {
		for _, f := range []string{"cu/a", "cu/b", "cu/c", "del/a", "del/b", "ldir/x", "ldir/sub/y", "lhl/f", "lmv/f"} {
			writeFile(t, filepath.Join(lower, f), "lower "+f+"\n")
		}
	})
	m := func(p string) string { return filepath.Join(o.merged, p) }
	for i := 0; i < 30; i++ {
		writeFile(t, m(fmt.Sprintf("dirs/d%d/f%d", i%5, i)), strings.Repeat("u", i*100))
	}
	writeFile(t, m("hl/one"), "shared inode\n")
	mustNil(t, os.Link(m("hl/one"), m("hl/two")))
	mustNil(t, os.Link(m("hl/one"), m("dirs/d0/three")))
	writeFile(t, m("mv/src/inner/f"), "moving dir\n")
	writeFile(t, m("over/old"), "old\n")
	writeFile(t, m("over/new"), "new\n")
	writeFile(t, m("mod"), "modify me\n")
	mustNil(t, os.Remove(m("del/a"))) // a whiteout from before the pre-copy
	return o
}

// opsAfter are the changes made after the pre-copy (through the merged dir).
func opsAfter(merged string) []string {
	m := func(p string) string { return filepath.Join(merged, p) }
	return []string{
		"append:" + m("cu/a") + ":copied up\n", // copy-up by write
		"chmod:" + m("cu/b") + ":600",          // copy-up by chmod
		"xattr:" + m("cu/c") + ":user.k:v",     // copy-up by setxattr
		"rm:" + m("del/b"),                     // whiteout
		"rmrf:" + m("ldir"),                    // rm -rf a lower dir...
		"mkdir:" + m("ldir"),                   // ...and mkdir: opaque dir
		"write:" + m("ldir/fresh") + ":fresh\n",
		"append:" + m("hl/two") + ":via two\n",  // hardlink: written through another name
		"rm:" + m("dirs/d0/three"),              // a name of it goes away
		"ln:" + m("lhl/f") + ":" + m("lhl/g"),   // hardlink of a lower file (copy-up)
		"mv:" + m("mv/src") + ":" + m("mv/dst"), // rename of an upper dir with content
		"write:" + m("mv/dst/inner/g") + ":added after the move\n",
		"mv:" + m("over/new") + ":" + m("over/old"), // rename over an existing file
		"symlink:../mod:" + m("link"),
		"mkdir:" + m("deep/a/b/c"),
		"write:" + m("deep/a/b/c/f") + ":deep\n",
		"write:" + m("mod") + ":modified\n",
		"rmrf:" + m("dirs/d4"),
		"mv:" + m("lmv/f") + ":" + m("lmv/g"), // rename of a lower file: copy-up + whiteout
		"rmrf:" + m("dirs/d3"),                // an upper dir replaced in place...
		"mkdir:" + m("dirs/d3"),
		"write:" + m("dirs/d3/again") + ":again\n",
		"rmrf:" + m("del"), // ...and a copied-up one holding whiteouts (opaque now)
		"mkdir:" + m("del"),
		"chmod:" + m("hl") + ":700", // attributes of directories themselves
		"xattr:" + m("dirs/d0") + ":user.dir:x",
		"touch:" + m("dirs"),
		"chmod:" + m("lhl") + ":750", // a copied-up dir
		"touch:" + m("link"),         // a symlink's own times
		"mkfifo:" + m("fifo"),
		"mknod:" + m("dirs/null"),
	}
}

// finishAndCompare finishes p (nothing else runs) and compares it with a
// reference Capture of the same instant.
func finishAndCompare(t *testing.T, p *Precopy, o *testOverlay, snapA, snapB string, opts CaptureOptions) FinishStats {
	t.Helper()
	m, fs, err := p.Finish(context.Background(), nil)
	if err != nil {
		t.Fatalf("Finish: %v", err)
	}
	ref, _ := captureTo(t, o.upper, snapB, opts)
	for _, d := range captureDiffs(t, m, snapA, ref, snapB) {
		t.Error(d)
	}
	loaded, err := LoadManifest(snapA)
	mustNil(t, err)
	if len(loaded.Entries) != len(m.Entries) {
		t.Errorf("manifest.json has %d entries, Finish returned %d", len(loaded.Entries), len(m.Entries))
	}
	checkNoStrayData(t, m, snapA)
	return fs
}

// checkNoStrayData requires every data file to be referenced, like Capture.
func checkNoStrayData(t *testing.T, m *Manifest, snap string) {
	t.Helper()
	used := map[string]bool{}
	for _, e := range m.Entries {
		used[e.Data] = true
	}
	files, err := os.ReadDir(filepath.Join(snap, "data"))
	mustNil(t, err)
	for _, f := range files {
		if !used[f.Name()] {
			t.Errorf("data file %s is referenced by no entry", f.Name())
		}
	}
}

func TestPrecopyOpsAfterPrecopy(t *testing.T) {
	requireRoot(t)
	o := opsOverlay(t)
	snapA, snapB := snapDirs(t, t.TempDir(), 0)
	p, err := StartPrecopy(context.Background(), o.upper, snapA, PrecopyOptions{Mountpoint: o.merged})
	mustNil(t, err)
	defer p.Close()
	st := p.Stats()
	if !st.Tracking || st.Entries == 0 || st.DataCopy == "" {
		t.Fatalf("stats = %+v", st)
	}
	runOpsChild(t, opsAfter(o.merged)...)
	fs := finishAndCompare(t, p, o, snapA, snapB, CaptureOptions{})
	t.Logf("precopy %+v", st)
	t.Logf("finish %+v", fs)
	if fs.Fallback || fs.DirtyEntries == 0 || fs.DirtyEntries > 80 {
		t.Errorf("finish stats = %+v, want a small dirty set without fallback", fs)
	}
}

// TestPrecopyPrepare: Prepare re-copies the changes made since the
// pre-copy, so that Recapture finds nothing dirty; changes made after
// Prepare are still captured.
func TestPrecopyPrepare(t *testing.T) {
	requireRoot(t)
	o := opsOverlay(t)
	snapA, snapB := snapDirs(t, t.TempDir(), 0)
	p, err := StartPrecopy(context.Background(), o.upper, snapA, PrecopyOptions{Mountpoint: o.merged})
	mustNil(t, err)
	defer p.Close()
	runOpsChild(t, opsAfter(o.merged)...)
	waitPending(t, p)
	mustNil(t, p.Prepare(context.Background(), []int{os.Getpid()}))
	if n := p.tracker.pending(); n != 0 {
		t.Errorf("%d dirty names left after Prepare", n)
	}
	fs := finishAndCompare(t, p, o, snapA, snapB, CaptureOptions{})
	if fs.Fallback || fs.DirtyEntries > 4 {
		t.Errorf("finish after Prepare = %+v, want (almost) nothing dirty, no fallback", fs)
	}
	if err := p.Prepare(context.Background(), nil); err == nil {
		t.Error("Prepare after Recapture succeeded")
	}

	// Changes after Prepare are the pause's.
	o2 := opsOverlay(t)
	snapC, snapD := snapDirs(t, t.TempDir(), 1)
	p2, err := StartPrecopy(context.Background(), o2.upper, snapC, PrecopyOptions{Mountpoint: o2.merged})
	mustNil(t, err)
	defer p2.Close()
	mustNil(t, p2.Prepare(context.Background(), nil))
	runOpsChild(t, opsAfter(o2.merged)...)
	fs = finishAndCompare(t, p2, o2, snapC, snapD, CaptureOptions{})
	if fs.Fallback || fs.DirtyEntries == 0 {
		t.Errorf("finish of changes after Prepare = %+v", fs)
	}
}

// waitPending waits until the tracker's reader has queued some dirty names.
func waitPending(t *testing.T, p *Precopy) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); p.tracker.pending() == 0; {
		if time.Now().After(deadline) {
			t.Fatal("no dirty names seen")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestPrecopyOpsDuringWalk changes the tree while the full copy walks it:
// the directory being opened is renamed away, others are replaced.
func TestPrecopyOpsDuringWalk(t *testing.T) {
	requireRoot(t)
	o := opsOverlay(t)
	m := func(p string) string { return filepath.Join(o.merged, p) }
	snapA, snapB := snapDirs(t, t.TempDir(), 0)
	fired := false
	hook := func(rel string) {
		if rel != "dirs/d2" || fired {
			return
		}
		fired = true
		runOpsChild(t, append([]string{
			"mv:" + m("dirs/d2") + ":" + m("dirs/d2moved"), // the dir about to be opened
			"mv:" + m("dirs/d1") + ":" + m("dirs/d3/d1"),   // an already walked one, into a later one
			"mv:" + m("dirs/d4") + ":" + m("d4top"),        // a later one, out of its parent
			"write:" + m("dirs/d3/new") + ":during\n",
		}, opsAfter(o.merged)...)...)
	}
	p, err := startPrecopy(context.Background(), o.upper, snapA, PrecopyOptions{Mountpoint: o.merged},
		func(p *Precopy) { p.beforeOpen = hook })
	mustNil(t, err)
	defer p.Close()
	if !fired {
		t.Fatal("the walk hook did not fire")
	}
	fs := finishAndCompare(t, p, o, snapA, snapB, CaptureOptions{})
	t.Logf("precopy %+v", p.Stats())
	t.Logf("finish %+v", fs)
	if fs.Fallback {
		t.Errorf("unexpected fallback: %s", fs.FallbackReason)
	}
}

// TestPrecopyFallback forces the full-rescan path: tracking disabled, and a
// simulated queue overflow.
func TestPrecopyFallback(t *testing.T) {
	requireRoot(t)
	for _, mode := range []string{"disabled", "overflow"} {
		t.Run(mode, func(t *testing.T) {
			o := opsOverlay(t)
			snapA, snapB := snapDirs(t, t.TempDir(), 0)
			opts := PrecopyOptions{Mountpoint: o.merged, DisableTracking: mode == "disabled"}
			p, err := StartPrecopy(context.Background(), o.upper, snapA, opts)
			mustNil(t, err)
			defer p.Close()
			runOpsChild(t, opsAfter(o.merged)...)
			if mode == "overflow" {
				p.tracker.mu.Lock()
				p.tracker.overflow = true
				p.tracker.mu.Unlock()
			}
			fs := finishAndCompare(t, p, o, snapA, snapB, CaptureOptions{})
			t.Logf("finish %+v", fs)
			want := map[string]string{"disabled": "disabled", "overflow": "overflow"}[mode]
			if !fs.Fallback || !strings.Contains(fs.FallbackReason, want) {
				t.Errorf("Fallback %v (%q), want a fallback mentioning %q", fs.Fallback, fs.FallbackReason, want)
			}
		})
	}
}

// TestPrecopyFallbackSameSizeRewrite: in a fallback rescan, a file rewritten
// after it was staged with the same size and mtime is still re-copied (its
// ctime moved), and only it.
func TestPrecopyFallbackSameSizeRewrite(t *testing.T) {
	requireRoot(t)
	o := newOverlay(t, t.TempDir(), nil)
	writeFile(t, filepath.Join(o.merged, "f"), "aaaa")
	writeFile(t, filepath.Join(o.merged, "g"), "gggg")
	time.Sleep(2 * racyWindow) // older than the racy window: only the ctime tells
	snapA, snapB := snapDirs(t, t.TempDir(), 0)
	p, err := StartPrecopy(context.Background(), o.upper, snapA, PrecopyOptions{DisableTracking: true})
	mustNil(t, err)
	defer p.Close()
	var st unix.Stat_t
	mustNil(t, unix.Stat(filepath.Join(o.upper, "f"), &st))
	mustNil(t, os.WriteFile(filepath.Join(o.upper, "f"), []byte("bbbb"), 0o644))
	ts := []unix.Timespec{st.Mtim, st.Mtim}
	mustNil(t, unix.UtimesNanoAt(unix.AT_FDCWD, filepath.Join(o.upper, "f"), ts, 0))
	fs := finishAndCompare(t, p, o, snapA, snapB, CaptureOptions{})
	if !fs.Fallback || fs.Files != 1 {
		t.Errorf("finish = %+v, want a fallback that re-copies f", fs)
	}
}

func TestPrecopyExcludeAndErrors(t *testing.T) {
	requireRoot(t)
	o := opsOverlay(t)
	snapA, snapB := snapDirs(t, t.TempDir(), 0)
	opts := CaptureOptions{Exclude: []string{"dirs/d1", "mod"}}
	p, err := StartPrecopy(context.Background(), o.upper, snapA, PrecopyOptions{CaptureOptions: opts, Mountpoint: o.merged})
	mustNil(t, err)
	defer p.Close()
	runOpsChild(t, "write:"+filepath.Join(o.merged, "dirs/d1/new")+":x", "write:"+filepath.Join(o.merged, "mod")+":y")
	finishAndCompare(t, p, o, snapA, snapB, opts)
	if _, _, err := p.Finish(context.Background(), nil); err == nil {
		t.Error("a second Finish succeeded")
	}
	if _, err := p.Seal(context.Background()); err == nil {
		t.Error("a second Seal succeeded")
	}
	mustNil(t, p.Close())
	mustNil(t, p.Close())

	if _, err := StartPrecopy(context.Background(), o.upper, t.TempDir(), PrecopyOptions{CaptureOptions: CaptureOptions{Exclude: []string{"../x"}}}); err == nil {
		t.Error("an invalid exclude was accepted")
	}
	if _, err := StartPrecopy(context.Background(), o.upper, filepath.Join(o.upper, "snap"), PrecopyOptions{}); err == nil {
		t.Error("a snapshot dir inside the upper dir was accepted")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := StartPrecopy(ctx, o.upper, t.TempDir(), PrecopyOptions{}); err == nil {
		t.Error("a cancelled pre-copy succeeded")
	}
	p2, err := StartPrecopy(context.Background(), o.upper, t.TempDir(), PrecopyOptions{})
	mustNil(t, err)
	defer p2.Close()
	if _, err := p2.Seal(context.Background()); err == nil {
		t.Error("Seal before Recapture succeeded")
	}
	if _, err := p2.Recapture(ctx, nil); err == nil {
		t.Error("a cancelled Recapture succeeded")
	}
	if _, err := p2.Seal(context.Background()); err == nil {
		t.Error("Seal after a failed Recapture succeeded")
	}
}

// TestPrecopyEmptyUpper matches Capture on an empty upper dir.
func TestPrecopyEmptyUpper(t *testing.T) {
	requireRoot(t)
	o := newOverlay(t, t.TempDir(), nil)
	snapA, snapB := snapDirs(t, t.TempDir(), 0)
	p, err := StartPrecopy(context.Background(), o.upper, snapA, PrecopyOptions{})
	mustNil(t, err)
	defer p.Close()
	start := time.Now()
	finishAndCompare(t, p, o, snapA, snapB, CaptureOptions{})
	t.Logf("finish+capture %v", time.Since(start))
}

// TestPrecopyWriteThroughUnlinkedName: a file with two names is written
// through a descriptor of a name that was unlinked (and processed) earlier;
// the event names the dead name only, yet the live name must be re-captured.
func TestPrecopyWriteThroughUnlinkedName(t *testing.T) {
	requireRoot(t)
	o := newOverlay(t, t.TempDir(), nil)
	m := func(p string) string { return filepath.Join(o.merged, p) }
	writeFile(t, m("hl/x"), "before\n")
	mustNil(t, os.Mkdir(m("other"), 0o755))
	mustNil(t, os.Link(m("hl/x"), m("other/y")))
	cg := newTestCgroup(t)
	w := startChild(t, cg, "fdwriter", false, m("hl/x"))
	snapA, snapB := snapDirs(t, t.TempDir(), 0)
	p, err := StartPrecopy(context.Background(), o.upper, snapA, PrecopyOptions{Mountpoint: o.merged})
	mustNil(t, err)
	defer p.Close()
	runOpsChild(t, "rm:"+m("hl/x"))
	if _, err := p.round(context.Background()); err != nil { // the unlink is processed before the write
		t.Fatal(err)
	}
	if got := w.say(t, "write"); got != "written" {
		t.Fatalf("fdwriter: %q", got)
	}
	fs := finishAndCompare(t, p, o, snapA, snapB, CaptureOptions{})
	if fs.Fallback {
		t.Errorf("fallback: %s", fs.FallbackReason)
	}
}

// TestPrecopyNeverFollowsSymlinks: after the pre-copy, dirty dirs and files
// are replaced by symlinks to host paths; the re-capture records the
// symlinks and reads nothing through them.
func TestPrecopyNeverFollowsSymlinks(t *testing.T) {
	requireRoot(t)
	o := opsOverlay(t)
	m := func(p string) string { return filepath.Join(o.merged, p) }
	snapA, snapB := snapDirs(t, t.TempDir(), 0)
	p, err := StartPrecopy(context.Background(), o.upper, snapA, PrecopyOptions{Mountpoint: o.merged})
	mustNil(t, err)
	defer p.Close()
	runOpsChild(t,
		"write:"+m("dirs/d1/f1")+":dirty before the swap\n",
		"rmrf:"+m("dirs/d1"), "symlink:/etc:"+m("dirs/d1"),
		"rm:"+m("mod"), "symlink:/etc/passwd:"+m("mod"),
		"rmrf:"+m("dirs/d2"), "symlink:/:"+m("dirs/d2"),
	)
	finishAndCompare(t, p, o, snapA, snapB, CaptureOptions{})
	passwd, err := os.ReadFile("/etc/passwd")
	mustNil(t, err)
	files, err := os.ReadDir(filepath.Join(snapA, "data"))
	mustNil(t, err)
	for _, f := range files {
		if b, _ := os.ReadFile(filepath.Join(snapA, "data", f.Name())); len(passwd) > 0 && string(b) == string(passwd) {
			t.Errorf("host /etc/passwd was copied into data/%s", f.Name())
		}
	}
}

// TestPrecopyReflinkXFS pre-copies with FICLONE (upper and snapshot on one
// XFS), then rewrites staged files in place: a shrinking rewrite must not
// leave the old tail behind.
func TestPrecopyReflinkXFS(t *testing.T) {
	dir := mountXFS(t)
	o := newOverlay(t, dir, nil)
	writeFile(t, filepath.Join(o.merged, "big"), string(pseudoRandom(4<<20)))
	writeFile(t, filepath.Join(o.merged, "grow"), "small")
	mustNil(t, SyncFS(o.upper))
	snapA, snapB := filepath.Join(dir, "pre"), filepath.Join(dir, "ref")
	mustNil(t, os.Mkdir(snapA, 0o700))
	mustNil(t, os.Mkdir(snapB, 0o700))
	p, err := StartPrecopy(context.Background(), o.upper, snapA, PrecopyOptions{Mountpoint: o.merged})
	mustNil(t, err)
	defer p.Close()
	if st := p.Stats(); st.DataCopy != "reflink" {
		t.Errorf("pre-copy data copy = %q, want reflink", st.DataCopy)
	}
	runOpsChild(t, "write:"+filepath.Join(o.merged, "big")+":shrunk\n",
		"write:"+filepath.Join(o.merged, "grow")+":"+strings.Repeat("g", 100000))
	fs := finishAndCompare(t, p, o, snapA, snapB, CaptureOptions{})
	if fs.Files != 2 || fs.Fallback {
		t.Errorf("finish = %+v, want 2 files re-copied", fs)
	}
}

// TestPrecopyUserXattr: an overlay mounted with userxattr keeps its opaque
// marks in user.overlay.*; the pre-copied capture must match Capture's.
func TestPrecopyUserXattr(t *testing.T) {
	requireRoot(t)
	base := t.TempDir()
	o := &testOverlay{lower: filepath.Join(base, "l"), upper: filepath.Join(base, "u"), work: filepath.Join(base, "w"), merged: filepath.Join(base, "m")}
	for _, d := range []string{o.upper, o.work, o.merged} {
		mustNil(t, os.Mkdir(d, 0o755))
	}
	writeFile(t, filepath.Join(o.lower, "d/old"), "old\n")
	writeFile(t, filepath.Join(o.lower, "f"), "f\n")
	mountOverlay(t, o.merged, "userxattr,lowerdir="+o.lower+",upperdir="+o.upper+",workdir="+o.work)
	snapA, snapB := snapDirs(t, t.TempDir(), 0)
	opts := CaptureOptions{UserXattr: true}
	p, err := StartPrecopy(context.Background(), o.upper, snapA, PrecopyOptions{CaptureOptions: opts})
	mustNil(t, err)
	defer p.Close()
	runOpsChild(t, "rmrf:"+filepath.Join(o.merged, "d"), "mkdir:"+filepath.Join(o.merged, "d"),
		"write:"+filepath.Join(o.merged, "d/new")+":new\n", "append:"+filepath.Join(o.merged, "f")+":more\n")
	finishAndCompare(t, p, o, snapA, snapB, opts)
	if len(p.mountPaths) == 0 {
		t.Error("the merged mount point was not found from the upper dir")
	}
}

// TestPrecopyLinksOutsideUpper: inodes with links the capture does not see
// change without any event naming a recorded path. Overlay's shared whiteout
// gains and loses links in the workdir (whiteouts cleaned up there); writes
// to a hardlinked file may be reported under its name in an excluded dir.
func TestPrecopyLinksOutsideUpper(t *testing.T) {
	requireRoot(t)
	o := newOverlay(t, t.TempDir(), func(lower string) {
		writeFile(t, filepath.Join(lower, "x"), "x\n")
		writeFile(t, filepath.Join(lower, "y"), "y\n")
	})
	m := func(p string) string { return filepath.Join(o.merged, p) }
	mustNil(t, os.Remove(m("x"))) // whiteouts: links of the shared whiteout
	mustNil(t, os.Remove(m("y")))
	// Overlay reports writes to any name of a hardlinked file under the name
	// its inode was first looked up by: make that the excluded one.
	writeFile(t, m("excl/g"), "g\n")
	mustNil(t, os.Link(m("excl/g"), m("f")))
	var st unix.Stat_t
	mustNil(t, unix.Lstat(filepath.Join(o.upper, "x"), &st))
	if st.Nlink < 2 {
		t.Skipf("this kernel does not share whiteouts (nlink %d)", st.Nlink)
	}
	snapA, snapB := snapDirs(t, t.TempDir(), 0)
	opts := CaptureOptions{Exclude: []string{"excl"}}
	p, err := StartPrecopy(context.Background(), o.upper, snapA, PrecopyOptions{CaptureOptions: opts, Mountpoint: o.merged})
	mustNil(t, err)
	defer p.Close()
	mustNil(t, os.Link(filepath.Join(o.upper, "x"), filepath.Join(o.work, "extra-whiteout-link")))
	runOpsChild(t, "append:"+m("f")+":reported under the excluded name\n")
	fs := finishAndCompare(t, p, o, snapA, snapB, opts)
	if fs.Fallback || fs.Files != 1 {
		t.Errorf("finish = %+v, want f re-copied without fallback", fs)
	}
}
