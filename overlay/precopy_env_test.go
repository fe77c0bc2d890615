package overlay

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seamless-snapshot/seamless/freezer"
)

// testCgroup is a v1 freezer cgroup holding a test's child processes.
type testCgroup struct {
	dir string
	fr  *freezer.Freezer
}

// newTestCgroup creates /sys/fs/cgroup/freezer/seamless-overlay-test-<pid>/<test>;
// Cleanup thaws it, kills what is left in it and removes it.
func newTestCgroup(t *testing.T) *testCgroup {
	t.Helper()
	root := "/sys/fs/cgroup/freezer"
	if _, err := os.Stat(filepath.Join(root, "freezer.state")); err != nil {
		if _, err := os.Stat(filepath.Join(root, "tasks")); err != nil {
			t.Skip("no cgroup v1 freezer hierarchy at " + root)
		}
	}
	base := filepath.Join(root, fmt.Sprintf("seamless-overlay-test-%d", os.Getpid()))
	if err := os.Mkdir(base, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		t.Fatalf("create cgroup: %v", err)
	}
	dir := filepath.Join(base, strings.NewReplacer("/", "_", " ", "_").Replace(t.Name()))
	mustNil(t, os.Mkdir(dir, 0o755))
	fr, err := freezer.Open(freezer.V1, dir)
	mustNil(t, err)
	cg := &testCgroup{dir: dir, fr: fr}
	t.Cleanup(func() { cg.destroy(t, base) })
	return cg
}

func (cg *testCgroup) add(t *testing.T, pid int) {
	t.Helper()
	mustNil(t, os.WriteFile(filepath.Join(cg.dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0o644))
}

// pids lists the processes of the cgroup (cgroup.procs).
func (cg *testCgroup) pids(t *testing.T) []int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(cg.dir, "cgroup.procs"))
	mustNil(t, err)
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		pid, err := strconv.Atoi(f)
		mustNil(t, err)
		pids = append(pids, pid)
	}
	return pids
}

func (cg *testCgroup) freeze(t *testing.T) time.Duration {
	t.Helper()
	res, err := cg.fr.Freeze(context.Background(), 10*time.Second)
	if err != nil {
		t.Fatalf("freeze: %v", err)
	}
	return res.Wait
}

func (cg *testCgroup) thaw(t *testing.T) {
	t.Helper()
	if err := cg.fr.Thaw(); err != nil {
		t.Fatalf("thaw: %v", err)
	}
}

func (cg *testCgroup) destroy(t *testing.T, base string) {
	if err := cg.fr.Thaw(); err != nil {
		t.Errorf("thaw %s: %v", cg.dir, err)
	}
	cg.fr.Close()
	for i := 0; i < 100; i++ {
		for _, pid := range cg.pids(t) {
			_ = unix.Kill(pid, unix.SIGKILL)
		}
		if err := os.Remove(cg.dir); err == nil || errors.Is(err, os.ErrNotExist) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	_ = os.Remove(base) // fails while another test still has a cgroup in it
}

// child is a re-executed test binary running a role (see runChild).
type child struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	stdout *bufio.Reader
	stderr *bytes.Buffer
	exited chan struct{}
}

// startChild starts a role, places it in cg before it does anything, and
// waits until it is ready. newNS gives it its own mount namespace.
func startChild(t *testing.T, cg *testCgroup, role string, newNS bool, args ...string) *child {
	t.Helper()
	exe, err := os.Executable()
	mustNil(t, err)
	c := &child{cmd: exec.Command(exe, args...), stderr: &bytes.Buffer{}, exited: make(chan struct{})}
	c.cmd.Env = append(os.Environ(), childRoleEnv+"="+role)
	c.cmd.Stderr = c.stderr
	if newNS {
		c.cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNS}
	}
	stdout, err := c.cmd.StdoutPipe()
	mustNil(t, err)
	c.stdin, err = c.cmd.StdinPipe()
	mustNil(t, err)
	mustNil(t, c.cmd.Start())
	go func() { c.cmd.Wait(); close(c.exited) }()
	t.Cleanup(func() {
		c.cmd.Process.Kill()
		<-c.exited
	})
	cg.add(t, c.cmd.Process.Pid)
	c.stdout = bufio.NewReader(stdout)
	ready := make(chan string, 1)
	go func() {
		line, _ := c.stdout.ReadString('\n')
		ready <- line
	}()
	select {
	case line := <-ready:
		if strings.TrimSpace(line) != "ready" {
			t.Fatalf("child %s: %q, stderr: %s", role, line, c.stderr)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("child %s not ready; stderr: %s", role, c.stderr)
	}
	_, err = io.WriteString(c.stdin, "go\n")
	mustNil(t, err)
	return c
}

// say sends a line to the child and returns its one-line answer.
func (c *child) say(t *testing.T, line string) string {
	t.Helper()
	_, err := io.WriteString(c.stdin, line+"\n")
	mustNil(t, err)
	answer, err := c.stdout.ReadString('\n')
	if err != nil {
		t.Fatalf("child: %v; stderr: %s", err, c.stderr)
	}
	return strings.TrimSpace(answer)
}

// alive fails the test if the child ended (a writer must never stop).
func (c *child) alive(t *testing.T) {
	t.Helper()
	select {
	case <-c.exited:
		t.Fatalf("child exited: %v; stderr: %s", c.cmd.ProcessState, c.stderr)
	default:
	}
}

// runOpsChild runs ops in a separate process and waits for it.
func runOpsChild(t *testing.T, ops ...string) {
	t.Helper()
	exe, err := os.Executable()
	mustNil(t, err)
	cmd := exec.Command(exe, ops...)
	cmd.Env = append(os.Environ(), childRoleEnv+"=ops")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("ops child: %v: %s", err, out)
	}
}

// captureDiffs compares a capture with a reference: same header, same
// entries (data files compared by content, not by name).
func captureDiffs(t *testing.T, got *Manifest, gotSnap string, want *Manifest, wantSnap string) []string {
	t.Helper()
	var diffs []string
	if got.Version != want.Version || got.Upper != want.Upper || got.UserXattr != want.UserXattr {
		diffs = append(diffs, fmt.Sprintf("header %d %q %v, want %d %q %v", got.Version, got.Upper, got.UserXattr, want.Version, want.Upper, want.UserXattr))
	}
	gi, wi := manifestIndex(got), manifestIndex(want)
	for p, w := range wi {
		g, ok := gi[p]
		if !ok {
			diffs = append(diffs, "missing "+p)
			continue
		}
		if d := entryDiff(t, &g, gotSnap, &w, wantSnap); d != "" {
			diffs = append(diffs, p+": "+d)
		}
	}
	for p := range gi {
		if _, ok := wi[p]; !ok {
			diffs = append(diffs, "extra "+p)
		}
	}
	for i := 1; i < len(got.Entries); i++ {
		if got.Entries[i-1].Path >= got.Entries[i].Path {
			diffs = append(diffs, "entries not sorted at "+got.Entries[i].Path)
		}
	}
	checkHardlinkData(t, got, &diffs)
	return diffs
}

// entryDiff describes how g differs from w ("" when equal).
func entryDiff(t *testing.T, g *Entry, gotSnap string, w *Entry, wantSnap string) string {
	gd, wd := dataSum(t, gotSnap, g), dataSum(t, wantSnap, w)
	gc, wc := *g, *w
	gc.Data, wc.Data = "", ""
	switch {
	case !reflect.DeepEqual(normXattrs(gc), normXattrs(wc)):
		return fmt.Sprintf("metadata %+v, want %+v", gc, wc)
	case gd != wd:
		return fmt.Sprintf("content %s, want %s", gd, wd)
	}
	return ""
}

func normXattrs(e Entry) Entry {
	if len(e.Xattrs) == 0 {
		e.Xattrs = nil
	}
	return e
}

// dataSum hashes an entry's data file ("" for none); a missing or short
// data file is reported in the sum.
func dataSum(t *testing.T, snap string, e *Entry) string {
	if e.Data == "" {
		return ""
	}
	b, err := os.ReadFile(filepath.Join(snap, "data", e.Data))
	if err != nil {
		return "unreadable: " + err.Error()
	}
	if int64(len(b)) != e.Size {
		return fmt.Sprintf("%d bytes for size %d", len(b), e.Size)
	}
	return sha(b)
}

// checkHardlinkData requires one data file per inode, as Capture makes.
func checkHardlinkData(t *testing.T, m *Manifest, diffs *[]string) {
	byIno := map[uint64]string{}
	for _, e := range m.Entries {
		if e.Type != TypeFile || e.Data == "" {
			continue
		}
		if d, ok := byIno[e.Inode]; ok && d != e.Data {
			*diffs = append(*diffs, fmt.Sprintf("%s: inode %d has data files %s and %s", e.Path, e.Inode, d, e.Data))
		}
		byIno[e.Inode] = e.Data
	}
}

// readCounter parses an invariant file of a capture.
func readCounter(t *testing.T, snap string, m *Manifest, p string) int {
	t.Helper()
	e, ok := manifestIndex(m)[p]
	if !ok || e.Data == "" {
		t.Fatalf("%s missing from the capture: %+v", p, e)
	}
	b, err := os.ReadFile(filepath.Join(snap, "data", e.Data))
	mustNil(t, err)
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatalf("%s: %q: %v", p, b, err)
	}
	return n
}

// checkInvariant requires B <= A <= B+1 in a capture.
func checkInvariant(t *testing.T, snap string, m *Manifest) (a, b int) {
	t.Helper()
	a, b = readCounter(t, snap, m, invA), readCounter(t, snap, m, invB)
	if b > a || a > b+1 {
		t.Errorf("invariant broken in the capture: A=%d B=%d", a, b)
	}
	return a, b
}

// snapDirs creates two fresh snapshot dirs for one round and removes them
// when the test ends.
func snapDirs(t *testing.T, base string, i int) (string, string) {
	t.Helper()
	a, b := filepath.Join(base, fmt.Sprintf("pre-%d", i)), filepath.Join(base, fmt.Sprintf("ref-%d", i))
	mustNil(t, os.MkdirAll(a, 0o700))
	mustNil(t, os.MkdirAll(b, 0o700))
	return a, b
}

// writerOverlay builds the overlay the writer child works on.
func writerOverlay(t *testing.T) *testOverlay {
	t.Helper()
	o := newOverlay(t, t.TempDir(), func(lower string) {
		for i := 0; i < copyUpFiles; i++ {
			writeFile(t, filepath.Join(lower, fmt.Sprintf("cu/f%03d", i)), string(pseudoRandom(1000+i)))
		}
		for i := 0; i < deleteFiles; i++ {
			writeFile(t, filepath.Join(lower, fmt.Sprintf("del/f%03d", i)), "delete me")
		}
		for i := 0; i < opaqueDirs; i++ {
			for _, f := range []string{"a", "b", "sub/c"} {
				writeFile(t, filepath.Join(lower, fmt.Sprintf("opq/d%02d/%s", i, f)), f)
			}
		}
		writeFile(t, filepath.Join(lower, "keep"), "keep")
	})
	m := func(p string) string { return filepath.Join(o.merged, p) }
	writeFile(t, m(invA), fmt.Sprintf(counterFormat, 0))
	writeFile(t, m(invB), fmt.Sprintf(counterFormat, 0))
	for i := 0; i < 50; i++ {
		writeFile(t, m(fmt.Sprintf("rot/f%02d", i)), "initial")
	}
	for _, d := range []string{"tmp", "dd", "hl"} {
		mustNil(t, os.MkdirAll(m(d), 0o755))
	}
	writeFile(t, m("hl/a"), fmt.Sprintf(counterFormat, 0))
	return o
}
