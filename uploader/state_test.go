package uploader

import (
	"io"
	"testing"
	"time"

	"github.com/seamless-snapshot/seamless/snapshot"
)

func TestStateWriterThrottlesProgress(t *testing.T) {
	store := snapshot.Store{Root: t.TempDir()}
	st := newSnapshot(t, store, "s1", "x/y:1")
	w := newStateWriter(store, st, time.Hour, io.Discard)
	onDisk := func() snapshot.Progress {
		t.Helper()
		s, err := store.Load("s1")
		if err != nil {
			t.Fatal(err)
		}
		return s.Progress
	}

	w.progress(1, 10) // first write goes through
	if p := onDisk(); p != (snapshot.Progress{Done: 1, Total: 10}) {
		t.Fatalf("after first progress: %+v", p)
	}
	w.progress(5, 10) // within the interval: memory only
	if p := onDisk(); p.Done != 1 {
		t.Fatalf("throttled progress written: %+v", p)
	}
	if err := w.phase(snapshot.PhasePushing, 0); err != nil {
		t.Fatal(err)
	}
	if p := onDisk(); p != (snapshot.Progress{}) {
		t.Fatalf("phase change did not reset progress: %+v", p)
	}
	w.interval = 0
	w.progress(20, 10) // done beyond an approximate total raises the total
	if p := onDisk(); p != (snapshot.Progress{Done: 20, Total: 20}) {
		t.Fatalf("progress past total: %+v", p)
	}
}
