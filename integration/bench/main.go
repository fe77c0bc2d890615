// Command bench is seamless's benchmark harness (make bench; needs root).
// It starts its own containerd (runc through seamless-runc) and registry
// with testenv, runs containers from a test image that carries testbin, and
// measures sections:
//
//   - pause (issue 3): how long a snapshot stops a running container, by the
//     tool's clock and by a probe spinning inside the container, for seamless
//     and for what other tools do, side by side on the same containers, with
//     a consistency verdict per snapshot (pause.go, strategies.go);
//   - freezer (issue 3): freezing alone, our freezer vs libcontainer's, on
//     cgroup v1 and v2 (freezersection.go);
//   - upload (issue 4): upload.go.
//
// Usage:
//
//	go run ./integration/bench [--quick] [--sections pause,freezer,upload]
//	    [--scenarios 1k,10k,50k,1GiB] [--snapshots N] [--cell-time D]
//	    [--xfs] [--push] [--uncapped] [--out DIR]
//
// It prints a table per section and the target checks (PASS/FAIL),
// and writes DIR/results.json (every sample), DIR/summary.txt (the printed
// report) and DIR/pause.png (probe p50/p99 per strategy and scenario, log
// scale). Pause table columns: PAUSE = freeze requested → thaw confirmed by
// the tool's clock (the shim's pause_us for seamless); PROBE = the gap the
// in-container probe saw over the frozen interval (what the container's
// processes feel); REQ->THAW = request → thaw confirmed (pre-copy
// included); VIOLATIONS = captures breaking the writer's invariants /
// captures checked; FREEZE, CAPTURE, THAW = the pause's parts; PRECOPY = the
// shim's pre-copy time. The probe spins on one of the machine's CPUs for
// the whole run.
//
// Everything it starts is torn down at the end, on error and on Ctrl-C; a
// run killed harder is cleaned up by the next one (stale work dirs in
// /tmp/sl-bench-*, testenv instances, the XFS loop mount).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

// Options are the command-line flags.
type Options struct {
	Out          string        `json:"out"`
	Sections     []string      `json:"sections"`
	Quick        bool          `json:"quick"`
	Snapshots    int           `json:"snapshots"`
	CellTime     time.Duration `json:"cell_time_ns"`
	XFS          bool          `json:"xfs"`
	WriterRate   int           `json:"writer_rate"`
	MinGap       time.Duration `json:"probe_min_gap_ns"`
	Push         bool          `json:"push"`
	Uncapped     bool          `json:"uncapped"`
	Scenarios    []string      `json:"scenarios,omitempty"`
	FreezerIters int           `json:"freezer_iterations"`
}

// section is one part of the benchmark. Run measures and returns rows; the
// harness prints, stores and charts them.
type section interface {
	Name() string
	Run(ctx context.Context, env *Env) ([]Row, error)
}

// fsAware is implemented by sections that also run on the --xfs
// environment (or only on some filesystems).
type fsAware interface {
	Supports(fs string) bool
}

// sections lists every section in run order; --sections selects among them.
func allSections() []section {
	return []section{pauseSection{}, freezerSection{}, uploadSection{}}
}

func main() {
	opts, err := parseFlags(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, opts); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func parseFlags(args []string) (Options, error) {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	var o Options
	sections := fs.String("sections", "pause,freezer,upload", "comma-separated sections to run: pause, freezer, upload")
	scenarios := fs.String("scenarios", "", "comma-separated pause scenarios (1k,10k,50k,1GiB); empty: all")
	fs.StringVar(&o.Out, "out", "bench-results", "directory for results.json, summary.txt and pause.png")
	fs.BoolVar(&o.Quick, "quick", false, "smoke run: small uppers, few snapshots (about 3 minutes)")
	fs.IntVar(&o.Snapshots, "snapshots", 0, "measured snapshots per strategy and scenario (default 50, --quick 8)")
	fs.DurationVar(&o.CellTime, "cell-time", 0, "time after which a strategy stops taking snapshots in a scenario, once it has 2 (default 20s, --quick 4s); seamless and the floor in the 10k/1GiB writer scenarios always take --snapshots")
	fs.BoolVar(&o.XFS, "xfs", false, "also run the writer scenarios with containerd's root on an XFS loop image (reflink) and report pre-copy times next to ext4's")
	fs.IntVar(&o.WriterRate, "writer-rate", 100, "consistency writer: files changed per second")
	fs.DurationVar(&o.MinGap, "probe-min-gap", 10*time.Microsecond, "shortest gap the in-container probe records")
	fs.BoolVar(&o.Uncapped, "uncapped", false, "every strategy takes --snapshots in every scenario, whatever the time (full run: over an hour)")
	fs.BoolVar(&o.Push, "push", false, "let every seamless upload finish (outside the measurement) instead of interrupting it")
	fs.IntVar(&o.FreezerIters, "freezer-iterations", 0, "freeze/thaw cycles per freezer mechanism (default 100, --quick 20)")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	o.Sections = splitList(*sections)
	o.Scenarios = splitList(*scenarios)
	o.applyDefaults()
	return o, o.validate()
}

func (o *Options) applyDefaults() {
	pick := func(v *int, full, quick int) {
		if *v <= 0 {
			*v = full
			if o.Quick {
				*v = quick
			}
		}
	}
	pick(&o.Snapshots, 50, 8)
	pick(&o.FreezerIters, 100, 20)
	if o.CellTime <= 0 {
		o.CellTime = 20 * time.Second
		if o.Quick {
			o.CellTime = 4 * time.Second
		}
	}
}

func (o *Options) validate() error {
	known := map[string]bool{}
	for _, s := range allSections() {
		known[s.Name()] = true
	}
	for _, s := range o.Sections {
		if !known[s] {
			return fmt.Errorf("unknown section %q", s)
		}
	}
	for _, s := range o.Scenarios {
		if _, ok := scenarioByName(s); !ok {
			return fmt.Errorf("unknown scenario %q (want 1k, 10k, 50k or 1GiB)", s)
		}
	}
	if o.WriterRate <= 0 || o.MinGap <= 0 {
		return errors.New("--writer-rate and --probe-min-gap must be positive")
	}
	return nil
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// run sets the bench up, runs the selected sections on each environment,
// reports, and always tears everything down.
func run(ctx context.Context, opts Options) (err error) {
	b, err := newBench(ctx, opts)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := b.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("clean-up: %w", cerr))
		} else {
			logf("clean-up: nothing left behind (no mounts under %s, no frozen cgroups, no processes)", b.dir)
		}
	}()
	res := newResults(opts)
	runErr := b.runSections(ctx, res)
	if werr := res.write(opts.Out); werr != nil {
		return errors.Join(runErr, werr)
	}
	return runErr
}

// runSections runs every selected section on the ext4 environment, then the
// fs-aware ones on XFS when asked. A failing section is reported and the
// others still run.
func (b *bench) runSections(ctx context.Context, res *Results) error {
	var errs []error
	for _, fsKind := range b.filesystems() {
		if ctx.Err() != nil {
			break
		}
		secs := b.sectionsFor(fsKind)
		if len(secs) == 0 {
			continue
		}
		env, err := b.startEnv(ctx, fsKind)
		if err != nil {
			errs = append(errs, err)
			break
		}
		for _, s := range secs {
			logf("section %s on %s", s.Name(), fsKind)
			rows, err := s.Run(ctx, env)
			res.add(s.Name(), rows)
			if err != nil {
				errs = append(errs, fmt.Errorf("section %s (%s): %w", s.Name(), fsKind, err))
			}
		}
		if err := b.stopEnv(env); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// filesystems lists the environments to run: ext4 (the root fs), then XFS.
func (b *bench) filesystems() []string {
	if b.opts.XFS {
		return []string{fsExt4, fsXFS}
	}
	return []string{fsExt4}
}

// sectionsFor returns the selected sections that run on fsKind.
func (b *bench) sectionsFor(fsKind string) []section {
	var out []section
	for _, s := range allSections() {
		if contains(b.opts.Sections, s.Name()) && runsOn(s, fsKind) {
			out = append(out, s)
		}
	}
	return out
}

// runsOn reports whether s runs on fsKind: sections that are not fsAware
// run on the root filesystem only.
func runsOn(s section, fsKind string) bool {
	if a, ok := s.(fsAware); ok {
		return a.Supports(fsKind)
	}
	return fsKind == fsExt4
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// logf prints a progress line on stderr.
func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}
