package uploader

import (
	"bytes"
	"context"
	"crypto/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seamless-snapshot/seamless/snapshot"
)

// TestCollect: gc removes done, failed and interrupted snapshots older
// than the cutoff, and never one that is younger, being captured, or whose
// uploader holds the lock.
func TestCollect(t *testing.T) {
	store := snapshot.Store{Root: t.TempDir()}
	old := time.Now().Add(-2 * time.Hour)
	mk := func(id string, phase snapshot.Phase, pid int) {
		st := newSnapshot(t, store, id, "127.0.0.1:1/x:1")
		st.Phase, st.UploaderPID = phase, pid
		if err := store.Save(st); err != nil {
			t.Fatal(err)
		}
	}
	mk("done-old", snapshot.PhaseDone, 0)
	mk("failed-old", snapshot.PhaseFailed, 0)
	mk("interrupted-old", snapshot.PhasePushing, 1<<22) // no such pid
	mk("captured-old", snapshot.PhaseCaptured, 0)       // its uploader may be about to start
	mk("capturing-old", snapshot.PhaseCapturing, 0)
	mk("locked-old", snapshot.PhaseFailed, 0)
	mk("done-young", snapshot.PhaseDone, 0)
	// Age all but the young one by rewriting updated_at.
	for _, id := range []string{"done-old", "failed-old", "interrupted-old", "captured-old", "capturing-old", "locked-old"} {
		p := filepath.Join(store.Dir(id), snapshot.StateFile)
		b, _ := os.ReadFile(p)
		st, _ := store.Load(id)
		b = bytes.Replace(b, []byte(st.UpdatedAt.Format(time.RFC3339Nano)), []byte(old.UTC().Format(time.RFC3339Nano)), 1)
		os.WriteFile(p, b, 0o600)
	}
	lock, err := lockDir(store.Dir("locked-old"))
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()

	cutoff := time.Now().Add(-time.Hour)
	dry, err := Collect(store, cutoff, true)
	if err != nil {
		t.Fatal(err)
	}
	got, err := Collect(store, cutoff, false)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, c := range got {
		ids = append(ids, c.ID+"/"+string(c.Phase))
		if c.Bytes <= 0 {
			t.Errorf("%s: %d bytes", c.ID, c.Bytes)
		}
	}
	want := "done-old/done failed-old/failed interrupted-old/interrupted"
	if strings.Join(ids, " ") != want || len(dry) != len(got) {
		t.Errorf("collected %v (dry run %d); want %s", ids, len(dry), want)
	}
	for _, id := range []string{"done-old", "failed-old", "interrupted-old"} {
		if exists(store.Dir(id)) {
			t.Errorf("%s not removed", id)
		}
	}
	for _, id := range []string{"captured-old", "capturing-old", "locked-old", "done-young"} {
		if !exists(store.Dir(id)) {
			t.Errorf("%s removed", id)
		}
	}
}

// TestDiskFull: a full disk during the build fails the snapshot with a
// clear error, removes the partial spool and still records the state.
func TestDiskFull(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounts a tmpfs")
	}
	root := t.TempDir()
	if err := unix.Mount("tmpfs", root, "tmpfs", 0, "size=12m,mode=0700"); err != nil {
		t.Skipf("mount tmpfs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(root, unix.MNT_DETACH) })
	store := snapshot.Store{Root: root}
	newSnapshot(t, store, "s1", "127.0.0.1:1/x:1")
	random := make([]byte, 7<<20) // incompressible: the spool is as big
	rand.Read(random)
	if err := os.WriteFile(filepath.Join(store.Dir("s1"), snapshot.DataDir, "capture"), random, 0o600); err != nil {
		t.Fatal(err)
	}
	var logBuf bytes.Buffer
	err := Upload(context.Background(), store, "s1", Options{
		Layer: bytesLayer(random),
		Base:  fixedBase(baseImage(t, false), &trackingCloser{}),
		Log:   &logBuf,
	})
	if err == nil || !strings.Contains(err.Error(), "disk full") || !strings.Contains(err.Error(), "no space left on device") {
		t.Fatalf("Upload on a full disk: %v", err)
	}
	st, lerr := store.Load("s1")
	if lerr != nil || st.Phase != snapshot.PhaseFailed || !strings.HasPrefix(st.Error, "build layer: disk full: no room for the layer spool in ") {
		t.Fatalf("state: %v %+v", lerr, st)
	}
	t.Logf("error: %s", st.Error)
	for _, f := range []string{snapshot.LayerFile, snapshot.LayerFile + ".partial"} {
		if exists(filepath.Join(store.Dir("s1"), f)) {
			t.Errorf("%s left on the full disk", f)
		}
	}
	if !exists(filepath.Join(store.Dir("s1"), snapshot.DataDir, "capture")) {
		t.Error("the capture was removed")
	}
}
