package freezer

import (
	"context"
	"os"
	"strconv"
	"time"
)

// quiescePoll is how often WaitQuiescent looks again.
const quiescePoll = 500 * time.Microsecond

// Quiescence describes a WaitQuiescent.
type Quiescence struct {
	// Waited is how long it waited.
	Waited time.Duration
	// Quiet is true when no thread was in an uninterruptible sleep at the
	// last look (false: the wait ran out, or the threads could not be read).
	Quiet bool
	// Checks counts the looks.
	Checks int
}

// WaitQuiescent waits, up to max, until no thread of the cgroup is in an
// uninterruptible sleep (state D: an fsync, a journal commit, a page under
// writeback). Such a thread cannot be frozen before its syscall returns, so
// a freeze requested meanwhile holds every other task frozen that long. Call
// it right before Freeze or Pause; a thread may still enter such a sleep in
// between, which only costs what not waiting would have.
func (f *Freezer) WaitQuiescent(ctx context.Context, max time.Duration) Quiescence {
	start := time.Now()
	var q Quiescence
	for {
		q.Checks++
		blocked, err := f.uninterruptible()
		q.Waited = time.Since(start)
		if err != nil {
			return q
		}
		if !blocked {
			q.Quiet = true
			return q
		}
		if q.Waited+quiescePoll > max || ctx.Err() != nil {
			return q
		}
		time.Sleep(quiescePoll)
	}
}

// uninterruptible reports whether a thread of the cgroup (or of a
// descendant) is in state D.
func (f *Freezer) uninterruptible() (bool, error) {
	tids, err := f.threads()
	if err != nil {
		return false, err
	}
	buf := make([]byte, 512)
	for _, tid := range tids {
		if threadState(tid, buf) == "D" {
			return true, nil
		}
	}
	return false, nil
}

// threadState returns the state letter of thread tid ("" if it is gone).
func threadState(tid int, buf []byte) string {
	fh, err := os.Open("/proc/" + strconv.Itoa(tid) + "/stat")
	if err != nil {
		return ""
	}
	n, _ := fh.Read(buf)
	fh.Close()
	_, state := procCommState(buf[:n])
	return state
}
