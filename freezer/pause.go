package freezer

import (
	"context"
	"errors"
	"time"

	"golang.org/x/sys/unix"
)

// PauseResult times one Pause.
type PauseResult struct {
	// Freeze describes the freeze (Wait: request → every task frozen).
	Freeze Result
	// FrozenAt is when the freeze was confirmed.
	FrozenAt time.Time
	// Held is how long the work ran while frozen.
	Held time.Duration
	// Thaw is the thaw: request → confirmed.
	Thaw time.Duration
	// Total is the whole pause: freeze request → thaw confirmed.
	Total time.Duration
}

// Pause freezes the cgroup, runs work while every task is frozen, and thaws.
// Freeze, work and thaw run on one locked thread that keeps SCHED_FIFO (as
// Freeze and Thaw take it) from the freeze request to the confirmed thaw, so
// neither other threads nor the Go scheduler come between the three; work
// should be short and must not wait for other goroutines of the process.
// The cgroup is thawed on every path, a panic in work included. work's
// error is returned, joined with the thaw's.
//
// The thread naps briefly before it takes SCHED_FIFO and again after it
// leaves it, so that it neither starts nor goes on on a CPU the container's
// tasks run on (see cpuNap).
func (f *Freezer) Pause(ctx context.Context, timeout time.Duration, work func() error) (res PauseResult, err error) {
	cpuNap()
	rt := enterRT(f.rtPrio, true)
	defer func() {
		rt.leave()
		cpuNap()
	}()
	start := time.Now()
	if res.Freeze, err = f.freezeOrThaw(ctx, timeout, rt); err != nil {
		return res, err
	}
	res.FrozenAt = time.Now()
	thawed := false
	defer func() {
		if !thawed { // work panicked
			_ = f.thaw()
		}
	}()
	werr := work()
	thawStart := time.Now()
	res.Held = thawStart.Sub(res.FrozenAt)
	thawed = true
	terr := f.thaw()
	end := time.Now()
	res.Thaw, res.Total = end.Sub(thawStart), end.Sub(start)
	if werr != nil || terr != nil {
		return res, errors.Join(werr, terr)
	}
	return res, nil
}

// failedFreeze thaws after a freeze that failed (err) or did not complete
// before its deadline (err nil), and returns the error to report.
func (f *Freezer) failedFreeze(ctx context.Context, res Result, err error) error {
	var candidates []Task
	if err == nil {
		candidates = f.unfrozenTasks()
	}
	terr := f.thaw()
	if err != nil {
		return errors.Join(err, terr)
	}
	timeoutErr := &TimeoutError{Kind: f.kind, Dir: f.dir, Waited: res.Wait, Tasks: blockers(candidates)}
	if more := errors.Join(ctx.Err(), terr); more != nil {
		return errors.Join(timeoutErr, more)
	}
	return timeoutErr
}

// cpuNapLength is how long cpuNap sleeps: any sleep will do.
const cpuNapLength = 20 * time.Microsecond

// cpuNap blocks the calling thread for a moment so that the scheduler puts
// it back on an idle CPU, if there is one, when it wakes.
//
// Before the freeze: a thread that turns SCHED_FIFO where a task of the
// container runs stops that task before the freeze is even requested, and
// the container's pause starts early. After the thaw: the thawed tasks wake
// on the CPUs they froze on, often this thread's, and the scheduler was seen
// to keep a thread that just left SCHED_FIFO running in their stead until
// the next tick, 3–5 ms (in 7 of 100 pauses in the measurement behind this;
// none with the nap, where the thread sleeps, the task runs, and the thread
// wakes on another CPU).
func cpuNap() {
	ts := unix.NsecToTimespec(cpuNapLength.Nanoseconds())
	_ = unix.Nanosleep(&ts, nil)
}
