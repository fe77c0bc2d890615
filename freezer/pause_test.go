package freezer

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestPauseV1(t *testing.T) { testPause(t, V1, "/sys/fs/cgroup/freezer") }

func TestPauseV2(t *testing.T) { testPause(t, V2, unifiedRootOrSkip(t)) }

// unifiedRootOrSkip returns the host's cgroup2 mount, or skips.
func unifiedRootOrSkip(t *testing.T) string {
	t.Helper()
	root, err := unifiedMount()
	if err != nil {
		t.Skip(err)
	}
	return root
}

// testPause: work runs while the loop is frozen, on a SCHED_FIFO thread;
// the loop runs again afterwards, also when work fails or panics.
func testPause(t *testing.T, kind Kind, root string) {
	dir, pid := testCgroup(t, root)
	f, err := Open(kind, dir)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()

	var frozenInside bool
	var policy uint32
	res, err := f.Pause(context.Background(), time.Second, func() error {
		frozenInside, _ = f.Frozen()
		if attr, err := unix.SchedGetAttr(0, 0); err == nil {
			policy = attr.Policy
		}
		before := cpuTicks(t, pid)
		time.Sleep(100 * time.Millisecond)
		if after := cpuTicks(t, pid); after != before {
			t.Errorf("the loop ran during the pause: cpu ticks %d -> %d", before, after)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("pause: %v", err)
	}
	t.Logf("%s pause: freeze %v, held %v, thaw %v, total %v", kind, res.Freeze.Wait, res.Held, res.Thaw, res.Total)
	if !frozenInside {
		t.Error("work ran while the cgroup was not frozen")
	}
	if res.Freeze.Realtime && policy != unix.SCHED_FIFO {
		t.Errorf("work ran with policy %d, want SCHED_FIFO for the whole pause", policy)
	}
	if res.Held < 100*time.Millisecond || res.Total < res.Freeze.Wait+res.Held+res.Thaw || res.FrozenAt.IsZero() {
		t.Errorf("figures do not add up: %+v", res)
	}
	if frozen, _ := f.Frozen(); frozen {
		t.Fatal("still frozen after Pause")
	}
	assertRuns(t, pid)

	boom := errors.New("boom")
	if _, err := f.Pause(context.Background(), time.Second, func() error { return boom }); !errors.Is(err, boom) {
		t.Errorf("Pause returned %v, want the work's error", err)
	}
	if frozen, _ := f.Frozen(); frozen {
		t.Fatal("still frozen after a failed Pause")
	}
	func() {
		defer func() {
			if recover() == nil {
				t.Error("the panic did not propagate")
			}
		}()
		f.Pause(context.Background(), time.Second, func() error { panic("in the pause") })
	}()
	if frozen, _ := f.Frozen(); frozen {
		t.Fatal("still frozen after a panic in the pause")
	}
	assertRuns(t, pid)
	assertPolicyRestored(t)
}

func TestProcsV1(t *testing.T) { testProcs(t, V1, "/sys/fs/cgroup/freezer") }

func TestProcsV2(t *testing.T) { testProcs(t, V2, unifiedRootOrSkip(t)) }

// testProcs: Procs lists the cgroup's processes and those of descendant
// cgroups made after the freezer was opened, each once.
func testProcs(t *testing.T, kind Kind, root string) {
	dir, pid := cgroupWith(t, root, "sleep", "100")
	f, err := Open(kind, dir)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got, err := f.Procs()
	if err != nil || !slices.Equal(got, []int{pid}) {
		t.Fatalf("Procs = %v, %v; want [%d]", got, err, pid)
	}

	// A nested cgroup (as systemd in a container makes) appears later.
	child := filepath.Join(dir, "nested", "deeper")
	if err := os.MkdirAll(child, 0o755); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(filepath.Dir(child))
	defer os.Remove(child)
	cmd := exec.Command("sleep", "100")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	if err := os.WriteFile(filepath.Join(child, "cgroup.procs"), []byte(strconv.Itoa(cmd.Process.Pid)), 0); err != nil {
		t.Fatal(err)
	}
	got, err = f.Procs()
	slices.Sort(got)
	want := []int{pid, cmd.Process.Pid}
	slices.Sort(want)
	if err != nil || !slices.Equal(got, want) {
		t.Fatalf("Procs with a nested cgroup = %v, %v; want %v", got, err, want)
	}
	// Many processes: more than one read of cgroup.procs.
	var more []*exec.Cmd
	for i := 0; i < 300; i++ {
		c := exec.Command("sleep", "100")
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		more = append(more, c)
		defer func() { c.Process.Kill(); c.Wait() }()
		if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(c.Process.Pid)), 0); err != nil {
			t.Fatal(err)
		}
		want = append(want, c.Process.Pid)
	}
	got, err = f.Procs()
	slices.Sort(got)
	slices.Sort(want)
	if err != nil || !slices.Equal(got, want) {
		t.Fatalf("Procs with %d processes: got %d, %v", len(want), len(got), err)
	}
	for _, c := range more {
		c.Process.Kill()
		c.Wait()
	}
}

func TestWaitQuiescentV1(t *testing.T) { testWaitQuiescent(t, V1, "/sys/fs/cgroup/freezer") }

func TestWaitQuiescentV2(t *testing.T) { testWaitQuiescent(t, V2, unifiedRootOrSkip(t)) }

// testWaitQuiescent: a cgroup whose only task sleeps interruptibly is quiet
// at once; one with a task stuck in an uninterruptible sleep is not, and the
// wait is bounded.
func testWaitQuiescent(t *testing.T, kind Kind, root string) {
	dir, _ := cgroupWith(t, root, "sleep", "100")
	f, err := Open(kind, dir)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if q := f.WaitQuiescent(context.Background(), 50*time.Millisecond); !q.Quiet || q.Checks != 1 {
		t.Fatalf("sleeping task: %+v, want quiet at the first look", q)
	}

	blocked := uninterruptibleTask(t, dir)
	start := time.Now()
	q := f.WaitQuiescent(context.Background(), 20*time.Millisecond)
	if q.Quiet || q.Checks < 2 || time.Since(start) > 200*time.Millisecond {
		t.Fatalf("task %d in state D: %+v after %v, want not quiet after a bounded wait", blocked, q, time.Since(start))
	}
}

// uninterruptibleTask moves a task into dir that waits in state D: a FUSE
// request the daemon never answers, interrupted (FUSE then waits killable,
// i.e. uninterruptible, for the answer to its interrupt).
func uninterruptibleTask(t *testing.T, dir string) int {
	t.Helper()
	tid := startDStateTask(t, dir)
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", tid))
	if err != nil {
		t.Fatal(err)
	}
	var tgid int
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "Tgid:"); ok {
			tgid, _ = strconv.Atoi(strings.TrimSpace(v))
		}
	}
	// SIGURG: the Go runtime's own preemption signal, handled and harmless.
	if err := unix.Tgkill(tgid, tid, unix.SIGURG); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 512)
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if threadState(tid, buf) == "D" {
			return tid
		}
	}
	t.Skipf("thread %d never entered state D (state %q)", tid, threadState(tid, buf))
	return 0
}
