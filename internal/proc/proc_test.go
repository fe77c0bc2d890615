package proc

import (
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestParseStat(t *testing.T) {
	line := "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 18446744073709551615"
	st, err := ParseStat(line)
	if err != nil || st.State != 'S' || st.StartTime != 987654 {
		t.Fatalf("ParseStat = %+v, %v", st, err)
	}
	for _, bad := range []string{"", "1 (x", "1 (x) S 1 2", "1 (x) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 nan"} {
		if _, err := ParseStat(bad); err == nil {
			t.Errorf("ParseStat(%q) accepted", bad)
		}
	}
}

func TestAlive(t *testing.T) {
	self := os.Getpid()
	start, err := StartTime(self)
	if err != nil || start == 0 {
		t.Fatalf("StartTime(self) = %d, %v", start, err)
	}
	if !Alive(self, start) || !Alive(self, 0) {
		t.Error("this process is not alive")
	}
	if Alive(self, start+1) {
		t.Error("a different start time still counts as alive")
	}
	cmd := exec.Command("true")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	// Not yet reaped: a zombie, which is not alive.
	deadline := time.Now().Add(10 * time.Second)
	for Alive(pid, 0) {
		if time.Now().After(deadline) {
			t.Fatal("an exited, unreaped child is still alive")
		}
		time.Sleep(time.Millisecond)
	}
	cmd.Wait()
	if Alive(pid, 0) || Alive(-1, 0) {
		t.Error("exited process alive")
	}
}

// TestNiceThreads: every thread of the process gets the nice value, and
// threads started afterwards inherit it.
func TestNiceThreads(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to restore the nice value")
	}
	defer NiceThreads(0)
	if err := NiceThreads(7); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { // a new OS thread, created after the call
		runtime.LockOSThread()
		<-done
	}()
	time.Sleep(20 * time.Millisecond)
	defer close(done)
	entries, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		tid, _ := strconv.Atoi(e.Name())
		prio, err := unix.Getpriority(unix.PRIO_PROCESS, tid)
		if err != nil {
			continue // the thread ended
		}
		if nice := 20 - prio; nice != 7 { // the raw syscall returns 20 - nice
			t.Errorf("thread %d has nice %d, want 7", tid, nice)
		}
	}
}
