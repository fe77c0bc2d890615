package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seamless-snapshot/seamless/freezer"
)

// freezerSection is strategy 5: freeze → thaw with nothing in between,
// through our freezer and through libcontainer's managers, cycles
// interleaved round-robin, on three workloads (freezeWorkloads).
type freezerSection struct{}

// freezeWorkload is a container the freezers are compared on.
type freezeWorkload struct {
	name  string
	probe bool // run the probe (a spinning task) besides the sleeping init
	// busy and sleeping are extra processes exec'd into the container
	// besides the sleeping init: `while :; do :; done` shell loops and
	// sleeps (startFreezeLoad).
	busy, sleeping int
}

// freezeWorkloads: the reference, an idle one-process cgroup (its
// only task sleeps; there is no probe, so no probe figure), and the pause
// section's container (the sleeping init plus the spinning probe). A v2
// freeze must wake sleeping tasks so they trap themselves: whether they are
// frozen before libcontainer's first read decides between its fast path and
// its 10 ms sleep, so the two can differ a lot. The third is a dev
// container with many processes, c-10b10s of the freezer measurements
// (shared/notes/freezer-measurements.md §4.1, where libcontainer's fs2 p50
// was 11 ms): 10 spinning shell loops and 10 sleeps (plus the sleeping init).
var freezeWorkloads = []freezeWorkload{
	{name: "1 sleeping task"},
	{name: "sleep + probe", probe: true},
	{name: "10 busy + 10 sleeping", busy: 10, sleeping: 10},
}

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
	if w.busy+w.sleeping > 0 {
		l, err := startFreezeLoad(ctx, c, w.busy, w.sleeping)
		if err != nil {
			return nil, err
		}
		defer func() { err = errors.Join(err, l.stop()) }()
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

// Commands of a workload's extra processes, as exec'd by execDetached
// (sh -c 'exec …'), and their /proc/<pid>/cmdline.
var (
	loadBusyArgs  = []string{"sh", "-c", "while :; do :; done"}
	loadSleepArgs = []string{"sleep", "1000000000"} // init sleeps 2000000000
)

// freezeLoad is a workload's extra processes, held by pidfd so that stop
// kills exactly them.
type freezeLoad struct {
	cid    string
	pids   []int
	pidfds []int
}

// startFreezeLoad execs sleeping sleeps, then busy shell loops, into c (the
// sleeps first: the loops slow down every exec after them), finds them in
// the container's cgroup and checks that the loops run and the sleeps
// sleep. On error it kills those it holds; c.close kills the rest.
func startFreezeLoad(ctx context.Context, c *container, busy, sleeping int) (l *freezeLoad, err error) {
	dir := c.paths[""]
	if dir == "" {
		dir = c.paths["freezer"]
	}
	procs := filepath.Join(dir, "cgroup.procs")
	before, err := readPIDs(procs)
	if err != nil {
		return nil, err
	}
	l = &freezeLoad{cid: c.id}
	defer func() {
		if err != nil {
			err = errors.Join(err, l.stop())
		}
	}()
	t0 := time.Now()
	for i := range sleeping {
		if err := c.execDetached(ctx, fmt.Sprintf("sleep%d", i), "", loadSleepArgs...); err != nil {
			return l, fmt.Errorf("start sleep %d: %w", i, err)
		}
	}
	for i := range busy {
		if err := c.execDetached(ctx, fmt.Sprintf("busy%d", i), "", loadBusyArgs...); err != nil {
			return l, fmt.Errorf("start busy loop %d: %w", i, err)
		}
	}
	// Each exec returns once its process runs; wait until every new process
	// of the cgroup has exec'd its command.
	var busyPIDs, sleepPIDs []int
	err = waitFor(ctx, 15*time.Second, 20*time.Millisecond, func() (bool, error) {
		pids, err := readPIDs(procs)
		if err != nil {
			return false, err
		}
		busyPIDs, sleepPIDs = nil, nil
		for pid := range pids {
			if before[pid] {
				continue
			}
			switch procCmdline(pid) {
			case strings.Join(loadBusyArgs, " "):
				busyPIDs = append(busyPIDs, pid)
			case strings.Join(loadSleepArgs, " "):
				sleepPIDs = append(sleepPIDs, pid)
			default: // runc init not yet exec'd, or a stranger
				return false, nil
			}
		}
		return len(busyPIDs) == busy && len(sleepPIDs) == sleeping, nil
	})
	if err != nil {
		return l, fmt.Errorf("load processes in %s: want %d busy + %d sleeping, have %d + %d: %w",
			procs, busy, sleeping, len(busyPIDs), len(sleepPIDs), err)
	}
	for _, pid := range append(append([]int(nil), busyPIDs...), sleepPIDs...) {
		fd, err := unix.PidfdOpen(pid, 0)
		if err != nil {
			return l, fmt.Errorf("pidfd_open %d: %w", pid, err)
		}
		l.pids, l.pidfds = append(l.pids, pid), append(l.pidfds, fd)
	}
	if err := checkLoadRuns(busyPIDs, sleepPIDs); err != nil {
		return l, err
	}
	logf("[freezer] %s: %d busy + %d sleeping processes started in %s", c.id, busy, sleeping, time.Since(t0).Round(time.Millisecond))
	return l, nil
}

// checkLoadRuns checks that every busy loop gets CPU time within 300 ms
// and that every sleep sleeps.
func checkLoadRuns(busyPIDs, sleepPIDs []int) error {
	ticks := func(pid int) (state string, t int64, err error) {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return "", 0, err
		}
		// pid (comm) state ppid … utime(14) stime(15)
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
		if len(f) < 13 {
			return "", 0, fmt.Errorf("/proc/%d/stat: %q", pid, b)
		}
		u, err1 := strconv.ParseInt(f[11], 10, 64)
		s, err2 := strconv.ParseInt(f[12], 10, 64)
		return f[0], u + s, errors.Join(err1, err2)
	}
	start := map[int]int64{}
	for _, pid := range busyPIDs {
		_, t, err := ticks(pid)
		if err != nil {
			return err
		}
		start[pid] = t
	}
	time.Sleep(300 * time.Millisecond)
	for _, pid := range busyPIDs {
		_, t, err := ticks(pid)
		if err != nil {
			return err
		}
		if t <= start[pid] {
			return fmt.Errorf("busy loop %d got no CPU time in 300 ms", pid)
		}
	}
	for _, pid := range sleepPIDs {
		st, _, err := ticks(pid)
		if err != nil {
			return err
		}
		if st != "S" {
			return fmt.Errorf("sleep %d is in state %s, not S", pid, st)
		}
	}
	return nil
}

// stop kills the processes with SIGKILL and waits until they have exited
// (their pidfds poll readable; the shim reaps them).
func (l *freezeLoad) stop() error {
	if l == nil || len(l.pidfds) == 0 {
		return nil
	}
	defer func() {
		for _, fd := range l.pidfds {
			unix.Close(fd)
		}
		l.pids, l.pidfds = nil, nil
	}()
	var errs []error
	for i, fd := range l.pidfds {
		if err := unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("kill %d: %w", l.pids[i], err))
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for i, fd := range l.pidfds {
		for {
			fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			n, err := unix.Poll(fds, int(time.Until(deadline).Milliseconds()))
			if errors.Is(err, unix.EINTR) {
				continue
			}
			if err != nil || n == 0 {
				errs = append(errs, fmt.Errorf("process %d of %s did not exit after SIGKILL (frozen?): %v", l.pids[i], l.cid, err))
			}
			break
		}
	}
	return errors.Join(errs...)
}

// readPIDs reads a cgroup.procs file.
func readPIDs(procs string) (map[int]bool, error) {
	b, err := os.ReadFile(procs)
	if err != nil {
		return nil, err
	}
	pids := map[int]bool{}
	for _, f := range strings.Fields(string(b)) {
		pid, err := strconv.Atoi(f)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", procs, err)
		}
		pids[pid] = true
	}
	return pids, nil
}

// procCmdline is /proc/<pid>/cmdline with spaces between the arguments;
// "" when unreadable.
func procCmdline(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return ""
	}
	return strings.Join(strings.Split(strings.TrimRight(string(b), "\x00"), "\x00"), " ")
}
