package main

import (
	"flag"
	"fmt"
	"runtime"
	"time"

	"github.com/seamless-snapshot/seamless/integration/bench/contract"
)

// probe spins on CLOCK_MONOTONIC forever and records every gap between two
// consecutive readings longer than --min-gap in a shared-memory ring (format:
// package contract). A gap is time the process did not run: frozen, or
// descheduled. It occupies one CPU for as long as it runs.
//
// Run it with GODEBUG=asyncpreemptoff=1 so the Go runtime's own preemption
// signal (sent every 10 ms to a goroutine that never yields) does not show up
// as gaps.
func probe(args []string) error {
	fs := flag.NewFlagSet("probe", flag.ContinueOnError)
	out := fs.String("out", contract.DefaultProbeFile, "ring file; keep it on a tmpfs outside the overlay (e.g. /dev/shm)")
	minGap := fs.Duration("min-gap", 10*time.Microsecond, "record gaps longer than this")
	capacity := fs.Int("capacity", 1<<20, "ring entries (16 bytes each)")
	duration := fs.Duration("duration", 0, "stop after this long (0: never)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *minGap <= 0 {
		return fmt.Errorf("probe: --min-gap must be positive")
	}
	runtime.LockOSThread()
	clock := contract.NewClock()
	ring, err := contract.CreateRing(*out, *capacity, *minGap, clock.Now())
	if err != nil {
		return fmt.Errorf("probe: %w", err)
	}
	spin(clock, ring, int64(*minGap), int64(*duration))
	return nil
}

// spin is the probe's loop: one clock reading per iteration, no allocation,
// no syscall.
func spin(clock contract.Clock, ring *contract.RingWriter, minGap, duration int64) {
	prev := clock.Now()
	stop := int64(1<<63 - 1)
	if duration > 0 {
		stop = prev + duration
	}
	for i := uint(0); ; i++ {
		now := clock.Now()
		if now-prev > minGap {
			ring.Add(contract.Gap{Start: prev, End: now})
		}
		if i%32 == 0 {
			ring.Beat(now)
			if now > stop {
				return
			}
		}
		prev = now
	}
}
