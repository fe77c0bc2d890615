package uploader

import (
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/seamless-snapshot/seamless/snapshot"
)

// stateWriter owns a snapshot's state while an upload runs: every change
// goes through it. Phase changes and results are saved at once; progress
// only changes memory, and a background flusher saves it at most once per
// interval, so that the build and push loops never wait for a disk sync.
type stateWriter struct {
	store    snapshot.Store
	interval time.Duration
	log      io.Writer

	mu        sync.Mutex
	st        *snapshot.State
	dirty     bool
	lastPhase snapshot.Phase

	stop chan struct{}
	done chan struct{}
}

// newStateWriter starts the flusher of st; close stops it.
func newStateWriter(store snapshot.Store, st *snapshot.State, interval time.Duration, log io.Writer) *stateWriter {
	w := &stateWriter{store: store, st: st, interval: interval, log: log, lastPhase: st.Phase,
		stop: make(chan struct{}), done: make(chan struct{})}
	go w.flusher()
	return w
}

func (w *stateWriter) flusher() {
	defer close(w.done)
	t := time.NewTicker(w.interval)
	defer t.Stop()
	for {
		select {
		case <-w.stop:
			return
		case <-t.C:
			w.flush()
		}
	}
}

// close stops the flusher and saves pending progress.
func (w *stateWriter) close() {
	close(w.stop)
	<-w.done
	w.flush()
}

// flush saves pending progress. A failed save is logged, not fatal: the
// next one may succeed.
func (w *stateWriter) flush() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.dirty {
		return
	}
	if err := w.saveLocked(); err != nil {
		fmt.Fprintf(w.log, "%s uploader: %v\n", time.Now().UTC().Format(time.RFC3339Nano), err)
	}
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

// progress records done of total in memory, for the flusher. A done beyond
// an approximate total raises the total.
func (w *stateWriter) progress(done, total int64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.st.Progress = snapshot.Progress{Done: done, Total: max(total, done)}
	w.dirty = true
}

func (w *stateWriter) saveLocked() error {
	if err := w.store.Save(w.st); err != nil {
		return err
	}
	w.dirty = false
	if w.st.Phase != w.lastPhase {
		fmt.Fprintf(w.log, "%s uploader: phase %s\n", time.Now().UTC().Format(time.RFC3339Nano), w.st.Phase)
		w.lastPhase = w.st.Phase
	}
	return nil
}
