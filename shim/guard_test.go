package shim

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seamless-snapshot/seamless/freezer"
	"github.com/seamless-snapshot/seamless/watchdog"
)

// fakeWatchdog answers every arm on a socket pair with ok (or the refusal
// refuse) and returns the client end.
func fakeWatchdog(t *testing.T, refuse string) *watchdog.Client {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	c, err := watchdog.NewClient(fds[0])
	if err != nil {
		t.Fatal(err)
	}
	server := os.NewFile(uintptr(fds[1]), "fake-watchdog")
	t.Cleanup(func() { c.Close(); server.Close() })
	go func() {
		buf := make([]byte, 1<<16)
		for {
			n, err := server.Read(buf)
			if err != nil || n == 0 {
				return
			}
			if strings.Contains(string(buf[:n]), `"op":"arm"`) {
				b, _ := json.Marshal(map[string]any{"ok": refuse == "", "error": refuse})
				server.Write(b)
			}
		}
	}()
	return c
}

// emptyFreezer is the v1 freezer of a new, empty cgroup.
func emptyFreezer(t *testing.T) *freezer.Freezer {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	dir := fmt.Sprintf("/sys/fs/cgroup/freezer/seamless-shim-test-%d", os.Getpid())
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Skip(err)
	}
	t.Cleanup(func() { os.Remove(dir) })
	fr, err := freezer.Open(freezer.V1, dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fr.Close() })
	return fr
}

func TestPauseGuard(t *testing.T) {
	fr := emptyFreezer(t)
	s := &Shim{freezeTimeout: 20 * time.Millisecond, maxPause: 30 * time.Millisecond}

	g, err := s.armWatchdog(fr, 0)
	if err != nil || g.check() != nil {
		t.Fatalf("without a watchdog: %v", err)
	}
	g.disarm()

	s.SetWatchdog(fakeWatchdog(t, "not a freezer of this container"))
	if _, err := s.armWatchdog(fr, 0); err == nil || !strings.Contains(err.Error(), "no freeze without") {
		t.Fatalf("refused arm: %v", err)
	}

	s.SetWatchdog(fakeWatchdog(t, ""))
	g, err = s.armWatchdog(fr, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := g.check(); err != nil {
		t.Fatalf("within the deadline: %v", err)
	}
	g.disarm()
	g.disarm()

	g, err = s.armWatchdog(fr, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer g.disarm()
	time.Sleep(60 * time.Millisecond)
	if err := g.check(); err == nil || !strings.Contains(err.Error(), "deadline") {
		t.Fatalf("past the deadline: %v", err)
	}
}

// TestEnsureAnchor: with EnvFreezerAnchor, a shim on the v1 freezer keeps
// the anchor frozen; on v2 it leaves it alone. The anchor is removed.
func TestEnsureAnchor(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	dir, err := freezer.DefaultAnchorDir()
	if err != nil {
		t.Skip(err)
	}
	if _, err := os.Stat(dir); err == nil {
		t.Skipf("%s exists already: in use, not touched", dir)
	}
	t.Cleanup(func() {
		if err := freezer.RemoveAnchor(dir); err != nil {
			t.Errorf("remove anchor: %v", err)
		}
	})
	t.Setenv(EnvFreezerAnchor, "1")
	paths := map[string]string{"freezer": "/sys/fs/cgroup/freezer/c", "": "/sys/fs/cgroup/unified/c"}
	(&Shim{cfg: &Config{CgroupPaths: paths, Freezer: "v2"}}).ensureAnchor()
	if _, err := os.Stat(dir); err == nil {
		t.Fatal("a v2 shim created the v1 anchor")
	}
	(&Shim{cfg: &Config{CgroupPaths: paths}}).ensureAnchor()
	if !freezer.AnchorFrozen(dir) {
		t.Fatal("no frozen anchor")
	}
}

// TestMonotonicAt: the frozen instant on CLOCK_MONOTONIC is what the clock
// read then, whatever the wall clock does.
func TestMonotonicAt(t *testing.T) {
	var before, after unix.Timespec
	mustClock := func(ts *unix.Timespec) {
		if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, ts); err != nil {
			t.Fatal(err)
		}
	}
	mustClock(&before)
	at := time.Now()
	mustClock(&after)
	time.Sleep(20 * time.Millisecond)
	got := monotonicAt(at)
	if got < before.Nano()-int64(time.Millisecond) || got > after.Nano()+int64(time.Millisecond) {
		t.Errorf("monotonicAt = %d, want within 1ms of [%d, %d]", got, before.Nano(), after.Nano())
	}
}
