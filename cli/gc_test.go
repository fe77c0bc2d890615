package cli

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seamless-snapshot/seamless/snapshot"
	"github.com/seamless-snapshot/seamless/uploader"
)

func TestGC(t *testing.T) {
	dirs := fakeShims(t)
	store := saveStates(t, dirs,
		&snapshot.State{ID: "20260101t000000-done", Phase: snapshot.PhaseDone},
		&snapshot.State{ID: "20260101t000000-busy", Phase: snapshot.PhaseFailed},
	)
	os.WriteFile(filepath.Join(store.Dir("20260101t000000-done"), snapshot.ManifestFile), make([]byte, 3000), 0o600)
	if code, _, stderr := run(t, dirs, "gc"); code != ExitUsage || !strings.Contains(stderr, "--older-than") {
		t.Errorf("gc without --older-than: exit %d %q", code, stderr)
	}
	// Nothing is old enough.
	if code, out, _ := run(t, dirs, "gc", "--older-than", "1h"); code != 0 || !strings.Contains(out, "removed 0 snapshot(s)") {
		t.Errorf("gc --older-than 1h: exit %d %q", code, out)
	}
	// The failed one has a running uploader (it holds the upload lock).
	lock, err := os.OpenFile(filepath.Join(store.Dir("20260101t000000-busy"), uploader.LockFile), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()
	if err := flock(lock); err != nil {
		t.Fatal(err)
	}
	time.Sleep(10 * time.Millisecond)
	code, out, _ := run(t, dirs, "gc", "--older-than", "1ms", "--dry-run")
	if code != 0 || !strings.Contains(out, "would remove  20260101t000000-done  done") || strings.Contains(out, "busy") {
		t.Errorf("gc --dry-run: exit %d\n%s", code, out)
	}
	code, out, _ = run(t, dirs, "gc", "--older-than", "1ms", "--output", "json")
	var removed []uploader.Collected
	if code != 0 || json.Unmarshal([]byte(out), &removed) != nil || len(removed) != 1 || removed[0].ID != "20260101t000000-done" || removed[0].Bytes < 3000 {
		t.Errorf("gc: exit %d\n%s", code, out)
	}
	if _, err := os.Stat(store.Dir("20260101t000000-done")); err == nil {
		t.Error("done snapshot not removed")
	}
	if _, err := os.Stat(store.Dir("20260101t000000-busy")); err != nil {
		t.Error("snapshot with a running uploader removed")
	}
}

// flock takes an exclusive lock on f, as a running uploader does.
func flock(f *os.File) error { return unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) }
