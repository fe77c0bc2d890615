// Package contract is what the pause benchmark (integration/bench) and the
// helpers it runs inside containers (testbin probe, testbin writer) agree on:
// the monotonic clock both sides use, the file format of the probe's ring of
// scheduling gaps, and the writer's file layout and invariant.
package contract

import (
	"time"

	"golang.org/x/sys/unix"
)

// Clock reads CLOCK_MONOTONIC in nanoseconds. It goes through Go's
// monotonic clock (one vDSO clock_gettime(CLOCK_MONOTONIC) per reading, no
// syscall), offset once against the raw clock so that readings taken in
// different processes — the probe inside the container, the benchmark on
// the host — are directly comparable (CLOCK_MONOTONIC is host-wide: runc
// does not use time namespaces).
type Clock struct {
	base     time.Time
	baseMono int64
}

// NewClock calibrates a Clock; the offset error is below a microsecond.
func NewClock() Clock {
	best := Clock{}
	bestSpread := int64(-1)
	for range 7 {
		m0 := rawMonotonic()
		base := time.Now()
		m1 := rawMonotonic()
		if spread := m1 - m0; bestSpread < 0 || spread < bestSpread {
			best, bestSpread = Clock{base: base, baseMono: m0 + spread/2}, spread
		}
	}
	return best
}

// Now returns CLOCK_MONOTONIC in nanoseconds.
func (c Clock) Now() int64 { return c.baseMono + int64(time.Since(c.base)) }

// FromWall converts a wall-clock time taken on this host (e.g. a timestamp
// another process reported in JSON) to CLOCK_MONOTONIC nanoseconds. Both
// clocks are slewed alike; only a step of the wall clock (settimeofday)
// between calibration and t makes this wrong.
func (c Clock) FromWall(t time.Time) int64 {
	return c.baseMono + int64(t.Round(0).Sub(c.base.Round(0)))
}

// ToWall converts CLOCK_MONOTONIC nanoseconds to wall-clock time.
func (c Clock) ToWall(mono int64) time.Time {
	return c.base.Round(0).Add(time.Duration(mono - c.baseMono))
}

func rawMonotonic() int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		panic("clock_gettime(CLOCK_MONOTONIC): " + err.Error())
	}
	return ts.Nano()
}
