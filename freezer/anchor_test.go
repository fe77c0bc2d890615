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

// testAnchor creates an anchor under a name of this test process and
// removes it at the end.
func testAnchor(t testing.TB) string {
	t.Helper()
	root := "/sys/fs/cgroup/freezer"
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	if _, err := os.Stat(root); err != nil {
		t.Skipf("no v1 freezer at %s", root)
	}
	dir := filepath.Join(root, fmt.Sprintf("%s-test-%d", AnchorName, os.Getpid()))
	t.Cleanup(func() {
		if err := RemoveAnchor(dir); err != nil {
			t.Errorf("remove anchor: %v", err)
		}
		if _, err := os.Stat(dir); err == nil {
			t.Errorf("anchor %s left behind", dir)
		}
	})
	if err := EnsureAnchor(dir); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestAnchor(t *testing.T) {
	anchor := testAnchor(t)
	if !AnchorFrozen(anchor) {
		t.Fatal("anchor not frozen")
	}
	if err := EnsureAnchor(anchor); err != nil {
		t.Fatalf("EnsureAnchor twice: %v", err)
	}
	dir, pid := testCgroup(t, "/sys/fs/cgroup/freezer")
	f, err := Open(V1, dir)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	res, err := f.Freeze(context.Background(), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("anchored v1 freeze wait %v", res.Wait)
	if err := f.Thaw(); err != nil {
		t.Fatal(err)
	}
	assertRuns(t, pid)
	if !AnchorFrozen(anchor) {
		t.Fatal("the anchor was thawed by a freeze/thaw of another cgroup")
	}
}

// TestAnchorWithTasks: an anchor that holds a process is thawed and refused.
func TestAnchorWithTasks(t *testing.T) {
	anchor := testAnchor(t)
	cmd := exec.Command("sleep", "1000")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		os.WriteFile(filepath.Join(anchor, "freezer.state"), []byte("THAWED"), 0)
		cmd.Process.Kill()
		cmd.Wait()
	})
	if err := os.WriteFile(filepath.Join(anchor, "cgroup.procs"), []byte(strconv.Itoa(cmd.Process.Pid)), 0); err != nil {
		t.Fatal(err)
	}
	err := EnsureAnchor(anchor)
	if err == nil || !strings.Contains(err.Error(), "holds processes") {
		t.Fatalf("want a refusal, got %v", err)
	}
	if AnchorFrozen(anchor) {
		t.Fatal("an anchor with a process was left frozen")
	}
}

func TestDefaultAnchorDir(t *testing.T) {
	if _, err := os.Stat("/sys/fs/cgroup/freezer/freezer.self_freezing"); err != nil && os.IsNotExist(err) {
		if _, err := os.Stat("/sys/fs/cgroup/freezer"); err != nil {
			t.Skip("no v1 freezer")
		}
	}
	dir, err := DefaultAnchorDir()
	if err != nil {
		t.Skip(err)
	}
	if dir != "/sys/fs/cgroup/freezer/"+AnchorName {
		t.Fatalf("DefaultAnchorDir = %s", dir)
	}
}
