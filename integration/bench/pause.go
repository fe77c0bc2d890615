package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"
)

// scenarioSpec is an upper dir to snapshot: Files files of Size bytes made
// by testbin fill (Quick* with --quick).
type scenarioSpec struct {
	Name       string
	Files      int
	Size       int64
	QuickFiles int
	QuickSize  int64
}

// scenarios are the upper dirs: 1k / 10k / 50k small files and
// 1 GiB in a few large files.
var scenarios = []scenarioSpec{
	{Name: "1k", Files: 1000, Size: 4 << 10, QuickFiles: 200, QuickSize: 4 << 10},
	{Name: "10k", Files: 10_000, Size: 4 << 10, QuickFiles: 1000, QuickSize: 4 << 10},
	{Name: "50k", Files: 50_000, Size: 4 << 10, QuickFiles: 3000, QuickSize: 4 << 10},
	{Name: "1GiB", Files: 4, Size: 256 << 20, QuickFiles: 2, QuickSize: 32 << 20},
}

func scenarioByName(name string) (scenarioSpec, bool) {
	for _, s := range scenarios {
		if s.Name == name {
			return s, true
		}
	}
	return scenarioSpec{}, false
}

// files and size are the scenario's figures for this run.
func (s scenarioSpec) files(quick bool) int {
	if quick {
		return s.QuickFiles
	}
	return s.Files
}

func (s scenarioSpec) size(quick bool) int64 {
	if quick {
		return s.QuickSize
	}
	return s.Size
}

// headline reports whether the main targets are measured in this
// scenario (10k files and 1 GiB, with the writer).
func (s scenarioSpec) headline() bool { return s.Name == "10k" || s.Name == "1GiB" }

// Loads: the container does nothing but run the probe, or the writer also
// changes files.
const (
	loadIdle   = "idle"
	loadWriter = "writer"
)

// minSamples is what a capped cell takes at least.
const minSamples = 2

// pauseSection measures strategies 1–4 side by side on the same containers.
type pauseSection struct{}

func (pauseSection) Name() string { return "pause" }

// Supports: the pause section also runs on XFS (writer scenarios of 10k and
// 1GiB, seamless and the floor), to report pre-copy times next to ext4's.
func (pauseSection) Supports(string) bool { return true }

func (pauseSection) Run(ctx context.Context, env *Env) ([]Row, error) {
	var rows []Row
	for _, sc := range pauseScenarios(env) {
		r, err := runScenario(ctx, env, sc)
		rows = append(rows, r...)
		if err != nil {
			return rows, fmt.Errorf("scenario %s: %w", sc.Name, err)
		}
	}
	return rows, nil
}

// pauseScenarios are the scenarios selected for env.
func pauseScenarios(env *Env) []scenarioSpec {
	var out []scenarioSpec
	for _, sc := range scenarios {
		if len(env.Opts.Scenarios) > 0 && !contains(env.Opts.Scenarios, sc.Name) {
			continue
		}
		if env.FS == fsXFS && !sc.headline() {
			continue
		}
		out = append(out, sc)
	}
	return out
}

// runScenario fills one container and measures every strategy on it, idle
// then with the writer.
func runScenario(ctx context.Context, env *Env, sc scenarioSpec) (rows []Row, err error) {
	quick := env.Opts.Quick
	c, err := startContainer(ctx, env, sc.Name)
	if err != nil {
		return nil, err
	}
	defer func() { err = errors.Join(err, c.close()) }()
	logf("[%s] %s: filling %d files of %d bytes in %s", env.FS, c.id, sc.files(quick), sc.size(quick), c.upper)
	if err := c.fill(ctx, sc.files(quick), sc.size(quick)); err != nil {
		return nil, err
	}
	if err := c.startProbe(ctx); err != nil {
		return nil, err
	}
	loads := []string{loadIdle, loadWriter}
	if env.FS == fsXFS {
		loads = []string{loadWriter}
	}
	for _, load := range loads {
		if load == loadWriter {
			if err := c.startWriter(ctx); err != nil {
				return rows, err
			}
		}
		k0, t0, p0 := c.writerCounter(), time.Now(), c.paused
		r, err := runCells(ctx, c, sc, load)
		if load == loadWriter && err == nil {
			checkWriterRate(c, r, k0, time.Since(t0)-(c.paused-p0))
		}
		rows = append(rows, r...)
		if err != nil {
			return rows, err
		}
	}
	return rows, nil
}

// checkWriterRate flags the rows of a writer load if the writer did not
// keep at least half its rate while the container ran (running: the load's
// time minus the pauses): their verdicts would then prove little.
func checkWriterRate(c *container, rows []Row, k0 uint64, running time.Duration) {
	rate := float64(c.writerCounter()-k0) / running.Seconds()
	logf("  %s: the writer ticked %.0f times per second of running time (asked %d; it catches up after pauses shorter than 1s)",
		c.id, rate, c.env.Opts.WriterRate)
	if rate >= float64(c.env.Opts.WriterRate)/2 {
		return
	}
	for i := range rows {
		rows[i].Errors = append(rows[i].Errors, fmt.Sprintf("the writer ticked only %.0f times/s (asked %d)", rate, c.env.Opts.WriterRate))
	}
}

// cell is one strategy in one scenario and load.
type cell struct {
	s      strategy
	row    Row
	target int
	capped bool // stops at the time budget once it has minSamples
	spent  time.Duration
	failed int
}

// done reports whether the cell has taken enough snapshots.
func (cl *cell) done(budget time.Duration) bool {
	switch {
	case cl.row.N >= cl.target, cl.failed >= 3:
		return true
	case cl.capped && cl.spent >= budget && cl.row.N >= minSamples:
		cl.row.Capped = true
		return true
	}
	return false
}

// runCells runs the strategies round-robin (so noise hits them alike) until
// each has its samples. Round 0 is a discarded warm-up for the cells that
// take --snapshots whatever the time; capped cells, mostly the slow ones
// (seconds per snapshot, where a cold cache is noise), skip it.
func runCells(ctx context.Context, c *container, sc scenarioSpec, load string) ([]Row, error) {
	cells := newCells(c, sc, load)
	for round := 0; ; round++ {
		active := 0
		for _, cl := range cells {
			if round > 0 && cl.done(c.env.Opts.CellTime) {
				continue
			}
			active++
			if round == 0 && cl.capped {
				continue // no warm-up
			}
			if err := runOnce(ctx, c, cl, round); err != nil {
				return rowsOf(cells), err
			}
			spacing(ctx)
		}
		if active == 0 || ctx.Err() != nil {
			break
		}
	}
	for _, cl := range cells {
		logf("[%s] %s %s: %-10s n=%-3d probe p50 %s p99 %s, clock p50 %s, violations %s",
			c.env.FS, sc.Name, load, cl.s.Name(), cl.row.N, cl.row.Probe.p50(), cl.row.Probe.p99(), cl.row.Pause.p50(), cl.row.verdictText())
	}
	return rowsOf(cells), ctx.Err()
}

func newCells(c *container, sc scenarioSpec, load string) []*cell {
	var cells []*cell
	for _, s := range pauseStrategies(c.env.FS) {
		critical := sc.headline() && load == loadWriter && (s.Name() == "seamless" || s.Name() == "floor")
		cells = append(cells, &cell{
			s: s, target: c.env.Opts.Snapshots, capped: !critical && !c.env.Opts.Uncapped,
			row: Row{Section: "pause", FS: c.env.FS, Scenario: sc.Name, Load: load,
				Files: sc.files(c.env.Opts.Quick), Bytes: int64(sc.files(c.env.Opts.Quick)) * sc.size(c.env.Opts.Quick),
				Strategy: s.Name(), Consistent: s.Consistent()},
		})
	}
	return cells
}

// runOnce takes one snapshot with cl's strategy and records it (round 0:
// discarded). A failed snapshot is recorded as an error; only a cancelled
// context or a failed thaw stops the run.
func runOnce(ctx context.Context, c *container, cl *cell, round int) error {
	start := time.Now()
	s, err := cl.s.Snapshot(ctx, c, round)
	if err == nil {
		c.paused += time.Duration(s.PauseUS * float64(time.Microsecond))
		err = addProbe(c, &s)
	}
	cl.spent += time.Since(start)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if err != nil {
		if frozen, ferr := c.env.Ctd.Frozen(c.id); frozen || ferr != nil {
			return fmt.Errorf("%s left %s frozen (%v) after: %w", cl.s.Name(), c.id, ferr, err)
		}
		cl.failed++
		cl.row.Errors = append(cl.row.Errors, fmt.Sprintf("round %d: %v", round, err))
		logf("  %s round %d: %v", cl.s.Name(), round, err)
		return nil
	}
	if round == 0 {
		return nil // warm-up
	}
	s.Round = round
	cl.row.Samples = append(cl.row.Samples, s.Sample)
	cl.row.aggregate()
	if n := cl.row.N; n%10 == 0 {
		logf("  %s %s %s: %d/%d, probe p50 %s", c.id, cl.row.Load, cl.s.Name(), n, cl.target, cl.row.Probe.p50())
	}
	return nil
}

// addProbe adds the probe's view of the shot.
func addProbe(c *container, s *shot) error {
	fig, err := c.probe.measure(s.frozen, s.request)
	if err != nil {
		return err
	}
	s.ProbeUS, s.ProbeBelow, s.ProbeRequestMaxUS = us(int64(fig.Pause)), fig.Below, us(int64(fig.RequestMax))
	s.ProbeLeadUS, s.ProbeTailUS = us(int64(fig.Lead)), us(int64(fig.Tail))
	return nil
}

// spacing waits 20–60 ms between snapshots so the writer progresses and a
// cgroup v2 change notification (rate-limited to one per ~12 ms) never
// straddles two.
func spacing(ctx context.Context) {
	d := 20*time.Millisecond + rand.N(40*time.Millisecond)
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

func rowsOf(cells []*cell) []Row {
	rows := make([]Row, 0, len(cells))
	for _, cl := range cells {
		cl.row.aggregate()
		rows = append(rows, cl.row)
	}
	return rows
}
