package freezer

import (
	"context"
	"errors"
	"time"
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
func (f *Freezer) Pause(ctx context.Context, timeout time.Duration, work func() error) (res PauseResult, err error) {
	rt := enterRT(f.rtPrio, true)
	defer rt.leave()
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
