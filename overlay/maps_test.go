package overlay

import (
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestParseMapsLine(t *testing.T) {
	for _, tc := range []struct {
		line string
		ok   bool
		want sharedMapping
	}{
		{"7f00-7f10 rw-s 00000000 00:28 9979511                    /tmp/a b/merged/mm", true,
			sharedMapping{addr: "7f00-7f10", dev: unix.Mkdev(0, 0x28), ino: 9979511, path: "/tmp/a b/merged/mm"}},
		{"7f00-7f10 -w-s 00001000 fd:01 42 /data/x (deleted)", true,
			sharedMapping{addr: "7f00-7f10", dev: unix.Mkdev(0xfd, 1), ino: 42, path: "/data/x", deleted: true}},
		{"7f00-7f10 rw-p 00000000 00:28 9979511    /private", false, sharedMapping{}},
		{"7f00-7f10 r--s 00000000 00:28 9979511    /readonly", false, sharedMapping{}},
		{"7f00-7f10 rw-s 00000000 00:01 0          /dev/zero (deleted)", true,
			sharedMapping{addr: "7f00-7f10", dev: unix.Mkdev(0, 1), ino: 0, path: "/dev/zero", deleted: true}},
		{"7ffc-7ffd rw-p 00000000 00:00 0          [stack]", false, sharedMapping{}},
	} {
		got, ok, err := parseMapsLine(tc.line)
		if tc.want.ino == 0 && tc.ok {
			tc.ok = false // anonymous shared memory is skipped
		}
		if err != nil || ok != tc.ok || (ok && !reflect.DeepEqual(got, tc.want)) {
			t.Errorf("parseMapsLine(%q) = %+v, %v, %v; want %+v, %v", tc.line, got, ok, err, tc.want, tc.ok)
		}
	}
	if _, _, err := parseMapsLine("garbage"); err == nil {
		t.Error("a malformed line was accepted")
	}
}

// TestMapsReaderQueryMatchesText: PROCMAP_QUERY and the text format find
// the same shared writable mapping; the query is the cheaper one.
func TestMapsReaderQueryMatchesText(t *testing.T) {
	requireRoot(t)
	o := newOverlay(t, t.TempDir(), nil)
	writeFile(t, filepath.Join(o.merged, "mm"), string(make([]byte, 64<<10)))
	cg := newTestCgroup(t)
	c := startChild(t, cg, "mmap", false, filepath.Join(o.merged, "mm"))
	pid := c.cmd.Process.Pid
	cg.freeze(t)
	defer cg.thaw(t)
	var query, text mapsReader
	text.noQuery = true
	var got [2][]sharedMapping
	var took [2]time.Duration
	for i := 0; i < 3; i++ {
		for j, r := range []*mapsReader{&query, &text} {
			start := time.Now()
			ms, err := r.read(pid)
			took[j] = time.Since(start)
			mustNil(t, err)
			got[j] = ms
		}
	}
	if query.noQuery {
		t.Log("PROCMAP_QUERY not supported by this kernel: both used the text format")
	}
	if len(got[0]) != 1 || !reflect.DeepEqual(got[0], got[1]) || got[0][0].path != filepath.Join(o.merged, "mm") {
		t.Errorf("query %+v, text %+v", got[0], got[1])
	}
	t.Logf("query %v, text %v", took[0], took[1])
}

// TestMapsReaderHeldAcrossExec: a maps file held open stays bound to the
// address space it was opened on; after the process execs, read must show
// the new program's mappings, not none and not the old ones.
func TestMapsReaderHeldAcrossExec(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	before, after := filepath.Join(dir, "before"), filepath.Join(dir, "after")
	for _, p := range []string{before, after} {
		writeFile(t, p, string(make([]byte, 4096)))
	}
	cg := newTestCgroup(t)
	c := startChild(t, cg, "mmapexec", false, before, after)
	pid := c.cmd.Process.Pid
	var r mapsReader
	defer r.release()
	r.hold([]int{pid})
	if len(r.held) != 1 {
		t.Fatalf("held %v, want pid %d's maps", r.held, pid)
	}
	paths := func() []string {
		r.enableHeld([]int{pid})
		if !r.useHeld {
			t.Fatal("held maps not used for the same process")
		}
		ms, err := r.read(pid)
		mustNil(t, err)
		var out []string
		for _, m := range ms {
			out = append(out, m.path)
		}
		return out
	}
	if got := paths(); !reflect.DeepEqual(got, []string{before}) {
		t.Fatalf("before exec: %v, want [%s]", got, before)
	}
	if line := c.say(t, "exec"); line != "ready" {
		t.Fatalf("child after exec said %q; stderr: %s", line, c.stderr)
	}
	if got := paths(); !reflect.DeepEqual(got, []string{after}) {
		t.Errorf("after exec: %v, want [%s]", got, after)
	}

	// A process that is not in the held set disables them.
	r.enableHeld([]int{pid, os.Getpid()})
	if r.useHeld {
		t.Error("held maps used although a process is new")
	}
}

// TestMapsReaderHoldsNothingWhenShared: two pids sharing one address space
// (here a process and one of its threads, as after vfork or CLONE_VM) are
// not held: after one of them execs, the other keeps the old one alive.
func TestMapsReaderHoldsNothingWhenShared(t *testing.T) {
	requireRoot(t)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if unix.Gettid() == os.Getpid() {
		t.Skip("the test runs on the main thread")
	}
	var r mapsReader
	defer r.release()
	r.hold([]int{os.Getpid(), unix.Gettid()})
	if r.held != nil {
		t.Errorf("held %v for two pids sharing an address space", r.held)
	}
	r.hold([]int{os.Getpid()})
	if len(r.held) != 1 {
		t.Errorf("held %v for one process", r.held)
	}
}
