package uploader

import (
	"io"
	"testing"
	"time"

	"github.com/seamless-snapshot/seamless/snapshot"
)

func TestStateWriterFlushesProgressInTheBackground(t *testing.T) {
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

	w.progress(5, 10) // memory only until the flusher runs
	if p := onDisk(); p != (snapshot.Progress{}) {
		t.Fatalf("progress written at once: %+v", p)
	}
	w.flush()
	if p := onDisk(); p != (snapshot.Progress{Done: 5, Total: 10}) {
		t.Fatalf("after flush: %+v", p)
	}
	if err := w.phase(snapshot.PhasePushing, 0); err != nil {
		t.Fatal(err)
	}
	if p := onDisk(); p != (snapshot.Progress{}) {
		t.Fatalf("phase change did not reset progress: %+v", p)
	}
	w.progress(20, 10) // done beyond an approximate total raises the total
	w.close()          // saves what is pending
	if p := onDisk(); p != (snapshot.Progress{Done: 20, Total: 20}) {
		t.Fatalf("progress past total, after close: %+v", p)
	}
	w2 := newStateWriter(store, st, 10*time.Millisecond, io.Discard)
	defer w2.close()
	w2.progress(7, 8)
	deadline := time.Now().Add(5 * time.Second)
	for onDisk().Done != 7 {
		if time.Now().After(deadline) {
			t.Fatal("the flusher never saved the progress")
		}
		time.Sleep(5 * time.Millisecond)
	}
}
