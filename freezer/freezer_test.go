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
)

// testCgroup makes a cgroup in the given hierarchy root, moves a busy shell
// loop into it and removes both at the end.
func testCgroup(t *testing.T, root string) (dir string, pid int) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	if _, err := os.Stat(root); err != nil {
		t.Skipf("no cgroup hierarchy at %s", root)
	}
	dir = filepath.Join(root, fmt.Sprintf("seamless-freezer-test-%d", os.Getpid()), t.Name())
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("sh", "-c", "while :; do :; done")
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
	t.Logf("%s freeze wait %v after %d polls", kind, res.Wait, res.Polls)
	if frozen, err := f.Frozen(); err != nil || !frozen {
		t.Fatalf("after Freeze: frozen=%v err=%v", frozen, err)
	}
	before := cpuTicks(t, pid)
	time.Sleep(300 * time.Millisecond)
	if after := cpuTicks(t, pid); after != before {
		t.Fatalf("frozen loop kept running: cpu ticks %d -> %d", before, after)
	}
	if err := f.Thaw(); err != nil {
		t.Fatalf("thaw: %v", err)
	}
	if frozen, _ := f.Frozen(); frozen {
		t.Fatal("still frozen after Thaw")
	}
	before = cpuTicks(t, pid)
	time.Sleep(300 * time.Millisecond)
	if after := cpuTicks(t, pid); after == before {
		t.Fatal("thawed loop does not run")
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
