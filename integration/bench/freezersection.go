package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/seamless-snapshot/seamless/freezer"
)

// freezerSection is strategy 5: freeze → thaw with nothing in between,
// through our freezer and through libcontainer's managers, cycles
// interleaved round-robin, on two workloads (freezeWorkloads).
type freezerSection struct{}

// freezeWorkload is a container the freezers are compared on.
type freezeWorkload struct {
	name  string
	probe bool // run the probe (a spinning task) besides the sleeping init
}

// freezeWorkloads: the reference, an idle one-process cgroup (its
// only task sleeps; there is no probe, so no probe figure), and the pause
// section's container (the sleeping init plus the spinning probe). A v2
// freeze must wake sleeping tasks so they trap themselves: whether they are
// frozen before libcontainer's first read decides between its fast path and
// its 10 ms sleep, so the two can differ a lot.
var freezeWorkloads = []freezeWorkload{{name: "1 sleeping task"}, {name: "sleep + probe", probe: true}}

func (freezerSection) Name() string { return "freezer" }

// Supports: the freezer does not depend on the filesystem.
func (freezerSection) Supports(fsKind string) bool { return fsKind == fsExt4 }

// freezeMech is one way of freezing and thawing a cgroup: cycle freezes,
// confirms, thaws at once and times both steps.
type freezeMech struct {
	name  string
	cycle func() (freeze, thaw time.Duration, err error)
	close func()
}

func (freezerSection) Run(ctx context.Context, env *Env) ([]Row, error) {
	var rows []Row
	for _, w := range freezeWorkloads {
		r, err := runFreezeWorkload(ctx, env, w)
		rows = append(rows, r...)
		if err != nil {
			return rows, fmt.Errorf("%s: %w", w.name, err)
		}
	}
	return rows, nil
}

// runFreezeWorkload compares the freezers on one fresh container.
func runFreezeWorkload(ctx context.Context, env *Env, w freezeWorkload) (rows []Row, err error) {
	c, err := startContainer(ctx, env, "freezer")
	if err != nil {
		return nil, err
	}
	defer func() { err = errors.Join(err, c.close()) }()
	if w.probe {
		if err := c.startProbe(ctx); err != nil {
			return nil, err
		}
	}
	mechs, err := freezeMechs(c.paths)
	if err != nil {
		return nil, err
	}
	defer func() {
		for _, m := range mechs {
			m.close()
		}
	}()
	return runFreezeCycles(ctx, c, w.name, mechs)
}

// freezeMechs opens ours and libcontainer's freezers on the container's v1
// freezer cgroup and on its unified (v2) cgroup, whichever exist.
func freezeMechs(paths map[string]string) ([]*freezeMech, error) {
	var out []*freezeMech
	for _, k := range []struct {
		kind freezer.Kind
		dir  string
	}{{freezer.V1, paths["freezer"]}, {freezer.V2, paths[""]}} {
		if k.dir == "" {
			continue
		}
		ours, err := freezer.Open(k.kind, k.dir)
		if err != nil {
			return nil, err
		}
		out = append(out, oursMech(ours), libcontainerMech(k.kind, k.dir))
	}
	if len(out) == 0 {
		return nil, errors.New("container has neither a v1 freezer nor a unified cgroup")
	}
	return out, nil
}

// oursMech is package freezer: Freeze (confirmed) then Thaw.
func oursMech(f *freezer.Freezer) *freezeMech {
	return &freezeMech{
		name: "ours-" + string(f.Kind()),
		cycle: func() (freeze, thaw time.Duration, err error) {
			thawed := false
			defer func() {
				if !thawed {
					f.Thaw() //nolint:errcheck // unwinding; thawAll checks afterwards
				}
			}()
			t0 := time.Now()
			if _, err := f.Freeze(context.Background(), freezeTimeout); err != nil {
				return time.Since(t0), 0, fmt.Errorf("freeze: %w", err)
			}
			t1 := time.Now()
			err = f.Thaw()
			thawed = true
			return t1.Sub(t0), time.Since(t1), err
		},
		close: func() { f.Close() },
	}
}

// libcontainerMech is the baseline: the managers runc itself uses
// (github.com/opencontainers/cgroups fs for v1, fs2 for v2), called as
// runc's Pause and Resume call them, through freezer.LibcontainerFreezeThaw.
func libcontainerMech(kind freezer.Kind, dir string) *freezeMech {
	return &freezeMech{
		name:  "libcontainer-" + string(kind),
		cycle: func() (time.Duration, time.Duration, error) { return freezer.LibcontainerFreezeThaw(kind, dir) },
		close: func() {},
	}
}

// runFreezeCycles runs FreezerIters cycles of every mechanism, round-robin,
// after 3 warm-up rounds, 40–60 ms apart.
func runFreezeCycles(ctx context.Context, c *container, workload string, mechs []*freezeMech) ([]Row, error) {
	rows := make([]Row, len(mechs))
	for i, m := range mechs {
		rows[i] = Row{Section: "freezer", FS: c.env.FS, Scenario: workload, Load: loadIdle, Strategy: m.name, Consistent: false}
	}
	const warmup = 3
	for round := 0; round < warmup+c.env.Opts.FreezerIters && ctx.Err() == nil; round++ {
		for i, m := range mechs {
			time.Sleep(40*time.Millisecond + rand.N(20*time.Millisecond))
			s, err := freezeCycle(c, m)
			if err != nil {
				rows[i].Errors = append(rows[i].Errors, fmt.Sprintf("round %d: %v", round, err))
				if ferr := thawAll(c); ferr != nil {
					return rows, ferr
				}
				continue
			}
			if round >= warmup {
				s.Round = round - warmup + 1
				rows[i].Samples = append(rows[i].Samples, s)
			}
		}
	}
	for i := range rows {
		rows[i].aggregate()
		logf("[freezer] %s: %-16s n=%-3d freeze p50 %s p99 %s, thaw p50 %s, probe p50 %s", workload, rows[i].Strategy, rows[i].N,
			rows[i].Parts["freeze"].p50(), rows[i].Parts["freeze"].p99(), rows[i].Parts["thaw"].p50(), rows[i].Probe.p50())
	}
	return rows, ctx.Err()
}

// freezeCycle freezes and thaws once. The probe's figure is the longest
// gap between the call and its return: the cycle freezes nothing else.
func freezeCycle(c *container, m *freezeMech) (Sample, error) {
	clock := c.env.Clock
	t0 := clock.Now()
	freeze, thaw, err := m.cycle()
	t1 := clock.Now()
	if err != nil {
		return Sample{}, err
	}
	s := Sample{PauseUS: us(int64(freeze + thaw)), LatencyUS: us(t1 - t0),
		PartsUS: map[string]float64{"freeze": us(int64(freeze)), "thaw": us(int64(thaw))}}
	if c.probe == nil {
		return s, nil
	}
	fig, err := c.probe.measure(window{t0, t1}, window{t0, t1})
	if err != nil {
		return s, err
	}
	s.ProbeUS, s.ProbeBelow, s.ProbeRequestMaxUS = us(int64(fig.Pause)), fig.Below, us(int64(fig.RequestMax))
	return s, nil
}

// thawAll thaws the container's v1 and v2 cgroups and checks it.
func thawAll(c *container) error {
	errs := []error{c.env.Ctd.Thaw(c.id)}
	if frozen, err := c.env.Ctd.Frozen(c.id); err != nil || frozen {
		return fmt.Errorf("container %s still frozen (%v) after a failed cycle: %w", c.id, err, errors.Join(errs...))
	}
	return nil
}
