package uploader

import (
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/seamless-snapshot/seamless/snapshot"
)

// stateWriter owns a snapshot's state while an upload runs: every change goes
// through it, progress writes are throttled.
type stateWriter struct {
	store    snapshot.Store
	interval time.Duration
	log      io.Writer

	mu        sync.Mutex
	st        *snapshot.State
	lastSave  time.Time
	lastPhase snapshot.Phase
}

func newStateWriter(store snapshot.Store, st *snapshot.State, interval time.Duration, log io.Writer) *stateWriter {
	return &stateWriter{store: store, st: st, interval: interval, log: log, lastPhase: st.Phase}
}

// snapshot returns a copy of the current state.
func (w *stateWriter) snapshot() snapshot.State {
	w.mu.Lock()
	defer w.mu.Unlock()
	return *w.st
}

// update applies f and saves at once.
func (w *stateWriter) update(f func(*snapshot.State)) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	f(w.st)
	return w.saveLocked()
}

// phase enters phase p with progress 0 of total and saves at once.
func (w *stateWriter) phase(p snapshot.Phase, total int64) error {
	return w.update(func(st *snapshot.State) {
		st.Phase = p
		st.Progress = snapshot.Progress{Total: total}
	})
}

// progress records done of total, saving at most once per interval. A
// failed save is logged, not fatal: the next one may succeed.
func (w *stateWriter) progress(done, total int64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if total < done {
		total = done
	}
	w.st.Progress = snapshot.Progress{Done: done, Total: total}
	if time.Since(w.lastSave) < w.interval {
		return
	}
	if err := w.saveLocked(); err != nil {
		fmt.Fprintf(w.log, "%s uploader: %v\n", time.Now().UTC().Format(time.RFC3339Nano), err)
	}
}

func (w *stateWriter) saveLocked() error {
	if err := w.store.Save(w.st); err != nil {
		return err
	}
	w.lastSave = time.Now()
	if w.st.Phase != w.lastPhase {
		fmt.Fprintf(w.log, "%s uploader: phase %s\n", w.lastSave.UTC().Format(time.RFC3339Nano), w.st.Phase)
		w.lastPhase = w.st.Phase
	}
	return nil
}
