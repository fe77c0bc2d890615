package integration

import (
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/seamless-snapshot/seamless/freezer"
	"github.com/seamless-snapshot/seamless/internal/proc"
	"github.com/seamless-snapshot/seamless/watchdog"
)

// TestWatchdog: SIGKILL of the shim while the container is frozen → the
// watchdog thaws it within 100 ms, the container keeps running, a new shim
// serves it and the next snapshot works; the watchdog goes away with the
// container. For both freezers.
func TestWatchdog(t *testing.T) {
	for _, kind := range []freezer.Kind{freezer.V1, freezer.V2} {
		t.Run(string(kind), func(t *testing.T) { testWatchdogKill(t, kind) })
	}
}

func testWatchdogKill(t *testing.T, kind freezer.Kind) {
	id := "e2e-watchdog-" + string(kind)
	startContainer(t, id, map[string]string{
		"io.seamless.test.pause-delay-ms": "2000",
		"io.seamless.freezer":             string(kind),
	})
	fr := wdContainerFreezer(t, id, kind)
	defer fr.Close()
	oldShim := wdWaitNewShim(t, id, 0, 10*time.Second) // the info file follows "ready"
	wd := wdParentPID(t, oldShim)
	if wdArgv0(wd) != "seamless-watchdog" {
		t.Fatalf("the shim's parent %d is %q, not the watchdog", wd, wdArgv0(wd))
	}

	// A capture held frozen by the pause delay; the request dies with the shim.
	body := fmt.Sprintf(`{"target":%q,"plain_http":true}`, env.reg.Host+"/e2e/watchdog-"+string(kind)+":killed")
	go wdPostIgnoringErrors(env.dirs.Socket(id), "/v1/snapshots", body)
	wdWaitFrozen(t, fr, 10*time.Second)

	start := time.Now()
	if err := syscall.Kill(oldShim, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	seen := wdWaitNotFrozen(t, fr, start, 5*time.Second)
	assertThawedAndRunning(t, id)

	newShim := wdWaitNewShim(t, id, oldShim, 10*time.Second)
	if p := wdParentPID(t, newShim); p != wd {
		t.Errorf("new shim %d has parent %d, want the watchdog %d", newShim, p, wd)
	}
	log := readFile(env.dirs.Run + "/" + id + ".log")
	done, ok := wdThawDoneAt(log, string(kind), start)
	if !ok {
		t.Fatalf("the log does not tell of the watchdog's thaw:\n%s", log)
	}
	took := done.Sub(start)
	t.Logf("%s: watchdog's thaw done %v after SIGKILL of shim %d (seen by the test after %v)", kind, took, oldShim, seen)
	if took > 100*time.Millisecond {
		t.Errorf("container thawed %v after the shim's death, want < 100 ms", took)
	}

	target := env.reg.Host + "/e2e/watchdog-" + string(kind) + ":after"
	res := seamless(t, "snapshot", "--container", id, "--target", target, "--plain-http", "--wait")
	if res.code != 0 {
		t.Fatalf("snapshot after the restart: exit %d\n%s", res.code, res.stderr)
	}
	assertThawedAndRunning(t, id)
	removeContainer(t, id)
	deadline := time.Now().Add(10 * time.Second)
	for proc.Alive(wd, 0) && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if proc.Alive(wd, 0) {
		t.Errorf("watchdog %d still running after the container was removed", wd)
	}
}

// wdThawDoneAt finds the "done at" time of the watchdog's thaw of a kind
// freezer in the shim log, on the day of ref.
func wdThawDoneAt(log, kind string, ref time.Time) (time.Time, bool) {
	_, rest, ok := strings.Cut(log, "while armed; thawed "+kind)
	if !ok {
		return time.Time{}, false
	}
	_, rest, ok = strings.Cut(rest, "done at ")
	if !ok || len(rest) < len(watchdog.ThawLogLayout) {
		return time.Time{}, false
	}
	clock, err := time.ParseInLocation(watchdog.ThawLogLayout, rest[:len(watchdog.ThawLogLayout)], time.Local)
	if err != nil {
		return time.Time{}, false
	}
	y, m, d := ref.Date()
	return time.Date(y, m, d, clock.Hour(), clock.Minute(), clock.Second(), clock.Nanosecond(), time.Local), true
}

// wdContainerFreezer opens the container's freezer of the given kind (to read
// its state quickly).
func wdContainerFreezer(t *testing.T, id string, kind freezer.Kind) *freezer.Freezer {
	t.Helper()
	st, err := env.ctd.RuncState(id)
	if err != nil {
		t.Fatal(err)
	}
	dir := st.FreezerV1()
	if kind == freezer.V2 {
		dir = st.Unified()
	}
	fr, err := freezer.Open(kind, dir)
	if err != nil {
		t.Fatal(err)
	}
	return fr
}

func wdWaitFrozen(t *testing.T, fr *freezer.Freezer, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if frozen, _ := fr.Frozen(); frozen {
			return
		}
		time.Sleep(time.Millisecond)
	}
	t.Fatalf("%s never frozen", fr.Dir())
}

// wdWaitNotFrozen polls every 100 µs and returns the time since start at
// which the cgroup was first seen not frozen.
func wdWaitNotFrozen(t *testing.T, fr *freezer.Freezer, start time.Time, timeout time.Duration) time.Duration {
	t.Helper()
	for {
		frozen, err := fr.Frozen()
		if err != nil {
			t.Fatal(err)
		}
		if !frozen {
			return time.Since(start)
		}
		if time.Since(start) > timeout {
			t.Fatalf("%s still frozen %v after the shim's death", fr.Dir(), timeout)
		}
		time.Sleep(100 * time.Microsecond)
	}
}

// wdWaitNewShim waits for a shim other than old to serve container id.
func wdWaitNewShim(t *testing.T, id string, old int, timeout time.Duration) int {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if pid := wdInfoShimPID(id); pid > 0 && pid != old && proc.Alive(pid, 0) {
			if c, err := net.Dial("unix", env.dirs.Socket(id)); err == nil {
				c.Close()
				return pid
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("no new shim for %s after %v; log:\n%s", id, timeout, readFile(env.dirs.Run+"/"+id+".log"))
	return 0
}

// wdInfoShimPID reads the shim pid of the info file, 0 if there is none.
func wdInfoShimPID(id string) int {
	b, err := os.ReadFile(env.dirs.ShimInfo(id))
	if err != nil {
		return 0
	}
	_, rest, ok := strings.Cut(string(b), `"shim_pid":`)
	if !ok {
		return 0
	}
	n, _ := strconv.Atoi(strings.TrimSpace(strings.SplitN(rest, ",", 2)[0]))
	return n
}

func wdParentPID(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	ppid, _ := strconv.Atoi(f[1])
	return ppid
}

func wdArgv0(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	a, _, _ := strings.Cut(string(b), "\x00")
	return a
}

// wdPostIgnoringErrors sends a POST over the unix socket and reads the answer,
// if any; the shim may die meanwhile.
func wdPostIgnoringErrors(socket, path, body string) {
	c, err := net.Dial("unix", socket)
	if err != nil {
		return
	}
	defer c.Close()
	fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", path, len(body), body)
	io.Copy(io.Discard, c)
}
