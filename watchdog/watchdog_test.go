package watchdog

import (
	"bufio"
	"context"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seamless-snapshot/seamless/freezer"
)

// Variables of the test binary's roles.
const (
	envRole     = "_SEAMLESS_ROLE" // as uploader.EnvRole
	envFakeShim = "_WATCHDOG_TEST_FAKE_SHIM"
	envReady    = "_WATCHDOG_TEST_READY_FD"
)

func TestMain(m *testing.M) {
	switch {
	case os.Getenv(envRole) == Role:
		os.Exit(Main(os.Args))
	case os.Getenv(envFakeShim) != "":
		os.Exit(fakeShim(os.Args))
	}
	os.Exit(m.Run())
}

// fakeShim plays a shim: args are [argv0, mode, kind, dir, events file,
// init pid]. Its first run does what mode says; later runs (restarts) say
// hello and go once through arm, freeze, thaw, disarm. Every run records
// what it did in the events file and exits when the init exits.
func fakeShim(args []string) int {
	mode, kind, dir, events := args[1], freezer.Kind(args[2]), args[3], args[4]
	initPID, _ := strconv.Atoi(args[5])
	record := func(format string, a ...any) {
		f, err := os.OpenFile(events, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err == nil {
			fmt.Fprintf(f, "%d "+format+"\n", append([]any{os.Getpid()}, a...)...)
			f.Close()
		}
	}
	starts := countLines(events, "start")
	_, hasReady := os.LookupEnv(envReady)
	record("start %d ready=%v", starts+1, hasReady)
	if ready := inheritedFile(envReady); ready != nil {
		fmt.Fprintln(ready, "ready")
		ready.Close()
	}
	wd, err := ClientFromEnv()
	if err != nil || wd == nil {
		record("no-watchdog %v", err)
		return 1
	}
	fr, err := freezer.Open(kind, dir)
	if err != nil {
		record("error %v", err)
		return 1
	}
	if starts > 0 {
		mode = "cycle"
	}
	if mode == "never-served" {
		return 3
	}
	if err := wd.Hello(); err != nil {
		record("error %v", err)
		return 1
	}
	if err := runMode(mode, wd, fr, dir, record); err != nil {
		record("error %v", err)
		return 1
	}
	if mode == "clean" {
		return 0
	}
	waitExit(initPID)
	return 0
}

// runMode does the fake shim's part of a test.
func runMode(mode string, wd *Client, fr *freezer.Freezer, dir string, record func(string, ...any)) error {
	armFreeze := func(timeout time.Duration) error {
		if err := wd.Arm(fr.Kind(), fr.Dir(), timeout); err != nil {
			return err
		}
		_, err := fr.Freeze(context.Background(), time.Second)
		return err
	}
	switch mode {
	case "hang", "deadline":
		timeout := 10 * time.Second
		if mode == "deadline" {
			timeout = 300 * time.Millisecond
		}
		if err := armFreeze(timeout); err != nil {
			return err
		}
		record("frozen")
	case "disarm":
		if err := armFreeze(200 * time.Millisecond); err != nil {
			return err
		}
		if err := wd.Disarm(); err != nil {
			return err
		}
		record("frozen-disarmed")
	case "bad-arm":
		err := wd.Arm(fr.Kind(), filepath.Dir(dir), time.Second)
		record("bad-arm %v", err != nil)
	case "cycle":
		if err := armFreeze(time.Second); err != nil {
			return err
		}
		if err := fr.Thaw(); err != nil {
			return err
		}
		if err := wd.Disarm(); err != nil {
			return err
		}
		record("cycle-ok")
	}
	return nil
}

// waitExit blocks until pid exits.
func waitExit(pid int) {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return
	}
	defer unix.Close(fd)
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for {
		if _, err := unix.Poll(fds, -1); err != unix.EINTR {
			return
		}
	}
}

func countLines(path, word string) int {
	b, _ := os.ReadFile(path)
	n := 0
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 1 && f[1] == word {
			n++
		}
	}
	return n
}

// harness is a test cgroup with a busy loop (the container's init), a
// watchdog started like hook.StartShim does, and its fake shim.
type harness struct {
	t      *testing.T
	kind   freezer.Kind
	dir    string
	init   *exec.Cmd
	wd     *exec.Cmd
	wdDone chan error
	events string
	log    string
	stderr string // the watchdog's standard error (race reports)
	fr     *freezer.Freezer
}

func newHarness(t *testing.T, kind freezer.Kind, mode string, ready *os.File) *harness {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	root := "/sys/fs/cgroup/freezer"
	if kind == freezer.V2 {
		root = "/sys/fs/cgroup/unified"
	}
	if _, err := os.Stat(root); err != nil {
		t.Skipf("no cgroup hierarchy at %s", root)
	}
	h := &harness{t: t, kind: kind, events: filepath.Join(t.TempDir(), "events"), log: filepath.Join(t.TempDir(), "watchdog.log")}
	h.dir = filepath.Join(root, fmt.Sprintf("seamless-watchdog-test-%d", os.Getpid()), strings.ReplaceAll(t.Name(), "/", "_"))
	if err := os.MkdirAll(h.dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.cleanup)
	h.init = exec.Command("sh", "-c", "while :; do :; done")
	if err := h.init.Start(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(h.dir, "cgroup.procs"), []byte(strconv.Itoa(h.init.Process.Pid)), 0); err != nil {
		t.Fatal(err)
	}
	fr, err := freezer.Open(kind, h.dir)
	if err != nil {
		t.Fatal(err)
	}
	h.fr = fr
	h.startWatchdog(mode, ready)
	return h
}

func (h *harness) startWatchdog(mode string, ready *os.File) {
	h.t.Helper()
	key := "freezer"
	if h.kind == freezer.V2 {
		key = ""
	}
	cfg := &Config{
		ContainerID: "test", InitPID: h.init.Process.Pid, CgroupPaths: map[string]string{key: h.dir},
		LogPath: h.log, ReadyEnv: envReady, ChildEnv: []string{envRole + "=fake-shim", envFakeShim + "=1"},
	}
	args, err := Args(cfg, Child{Path: os.Args[0], Args: []string{"fake-shim", mode, string(h.kind), h.dir, h.events, strconv.Itoa(h.init.Process.Pid)}})
	if err != nil {
		h.t.Fatal(err)
	}
	h.wd = exec.Command(os.Args[0], args...)
	h.wd.Args[0] = "seamless-watchdog"
	h.wd.Env = append(os.Environ(), envRole+"="+Role)
	if ready != nil {
		h.wd.ExtraFiles = []*os.File{ready}
		h.wd.Env = append(h.wd.Env, envReady+"=3")
	}
	h.wd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	h.stderr = filepath.Join(h.t.TempDir(), "watchdog.stderr")
	stderr, err := os.Create(h.stderr)
	if err != nil {
		h.t.Fatal(err)
	}
	defer stderr.Close()
	h.wd.Stderr = stderr
	if err := h.wd.Start(); err != nil {
		h.t.Fatal(err)
	}
	h.wdDone = make(chan error, 1)
	go func() { h.wdDone <- h.wd.Wait() }()
}

// cleanup thaws the cgroup, ends the init (the fake shims and the watchdog
// follow), kills by pid whatever is left and removes the cgroup.
func (h *harness) cleanup() {
	t := h.t
	os.WriteFile(filepath.Join(h.dir, "freezer.state"), []byte("THAWED"), 0)
	os.WriteFile(filepath.Join(h.dir, "cgroup.freeze"), []byte("0"), 0)
	if h.init != nil && h.init.Process != nil {
		h.init.Process.Kill()
		h.init.Wait()
	}
	if h.wd != nil && h.wdDone != nil {
		select {
		case <-h.wdDone:
		case <-time.After(5 * time.Second):
			t.Errorf("watchdog %d still running 5 s after the init exited", h.wd.Process.Pid)
			h.wd.Process.Kill()
			<-h.wdDone
		}
	}
	for _, pid := range h.shimPIDs() {
		if unix.Kill(pid, 0) == nil && !zombie(pid) {
			t.Errorf("fake shim %d still running", pid)
			unix.Kill(pid, unix.SIGKILL)
		}
	}
	if h.fr != nil {
		h.fr.Close()
	}
	os.Remove(h.dir)
	os.Remove(filepath.Dir(h.dir))
	if b, err := os.ReadFile(h.log); err == nil {
		t.Logf("watchdog log:\n%s", b)
	}
	if b, _ := os.ReadFile(h.stderr); len(b) > 0 {
		t.Errorf("watchdog stderr:\n%s", b)
	}
}

func zombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	return err != nil || strings.Contains(string(b), ") Z ")
}

// shimPIDs lists the pids of the fake shims started so far.
func (h *harness) shimPIDs() []int {
	b, _ := os.ReadFile(h.events)
	var pids []int
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 1 && f[1] == "start" {
			pid, _ := strconv.Atoi(f[0])
			pids = append(pids, pid)
		}
	}
	return pids
}

// waitEvent waits for a line "PID event..." and returns its pid and fields.
func (h *harness) waitEvent(event string, timeout time.Duration) (int, []string) {
	h.t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		b, _ := os.ReadFile(h.events)
		for _, line := range strings.Split(string(b), "\n") {
			if f := strings.Fields(line); len(f) > 1 && f[1] == "error" {
				h.t.Fatalf("fake shim: %s", line)
			} else if len(f) > 1 && f[1] == event {
				pid, _ := strconv.Atoi(f[0])
				return pid, f[2:]
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	h.t.Fatalf("no %q event after %v; events:\n%s", event, timeout, readFile(h.events))
	return 0, nil
}

// thawDoneAt finds the "done at" time of the first watchdog thaw in log,
// on the day of ref.
func thawDoneAt(log string, ref time.Time) (time.Time, bool) {
	_, rest, ok := strings.Cut(log, "while armed; thawed")
	if !ok {
		return time.Time{}, false
	}
	_, rest, ok = strings.Cut(rest, "done at ")
	if !ok || len(rest) < len(ThawLogLayout) {
		return time.Time{}, false
	}
	clock, err := time.ParseInLocation(ThawLogLayout, rest[:len(ThawLogLayout)], time.Local)
	if err != nil {
		return time.Time{}, false
	}
	y, m, d := ref.Date()
	return time.Date(y, m, d, clock.Hour(), clock.Minute(), clock.Second(), clock.Nanosecond(), time.Local), true
}

func readFile(path string) string {
	b, _ := os.ReadFile(path)
	return string(b)
}

// waitThawed polls the cgroup every 50 µs until it is not frozen and
// returns how long that took.
func (h *harness) waitThawed(since time.Time, timeout time.Duration) time.Duration {
	h.t.Helper()
	ts := unix.NsecToTimespec(int64(50 * time.Microsecond))
	for {
		frozen, err := h.fr.Frozen()
		if err != nil {
			h.t.Fatal(err)
		}
		if !frozen {
			return time.Since(since)
		}
		if time.Since(since) > timeout {
			h.t.Fatalf("still frozen %v later", timeout)
		}
		unix.Nanosleep(&ts, nil)
	}
}

func (h *harness) assertFrozen() {
	h.t.Helper()
	if frozen, err := h.fr.Frozen(); err != nil || !frozen {
		h.t.Fatalf("cgroup not frozen: %v %v", frozen, err)
	}
}

// assertInitRuns checks that the busy init gets CPU time.
func (h *harness) assertInitRuns() {
	h.t.Helper()
	before := cpuTicks(h.init.Process.Pid)
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
		if cpuTicks(h.init.Process.Pid) != before {
			return
		}
	}
	h.t.Fatal("the thawed init does not run")
}

// cpuTicks reads utime+stime of pid.
func cpuTicks(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return -1
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	u, _ := strconv.Atoi(f[11])
	s, _ := strconv.Atoi(f[12])
	return u + s
}

// contextSwitches sums the voluntary and involuntary context switches of
// all threads of pid.
func contextSwitches(pid int) int {
	total := 0
	tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	for _, task := range tasks {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/status", pid, task.Name()))
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.HasSuffix(k, "ctxt_switches") {
				n, _ := strconv.Atoi(strings.TrimSpace(v))
				total += n
			}
		}
	}
	return total
}

// waitWatchdogExit waits for the watchdog to exit and returns its error.
func (h *harness) waitWatchdogExit(timeout time.Duration) error {
	h.t.Helper()
	select {
	case err := <-h.wdDone:
		h.wdDone = nil
		return err
	case <-time.After(timeout):
		h.t.Fatalf("watchdog still running after %v", timeout)
		return nil
	}
}

// TestThawOnShimKill: SIGKILL of a shim that froze the cgroup → thawed in
// < 100 ms, the init runs again, a new shim is started and can freeze.
func TestThawOnShimKill(t *testing.T) {
	for _, kind := range []freezer.Kind{freezer.V1, freezer.V2} {
		t.Run(string(kind), func(t *testing.T) {
			h := newHarness(t, kind, "hang", nil)
			pid, _ := h.waitEvent("frozen", 10*time.Second)
			h.assertFrozen()
			start := time.Now()
			if err := unix.Kill(pid, unix.SIGKILL); err != nil {
				t.Fatal(err)
			}
			seen := h.waitThawed(start, 2*time.Second)
			h.assertInitRuns()
			h.waitEvent("cycle-ok", 10*time.Second)
			done, ok := thawDoneAt(readFile(h.log), start)
			if !ok {
				t.Fatalf("the watchdog log does not tell of the thaw:\n%s", readFile(h.log))
			}
			took := done.Sub(start)
			t.Logf("%s: thaw done %v after SIGKILL of shim %d (seen by the test after %v)", kind, took, pid, seen)
			if took > 100*time.Millisecond {
				t.Errorf("thawed %v after the shim's death, want < 100 ms", took)
			}
		})
	}
}

// TestThawOnDeadline: a pause longer than the armed timeout is thawed by
// the watchdog although the shim lives.
func TestThawOnDeadline(t *testing.T) {
	h := newHarness(t, freezer.V1, "deadline", nil)
	pid, _ := h.waitEvent("frozen", 10*time.Second)
	seen := time.Now()
	took := h.waitThawed(seen, 2*time.Second)
	t.Logf("thawed %v after the freeze was seen (timeout 300 ms)", took)
	if took > 400*time.Millisecond {
		t.Errorf("thawed %v after the freeze, want about 300 ms", took)
	}
	h.assertInitRuns()
	if unix.Kill(pid, 0) != nil {
		t.Error("the shim died")
	}
}

// TestDisarm: once disarmed, the watchdog leaves the cgroup alone.
func TestDisarm(t *testing.T) {
	h := newHarness(t, freezer.V1, "disarm", nil)
	h.waitEvent("frozen-disarmed", 10*time.Second)
	time.Sleep(500 * time.Millisecond) // past the 200 ms timeout
	h.assertFrozen()
	if err := h.fr.Thaw(); err != nil {
		t.Fatal(err)
	}
}

// TestCleanExit: a shim that exits cleanly ends the watchdog, with no
// restart; so does one that never said hello, whatever its status.
func TestCleanExit(t *testing.T) {
	for _, mode := range []string{"clean", "never-served"} {
		t.Run(mode, func(t *testing.T) {
			h := newHarness(t, freezer.V1, mode, nil)
			if err := h.waitWatchdogExit(5 * time.Second); err != nil {
				t.Errorf("watchdog: %v", err)
			}
			if n := len(h.shimPIDs()); n != 1 {
				t.Errorf("%d shims started, want 1", n)
			}
			if frozen, _ := h.fr.Frozen(); frozen {
				t.Error("frozen")
			}
		})
	}
}

// TestExitsWithInit: the watchdog exits when the container's init does
// (after its shim), and costs no CPU while idle.
func TestExitsWithInit(t *testing.T) {
	h := newHarness(t, freezer.V1, "idle", nil)
	h.waitEvent("start", 10*time.Second)
	time.Sleep(100 * time.Millisecond)
	before, switches := cpuTicks(h.wd.Process.Pid), contextSwitches(h.wd.Process.Pid)
	time.Sleep(2 * time.Second)
	used := cpuTicks(h.wd.Process.Pid) - before
	t.Logf("idle watchdog: %d clock ticks, %d context switches in 2 s", used, contextSwitches(h.wd.Process.Pid)-switches)
	if used > 1 {
		t.Errorf("idle watchdog used %d clock ticks in 2 s", used)
	}
	h.init.Process.Kill()
	h.init.Wait()
	if err := h.waitWatchdogExit(5 * time.Second); err != nil {
		t.Errorf("watchdog: %v", err)
	}
}

// TestReadyHandOff: the first shim gets the ready fd, a restarted one does
// not; a refused arm is reported to the shim.
func TestReadyHandOff(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	h := newHarness(t, freezer.V2, "bad-arm", w)
	w.Close()
	line, err := bufio.NewReader(r).ReadString('\n')
	if strings.TrimSpace(line) != "ready" {
		t.Fatalf("ready pipe: %q %v", line, err)
	}
	pid, fields := h.waitEvent("bad-arm", 10*time.Second)
	if !slices.Equal(fields, []string{"true"}) {
		t.Errorf("an arm for a foreign cgroup was accepted")
	}
	unix.Kill(pid, unix.SIGKILL)
	h.waitEvent("cycle-ok", 10*time.Second)
	starts := strings.Split(strings.TrimSpace(readFile(h.events)), "\n")
	var readies []string
	for _, l := range starts {
		if f := strings.Fields(l); len(f) == 4 && f[1] == "start" {
			readies = append(readies, f[3])
		}
	}
	if !slices.Equal(readies, []string{"ready=true", "ready=false"}) {
		t.Errorf("ready fd per start: %v, want the first only", readies)
	}
}

// TestRefuseInsideGuardedCgroup: a watchdog in the cgroup it guards would
// be frozen with it.
func TestRefuseInsideGuardedCgroup(t *testing.T) {
	own, err := freezer.PathsForPID(os.Getpid())
	if err != nil || own["freezer"] == "" {
		t.Skip("no v1 freezer cgroup for this process")
	}
	if err := checkOutside(map[string]string{"freezer": own["freezer"]}); err == nil {
		t.Fatal("accepted to guard its own cgroup")
	}
	if err := checkOutside(map[string]string{"freezer": "/sys/fs/cgroup/freezer/elsewhere"}); err != nil {
		t.Fatal(err)
	}
}

func TestChildEnv(t *testing.T) {
	got := childEnv([]string{"A=1", "_SEAMLESS_ROLE=watchdog", "READY=3", "B=2"}, []string{"_SEAMLESS_ROLE=shim", EnvFD + "=3"}, "READY")
	want := []string{"A=1", "B=2", "_SEAMLESS_ROLE=shim", EnvFD + "=3"}
	if !slices.Equal(got, want) {
		t.Fatalf("childEnv = %v, want %v", got, want)
	}
}

// TestNewGuardsWhatExists: a missing cgroup path is skipped (and logged);
// with none left, New fails.
func TestNewGuardsWhatExists(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	dir := fmt.Sprintf("/sys/fs/cgroup/freezer/seamless-watchdog-test-%d-new", os.Getpid())
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Skip(err)
	}
	defer os.Remove(dir)
	var logs strings.Builder
	logger := log.New(&logs, "", 0)
	child := Child{Path: "/bin/true", Args: []string{"true"}}
	cfg := &Config{ContainerID: "c", InitPID: os.Getpid(), CgroupPaths: map[string]string{"freezer": dir, "": "/sys/fs/cgroup/unified/nonexistent"}}
	w, err := New(cfg, child, logger)
	if err != nil {
		t.Fatal(err)
	}
	w.Close()
	if len(w.freezers) != 1 || !strings.Contains(logs.String(), "not guarded") {
		t.Errorf("freezers %d, log %q", len(w.freezers), logs.String())
	}
	cfg.CgroupPaths = map[string]string{"freezer": dir + "-nonexistent"}
	if _, err := New(cfg, child, logger); err == nil || !strings.Contains(err.Error(), "nothing to guard") {
		t.Errorf("want nothing to guard, got %v", err)
	}
}
