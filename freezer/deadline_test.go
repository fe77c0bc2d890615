package freezer

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// envHelper makes the test binary run a helper instead of the tests.
const envHelper = "_SEAMLESS_FREEZER_TEST_HELPER"

func TestMain(m *testing.M) {
	if os.Getenv(envHelper) == "fuse-blocker" {
		os.Exit(fuseBlocker())
	}
	os.Exit(m.Run())
}

// fuseBlocker runs in its own mount namespace: it mounts a FUSE file system
// served by nobody but itself, answers the kernel's INIT, says "ready",
// waits for a line on stdin, then stats a file in it. The LOOKUP is never
// answered: the task waits interruptibly until the freezer's fake signal
// arrives, then killable-only (state D, request_wait_answer), so neither
// freezer can freeze it until it is killed. The mount is invisible outside
// the namespace and goes away with the process.
func fuseBlocker() int {
	fail := func(err error) int { fmt.Println("error:", err); return 1 }
	if err := unix.Mount("", "/", "", unix.MS_PRIVATE|unix.MS_REC, ""); err != nil {
		return fail(fmt.Errorf("make mounts private: %w", err))
	}
	fd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fail(err)
	}
	dir := os.Getenv("FUSE_DIR")
	opts := fmt.Sprintf("fd=%d,rootmode=40000,user_id=0,group_id=0", fd)
	if err := unix.Mount("seamless-test", dir, "fuse.seamless-test", unix.MS_NOSUID|unix.MS_NODEV, opts); err != nil {
		return fail(fmt.Errorf("mount fuse: %w", err))
	}
	if err := answerFuseInit(fd); err != nil {
		return fail(err)
	}
	fmt.Println("ready")
	if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
		return fail(err)
	}
	_, err = os.Stat(filepath.Join(dir, "never-answered"))
	return fail(fmt.Errorf("stat returned: %v", err))
}

// answerFuseInit reads the kernel's FUSE_INIT request and accepts protocol
// 7.31 with no optional feature.
func answerFuseInit(fd int) error {
	buf := make([]byte, 1<<17)
	n, err := unix.Read(fd, buf)
	if err != nil {
		return fmt.Errorf("read fuse init: %w", err)
	}
	const inHeader, outHeader, initOut, opInit = 40, 16, 64, 26
	if n < inHeader || binary.LittleEndian.Uint32(buf[4:]) != opInit {
		return fmt.Errorf("first fuse request is not INIT (%d bytes)", n)
	}
	unique := binary.LittleEndian.Uint64(buf[8:])
	out := make([]byte, outHeader+initOut)
	binary.LittleEndian.PutUint32(out[0:], uint32(len(out)))
	binary.LittleEndian.PutUint64(out[8:], unique)
	binary.LittleEndian.PutUint32(out[outHeader:], 7)       // major
	binary.LittleEndian.PutUint32(out[outHeader+4:], 31)    // minor
	binary.LittleEndian.PutUint32(out[outHeader+20:], 4096) // max_write
	if _, err := unix.Write(fd, out); err != nil {
		return fmt.Errorf("answer fuse init: %w", err)
	}
	return nil
}

// startDStateTask starts a process that will block in uninterruptible sleep
// once the cgroup dir is being frozen, moves it there, releases it and waits
// until it waits for the FUSE answer. It returns the blocked thread's id; the
// process is killed (by pid) at the end of the test.
func startDStateTask(t *testing.T, dir string) int {
	t.Helper()
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skipf("no /dev/fuse: %v", err)
	}
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), envHelper+"=fuse-blocker", "FUSE_DIR="+t.TempDir())
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: unix.CLONE_NEWNS}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	t.Cleanup(func() {
		// A v1-frozen task ignores SIGKILL: thaw first.
		os.WriteFile(filepath.Join(dir, "freezer.state"), []byte("THAWED"), 0)
		os.WriteFile(filepath.Join(dir, "cgroup.freeze"), []byte("0"), 0)
		cmd.Process.Kill()
		cmd.Wait()
	})
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if strings.TrimSpace(line) != "ready" {
		t.Fatalf("fuse helper: %q %v", line, err)
	}
	go io.Copy(io.Discard, stdout)
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0); err != nil {
		t.Fatal(err)
	}
	fmt.Fprintln(stdin, "go")
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		for _, tid := range threadIDs(pid) {
			wchan, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/wchan", pid, tid))
			if string(wchan) == "request_wait_answer" {
				return tid
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("helper %d never waited for the FUSE answer", pid)
	return 0
}

func threadIDs(pid int) []int {
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	var tids []int
	for _, e := range ents {
		if tid, err := strconv.Atoi(e.Name()); err == nil {
			tids = append(tids, tid)
		}
	}
	return tids
}

// testDeadline: a task in uninterruptible sleep keeps the freeze from
// completing; Freeze gives up at its deadline, thaws, and names the task.
func testDeadline(t *testing.T, kind Kind, root string) {
	dir, busyPID := testCgroup(t, root)
	blocked := startDStateTask(t, dir)
	f, err := Open(kind, dir)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()

	const timeout = 300 * time.Millisecond
	start := time.Now()
	res, err := f.Freeze(context.Background(), timeout)
	took := time.Since(start)
	t.Logf("%s: %v after %v (%d polls, %d rewrites, realtime %v)", kind, err, took, res.Polls, res.Rewrites, res.Realtime)
	var te *TimeoutError
	if !errors.As(err, &te) {
		t.Fatalf("want a *TimeoutError, got %v", err)
	}
	if took < timeout || took > timeout+200*time.Millisecond {
		t.Errorf("gave up after %v, want about %v", took, timeout)
	}
	named := false
	for _, task := range te.Tasks {
		if task.TID == blocked && task.State == "D" && task.Wchan != "" {
			named = true
		}
	}
	if !named || !strings.Contains(err.Error(), strconv.Itoa(blocked)) {
		t.Errorf("error does not name the blocked task %d in state D: %v", blocked, err)
	}
	if frozen, err := f.Frozen(); err != nil || frozen {
		t.Fatalf("after the timeout: frozen=%v err=%v", frozen, err)
	}
	if st, _ := f.state(); st != stateThawed {
		t.Fatalf("after the timeout the cgroup is not thawed (state %d)", st)
	}
	assertRuns(t, busyPID)
}

func TestFreezeDeadlineV1(t *testing.T) { testDeadline(t, V1, "/sys/fs/cgroup/freezer") }

func TestFreezeDeadlineV2(t *testing.T) {
	root, err := unifiedMount()
	if err != nil {
		t.Skip(err)
	}
	testDeadline(t, V2, root)
}

// TestFreezeContextCancel: a cancelled context ends the wait like a deadline.
func TestFreezeContextCancel(t *testing.T) {
	dir, _ := testCgroup(t, "/sys/fs/cgroup/freezer")
	startDStateTask(t, dir)
	f, err := Open(V1, dir)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	time.AfterFunc(50*time.Millisecond, cancel)
	_, err = f.Freeze(ctx, 10*time.Second)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("want the context's error, got %v", err)
	}
	if st, _ := f.state(); st != stateThawed {
		t.Fatalf("not thawed after cancel (state %d)", st)
	}
}
