package freezer

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// testCgroup makes a cgroup in the given hierarchy root, moves a busy shell
// loop into it and removes both at the end.
func testCgroup(t testing.TB, root string) (dir string, pid int) {
	t.Helper()
	return cgroupWith(t, root, "sh", "-c", "while :; do :; done")
}

// cgroupWith makes a cgroup in the given hierarchy root, moves a process
// running argv into it and removes both at the end.
func cgroupWith(t testing.TB, root string, argv ...string) (dir string, pid int) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	if _, err := os.Stat(root); err != nil {
		t.Skipf("no cgroup hierarchy at %s", root)
	}
	dir = filepath.Join(root, fmt.Sprintf("seamless-freezer-test-%d", os.Getpid()), strings.ReplaceAll(t.Name(), "/", "_"))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Thaw whatever the test left, kill the loop, then remove the cgroups.
		os.WriteFile(filepath.Join(dir, "freezer.state"), []byte("THAWED"), 0)
		os.WriteFile(filepath.Join(dir, "cgroup.freeze"), []byte("0"), 0)
		cmd.Process.Kill()
		cmd.Wait()
		os.Remove(dir)
		os.Remove(filepath.Dir(dir))
	})
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(cmd.Process.Pid)), 0); err != nil {
		t.Fatal(err)
	}
	return dir, cmd.Process.Pid
}

// cpuTicks reads utime+stime of pid.
func cpuTicks(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	fields := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	u, _ := strconv.Atoi(fields[11])
	s, _ := strconv.Atoi(fields[12])
	return u + s
}

// assertFrozenStill checks that pid uses no CPU for a while.
func assertFrozenStill(t *testing.T, pid int) {
	t.Helper()
	before := cpuTicks(t, pid)
	time.Sleep(300 * time.Millisecond)
	if after := cpuTicks(t, pid); after != before {
		t.Fatalf("frozen loop kept running: cpu ticks %d -> %d", before, after)
	}
}

// assertRuns checks that pid gets CPU time.
func assertRuns(t *testing.T, pid int) {
	t.Helper()
	before := cpuTicks(t, pid)
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
		if cpuTicks(t, pid) != before {
			return
		}
	}
	t.Fatal("thawed loop does not run")
}

func testFreezeThaw(t *testing.T, kind Kind, root string) {
	dir, pid := testCgroup(t, root)
	f, err := Open(kind, dir)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()

	res, err := f.Freeze(context.Background(), time.Second)
	if err != nil {
		t.Fatalf("freeze: %v", err)
	}
	t.Logf("%s freeze wait %v after %d polls, %d rewrites, realtime %v", kind, res.Wait, res.Polls, res.Rewrites, res.Realtime)
	if os.Geteuid() == 0 && !res.Realtime {
		t.Logf("note: SCHED_FIFO refused (RT budget of this cgroup?)")
	}
	if frozen, err := f.Frozen(); err != nil || !frozen {
		t.Fatalf("after Freeze: frozen=%v err=%v", frozen, err)
	}
	assertFrozenStill(t, pid)
	if err := f.Thaw(); err != nil {
		t.Fatalf("thaw: %v", err)
	}
	if frozen, _ := f.Frozen(); frozen {
		t.Fatal("still frozen after Thaw")
	}
	assertRuns(t, pid)
	assertPolicyRestored(t)
}

// assertPolicyRestored checks that freezing left the test's threads at
// SCHED_OTHER (the freezing thread is unlocked and reused).
func assertPolicyRestored(t *testing.T) {
	t.Helper()
	for _, tid := range threadIDs(os.Getpid()) {
		attr, err := unix.SchedGetAttr(tid, 0)
		if err == nil && attr.Policy != unix.SCHED_NORMAL {
			t.Errorf("thread %d left with policy %d", tid, attr.Policy)
		}
	}
}

func TestFreezeThawV1(t *testing.T) { testFreezeThaw(t, V1, "/sys/fs/cgroup/freezer") }

func TestFreezeThawV2(t *testing.T) {
	root, err := unifiedMount()
	if err != nil {
		t.Skip(err)
	}
	testFreezeThaw(t, V2, root)
}

func TestFromCgroupPaths(t *testing.T) {
	v1dir, _ := testCgroup(t, "/sys/fs/cgroup/freezer")
	paths := map[string]string{"freezer": v1dir, "": "/nonexistent"}
	f, err := FromCgroupPaths(paths, "")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if f.Kind() != V1 {
		t.Fatalf("kind = %s, want v1 when a freezer controller path exists", f.Kind())
	}
	if _, err := FromCgroupPaths(map[string]string{}, ""); err == nil {
		t.Fatal("want error for empty paths")
	}
	if _, err := FromCgroupPaths(paths, "v3"); err == nil {
		t.Fatal("want error for unknown kind")
	}
}

func TestPathsForPID(t *testing.T) {
	dir, pid := testCgroup(t, "/sys/fs/cgroup/freezer")
	paths, err := PathsForPID(pid)
	if err != nil {
		t.Fatal(err)
	}
	if paths["freezer"] != dir {
		t.Fatalf("freezer path = %q, want %q", paths["freezer"], dir)
	}
}

// TestThawFrozenParent: Thaw reports a cgroup that an ancestor keeps frozen.
func TestThawFrozenParent(t *testing.T) {
	dir, _ := testCgroup(t, "/sys/fs/cgroup/freezer")
	parent := filepath.Dir(dir)
	f, err := Open(V1, dir)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := os.WriteFile(filepath.Join(parent, "freezer.state"), []byte("FROZEN"), 0); err != nil {
		t.Fatal(err)
	}
	defer os.WriteFile(filepath.Join(parent, "freezer.state"), []byte("THAWED"), 0)
	if err := f.Thaw(); err == nil || !strings.Contains(err.Error(), "still frozen") {
		t.Fatalf("thaw under a frozen parent: %v", err)
	}
}

func TestParseState(t *testing.T) {
	for _, c := range []struct {
		kind Kind
		in   string
		want freezerState
	}{
		{V1, "THAWED\n", stateThawed},
		{V1, "FREEZING\n", stateFreezing},
		{V1, "FROZEN\n", stateFrozen},
		{V2, "populated 1\nfrozen 1\n", stateFrozen},
		{V2, "populated 1\nfrozen 0\n", stateThawed},
		{V2, "populated 0\n", stateThawed},
	} {
		if got := parseState(c.kind, []byte(c.in)); got != c.want {
			t.Errorf("parseState(%s, %q) = %d, want %d", c.kind, c.in, got, c.want)
		}
	}
}

func TestProcCommState(t *testing.T) {
	comm, st := procCommState([]byte("42 (a (b) c) D 1 42 42 0"))
	if comm != "a (b) c" || st != "D" {
		t.Fatalf("got %q %q", comm, st)
	}
}

// TestNoRealtime: a negative priority keeps the caller's policy.
func TestNoRealtime(t *testing.T) {
	dir, _ := testCgroup(t, "/sys/fs/cgroup/freezer")
	f, err := OpenWith(V1, dir, Options{RTPriority: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	res, err := f.Freeze(context.Background(), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if res.Realtime {
		t.Error("Realtime with RTPriority -1")
	}
	if err := f.Thaw(); err != nil {
		t.Fatal(err)
	}
}

// TestLibcontainerFreezeThaw: the baseline freezes and thaws for real.
func TestLibcontainerFreezeThaw(t *testing.T) {
	for _, kind := range []Kind{V1, V2} {
		root := "/sys/fs/cgroup/freezer"
		if kind == V2 {
			var err error
			if root, err = unifiedMount(); err != nil {
				t.Skip(err)
			}
		}
		t.Run(string(kind), func(t *testing.T) {
			dir, pid := testCgroup(t, root)
			freeze, thaw, err := LibcontainerFreezeThaw(kind, dir)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("libcontainer %s: freeze %v thaw %v", kind, freeze, thaw)
			assertRuns(t, pid)
		})
	}
	if _, _, err := LibcontainerFreezeThaw("v3", "/nonexistent"); err == nil {
		t.Error("want an error for an unknown kind")
	}
}
