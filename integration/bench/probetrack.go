package main

import (
	"fmt"
	"time"

	"github.com/seamless-snapshot/seamless/integration/bench/contract"
)

// probeTracker turns the probe's gaps into per-snapshot figures.
type probeTracker struct {
	ring      *contract.RingReader
	clock     contract.Clock
	threshold time.Duration
	pending   []contract.Gap
	lost      uint64
}

// probeFigure is what the probe saw around one snapshot.
type probeFigure struct {
	// Pause is the gap that covers the frozen interval: the time the
	// container's processes did not run because of the snapshot.
	Pause time.Duration
	// Below is true when no recorded gap covers the frozen interval: the
	// pause was shorter than the probe's threshold (Pause is set to it).
	Below bool
	// RequestMax is the longest gap anywhere between request and answer.
	RequestMax time.Duration
	// Lead and Tail are how far the gap of Pause reaches before the frozen
	// interval starts and after it ends (the thaw requested): time the
	// probe lost to something else than the freeze (CPU taken around it).
	Lead, Tail time.Duration
}

// window is a span of CLOCK_MONOTONIC ns.
type window struct{ From, To int64 }

func (w window) valid() bool { return w.From > 0 && w.To >= w.From }

// measure waits until the probe has run past both windows, then returns the
// longest gap overlapping the frozen window and the longest one overlapping
// the request window. Gaps before the request are dropped.
func (p *probeTracker) measure(frozen, request window) (probeFigure, error) {
	if !frozen.valid() || !request.valid() {
		return probeFigure{}, fmt.Errorf("probe: invalid windows %+v %+v", frozen, request)
	}
	until := max(frozen.To, request.To)
	if err := p.ring.WaitBeat(p.clock, until+1, 5*time.Second); err != nil {
		return probeFigure{}, err
	}
	gaps, lost := p.ring.Read()
	p.lost += lost
	p.pending = append(p.pending, gaps...)
	var fig probeFigure
	for _, g := range p.pending {
		if g.Overlaps(frozen.From, frozen.To) && g.Len() > fig.Pause {
			fig.Pause = g.Len()
			fig.Lead = time.Duration(max(frozen.From-g.Start, 0))
			fig.Tail = time.Duration(max(g.End-frozen.To, 0))
		}
		if g.Overlaps(request.From, request.To) {
			fig.RequestMax = max(fig.RequestMax, g.Len())
		}
	}
	if fig.Pause == 0 {
		fig.Pause, fig.Below = p.threshold, true
	}
	p.pending = keepAfter(p.pending, until)
	return fig, nil
}

// keepAfter keeps the gaps that end after t.
func keepAfter(gaps []contract.Gap, t int64) []contract.Gap {
	out := gaps[:0]
	for _, g := range gaps {
		if g.End > t {
			out = append(out, g)
		}
	}
	return out
}
