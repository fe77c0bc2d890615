package uploader

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/seamless-snapshot/seamless/config"
	"github.com/seamless-snapshot/seamless/snapshot"
	"golang.org/x/sys/unix"
)

// envFakeUploader makes a spawned test binary report how it was started
// instead of uploading.
const envFakeUploader = "SEAMLESS_TEST_FAKE_UPLOADER"

// TestMain lets the test binary serve as the uploader executable.
func TestMain(m *testing.M) {
	if os.Getenv(EnvRole) == RoleUploader {
		if os.Getenv(envFakeUploader) != "" {
			os.Exit(fakeUploader(os.Args))
		}
		os.Exit(Main(os.Args))
	}
	os.Exit(m.Run())
}

// startReport is what the fake uploader saw of its start.
type startReport struct {
	Args        []string
	PID, SID    int
	Cwd         string
	StdinIsNull bool
	StateDir    string
	RecordedPID int
	SyncErr     string
}

// fakeUploader writes a startReport (JSON) to stdout and a line to stderr.
func fakeUploader(args []string) int {
	r := startReport{Args: args, PID: os.Getpid()}
	if err := waitForSpawner(); err != nil {
		r.SyncErr = err.Error()
	}
	r.SID, _ = unix.Getsid(0)
	r.Cwd, _ = os.Getwd()
	in, err1 := os.Stdin.Stat()
	null, err2 := os.Stat(os.DevNull)
	r.StdinIsNull = err1 == nil && err2 == nil && os.SameFile(in, null)
	r.StateDir = os.Getenv(config.EnvStateDir)
	if len(args) == 2 {
		store := snapshot.Store{Root: config.FromEnv().SnapshotsDir()}
		if st, err := store.Load(args[1]); err == nil {
			r.RecordedPID = st.UploaderPID
		}
	}
	b, _ := json.Marshal(r)
	fmt.Printf("REPORT %s\n", b)
	fmt.Fprintln(os.Stderr, "fake uploader stderr")
	return 0
}

// spawnFixture is a state dir with one captured snapshot and a log line in
// its upload.log.
func spawnFixture(t *testing.T) (stateDir string, store snapshot.Store) {
	t.Helper()
	stateDir = t.TempDir()
	store = snapshot.Store{Root: config.Dirs{State: stateDir}.SnapshotsDir()}
	newSnapshot(t, store, "s1", "127.0.0.1:1/x:1")
	if err := os.WriteFile(filepath.Join(store.Dir("s1"), snapshot.LogFile), []byte("earlier line\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return stateDir, store
}

func readReport(t *testing.T, logPath string) startReport {
	t.Helper()
	b, err := os.ReadFile(logPath)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(string(b), "earlier line\n") || !strings.Contains(string(b), "fake uploader stderr") {
		t.Errorf("upload.log not appended with stdout and stderr:\n%s", b)
	}
	_, after, ok := strings.Cut(string(b), "REPORT ")
	if !ok {
		t.Fatalf("no report in upload.log:\n%s", b)
	}
	var r startReport
	if err := json.Unmarshal([]byte(strings.SplitN(after, "\n", 2)[0]), &r); err != nil {
		t.Fatal(err)
	}
	return r
}

func TestStartDetaches(t *testing.T) {
	t.Setenv(envFakeUploader, "1")
	stateDir, store := spawnFixture(t)
	exe, _ := os.Executable()
	p, err := Start(exe, stateDir, "s1")
	if err != nil {
		t.Fatal(err)
	}
	if st, _ := store.Load("s1"); st.UploaderPID != p.Pid {
		t.Errorf("state uploader_pid %d, want %d", st.UploaderPID, p.Pid)
	}
	ps, err := p.Wait()
	if err != nil || !ps.Success() {
		t.Fatalf("uploader exit: %v %v", ps, err)
	}
	r := readReport(t, filepath.Join(store.Dir("s1"), snapshot.LogFile))
	want := startReport{Args: []string{exe, "s1"}, PID: p.Pid, SID: p.Pid, Cwd: "/", StdinIsNull: true, StateDir: stateDir, RecordedPID: p.Pid}
	if fmt.Sprint(r) != fmt.Sprint(want) {
		t.Errorf("child saw %+v\nwant        %+v", r, want)
	}
}

func TestSpawnLeavesReapingToCaller(t *testing.T) {
	t.Setenv(envFakeUploader, "1")
	stateDir, store := spawnFixture(t)
	exe, _ := os.Executable()
	pid, err := Spawn(exe, stateDir, "s1")
	if err != nil {
		t.Fatal(err)
	}
	// The caller (the shim) reaps by pid.
	p, err := os.FindProcess(pid)
	if err != nil {
		t.Fatal(err)
	}
	ps, err := p.Wait()
	if err != nil || !ps.Success() {
		t.Fatalf("reap uploader %d: %v %v", pid, ps, err)
	}
	if r := readReport(t, filepath.Join(store.Dir("s1"), snapshot.LogFile)); r.PID != pid || r.RecordedPID != pid || r.SID != pid {
		t.Errorf("report %+v, want pid, sid and recorded pid %d", r, pid)
	}
}

func TestSpawnErrors(t *testing.T) {
	stateDir, _ := spawnFixture(t)
	if _, err := Spawn("/nonexistent/seamless", stateDir, "s1"); err == nil || !strings.Contains(err.Error(), "/nonexistent/seamless") {
		t.Errorf("missing exe: %v", err)
	}
	if _, err := Spawn("/bin/true", stateDir, "nope"); err == nil {
		t.Error("unknown snapshot: no error")
	}
}

func TestUploaderEnv(t *testing.T) {
	env := uploaderEnv([]string{"PATH=/bin", EnvRole + "=shim", config.EnvStateDir + "=/old", envLock + "=9", "HOME=/root"}, "/new")
	want := []string{"PATH=/bin", "HOME=/root", EnvRole + "=" + RoleUploader, config.EnvStateDir + "=/new", envSync + "=3", envLock + "=4"}
	if fmt.Sprint(env) != fmt.Sprint(want) {
		t.Errorf("uploaderEnv = %q, want %q", env, want)
	}
}

func TestMainUsage(t *testing.T) {
	for _, args := range [][]string{nil, {"x"}, {"x", "../etc"}, {"x", "a", "b"}} {
		if code := Main(args); code != 2 {
			t.Errorf("Main(%q) = %d, want 2", args, code)
		}
	}
}

func TestMainFailsClearly(t *testing.T) {
	stateDir, store := spawnFixture(t)
	t.Setenv(config.EnvStateDir, stateDir)
	if code := Main([]string{"uploader", "s1"}); code != 1 {
		t.Fatalf("Main = %d, want 1", code)
	}
	st, _ := store.Load("s1")
	if st.Phase != snapshot.PhaseFailed || st.Error != "open base image: state has no base image source" {
		t.Fatalf("state %s %q", st.Phase, st.Error)
	}
}

// TestMainSIGTERM runs the real Main in a spawned process, blocks it on a
// containerd that never answers, and stops it with SIGTERM.
func TestMainSIGTERM(t *testing.T) {
	stateDir, store := spawnFixture(t)
	sock := filepath.Join(t.TempDir(), "mute.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		if c, err := ln.Accept(); err == nil {
			accepted <- c // held open, never answered
		}
	}()
	st, _ := store.Load("s1")
	st.Base = snapshot.Base{Source: "containerd", Ref: "x:1", ContainerdAddress: sock, ContainerdNamespace: "default"}
	if err := store.Save(st); err != nil {
		t.Fatal(err)
	}

	exe, _ := os.Executable()
	p, err := Start(exe, stateDir, "s1")
	if err != nil {
		t.Fatal(err)
	}
	select {
	case c := <-accepted:
		defer c.Close()
	case <-time.After(20 * time.Second):
		p.Kill()
		p.Wait()
		t.Fatal("uploader never connected to containerd")
	}
	time.Sleep(100 * time.Millisecond) // let the gRPC call start
	if err := p.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	ps, err := p.Wait()
	if err != nil {
		t.Fatal(err)
	}
	if ps.ExitCode() != 1 {
		t.Errorf("exit code %d, want 1", ps.ExitCode())
	}
	st, _ = store.Load("s1")
	if st.Phase != snapshot.PhaseFailed || st.Error != "interrupted" || st.UploaderPID != p.Pid {
		t.Errorf("state %s %q pid %d; want failed/interrupted by %d", st.Phase, st.Error, st.UploaderPID, p.Pid)
	}
	logb, _ := os.ReadFile(filepath.Join(store.Dir("s1"), snapshot.LogFile))
	if !bytes.Contains(logb, []byte("interrupted")) {
		t.Errorf("upload.log lacks the interruption:\n%s", logb)
	}
}
