package uploader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seamless-snapshot/seamless/config"
	"github.com/seamless-snapshot/seamless/internal/proc"
	"github.com/seamless-snapshot/seamless/snapshot"
)

// EnvRole selects a binary's role; RoleUploader makes it run Main.
const (
	EnvRole      = "_SEAMLESS_ROLE"
	RoleUploader = "uploader"
)

// envSync names the fd on which a spawned uploader waits until Start has
// recorded its pid, so that the two never overwrite each other's state.
const envSync = "_SEAMLESS_UPLOADER_SYNC"

// envLock names the fd of the snapshot's upload lock, taken by Start and
// handed to the uploader, which holds it until it exits.
const envLock = "_SEAMLESS_UPLOADER_LOCK"

// LockFile, in a snapshot dir, is flock'ed by the snapshot's uploader for
// as long as it runs: at most one uploader per snapshot, and whoever gets
// the lock knows none runs.
const LockFile = "upload.lock"

// ErrRunning means an uploader holds the snapshot's upload lock.
var ErrRunning = errors.New("an uploader is running for this snapshot")

// ErrDone means the snapshot is already pushed: there is nothing to resume.
var ErrDone = errors.New("the snapshot is already pushed")

// Spawn starts the detached uploader for snapshot id (see Start) and returns
// its pid, also recorded in state.json. Spawn does not wait for it: the
// caller reaps it (os.FindProcess(pid) then Wait, e.g. in a goroutine) or
// lets it be reparented when the caller exits.
func Spawn(exe, stateDir, id string) (pid int, err error) {
	p, err := Start(exe, stateDir, id)
	if err != nil {
		return 0, err
	}
	return release(p), nil
}

// Resume starts a new detached uploader for a snapshot whose upload failed
// or was interrupted, and returns its pid. The uploader reuses the spool
// when it is complete and intact, and otherwise rebuilds the layer from the
// capture. retryFor, when positive, replaces the request's retry timeout.
// It fails with ErrDone for a pushed snapshot and ErrRunning while an
// uploader still runs.
func Resume(exe, stateDir, id string, retryFor time.Duration) (pid int, err error) {
	p, err := start(exe, stateDir, id, func(dir string, st *snapshot.State) error {
		switch st.Phase {
		case snapshot.PhaseDone:
			return ErrDone
		case snapshot.PhaseCapturing:
			return fmt.Errorf("snapshot %s was never sealed (its capture did not finish): there is nothing to upload", st.ID)
		}
		if err := checkResumable(dir, st); err != nil {
			return err
		}
		st.Phase, st.Error, st.Progress = snapshot.PhaseCaptured, "", snapshot.Progress{}
		if retryFor > 0 {
			st.Request.RetryTimeout = snapshot.Duration(retryFor)
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	return release(p), nil
}

// checkResumable checks that what an upload needs is still on disk: the
// manifest, and the capture data or the recorded spool.
func checkResumable(dir string, st *snapshot.State) error {
	if _, err := os.Stat(filepath.Join(dir, snapshot.ManifestFile)); err != nil {
		return fmt.Errorf("snapshot %s cannot be resumed: %w", st.ID, err)
	}
	if _, err := os.Stat(filepath.Join(dir, snapshot.DataDir)); err == nil {
		return nil
	}
	if c, err := codecFor(st.Request.Compression); err == nil && st.LayerDigest != "" {
		if fi, err := os.Stat(spoolPath(dir, c)); err == nil && fi.Size() == st.LayerSize {
			return nil
		}
	}
	return fmt.Errorf("snapshot %s cannot be resumed: its capture data (%s) and layer spool are gone", st.ID, filepath.Join(dir, snapshot.DataDir))
}

// release drops our handle on p (the child runs on) and returns its pid.
func release(p *os.Process) int {
	pid := p.Pid
	p.Release() //nolint:errcheck // drops our handle only
	return pid
}

// Start starts exe as the uploader of snapshot id: role and SEAMLESS_STATE_DIR
// in its environment, args [exe, id], a new session, cwd /, stdin /dev/null,
// stdout and stderr appended to the snapshot's upload.log. It takes the
// snapshot's upload lock (ErrRunning if held) and hands it to the child.
// The child's pid and start time are saved in the state before it reads
// the state. The caller owns the returned process (Wait or Release it) and
// must not save the state again: from now on the uploader owns state.json.
func Start(exe, stateDir, id string) (*os.Process, error) {
	return start(exe, stateDir, id, nil)
}

// start is Start, with prepare applied to the state (under the lock)
// before the child starts; an error from prepare starts nothing.
func start(exe, stateDir, id string, prepare func(dir string, st *snapshot.State) error) (*os.Process, error) {
	store := snapshot.Store{Root: config.Dirs{State: stateDir}.SnapshotsDir()}
	if !snapshot.ValidID(id) {
		return nil, fmt.Errorf("spawn uploader: invalid snapshot id %q", id)
	}
	dir := store.Dir(id)
	lock, err := lockDir(dir)
	if errors.Is(err, ErrRunning) {
		lock, err = lockAfterExit(store, id)
	}
	if err != nil {
		return nil, fmt.Errorf("spawn uploader for %s: %w", id, err)
	}
	defer lock.Close() // the child keeps its copy
	st, err := store.Load(id)
	if err != nil {
		return nil, fmt.Errorf("spawn uploader: %w", err)
	}
	if prepare != nil {
		if err := prepare(dir, st); err != nil {
			return nil, err
		}
	}
	files, syncW, closeAll, err := uploaderFiles(dir, lock)
	if err != nil {
		return nil, fmt.Errorf("spawn uploader for %s: %w", id, err)
	}
	defer closeAll()
	defer syncW.Close() // releases the child, whatever happens below
	p, err := os.StartProcess(exe, []string{exe, id}, &os.ProcAttr{
		Dir:   "/",
		Env:   uploaderEnv(os.Environ(), stateDir),
		Files: files,
		Sys:   &syscall.SysProcAttr{Setsid: true},
	})
	if err != nil {
		return nil, fmt.Errorf("spawn uploader for %s: %w", id, err)
	}
	st.UploaderPID = p.Pid
	st.UploaderStart, _ = proc.StartTime(p.Pid) // 0 (pid-only checks) if unreadable
	if err := store.Save(st); err != nil {
		// The child is still waiting on the sync pipe: it has done nothing.
		p.Kill()
		p.Wait()
		return nil, fmt.Errorf("spawn uploader for %s: %w", id, err)
	}
	return p, nil
}

// lockDir takes the upload lock of snapshot dir without waiting.
func lockDir(dir string) (*os.File, error) {
	if _, err := os.Stat(dir); err != nil {
		return nil, fmt.Errorf("snapshot dir: %w", err)
	}
	path := filepath.Join(dir, LockFile)
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open upload lock: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, ErrRunning
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return f, nil
}

// exitGrace bounds the wait for the lock of an uploader that is dying: its
// process reads as dead (a zombie) before all its threads have exited and
// closed its files.
const exitGrace = 3 * time.Second

// lockAfterExit takes the upload lock of snapshot id when the uploader the
// state records is gone but the lock is still held: that uploader is
// still being torn down (e.g. just SIGKILLed). It fails with ErrRunning
// while the recorded uploader runs, or if the lock stays held.
func lockAfterExit(store snapshot.Store, id string) (*os.File, error) {
	deadline := time.Now().Add(exitGrace)
	for {
		if st, err := store.Load(id); err == nil && Running(st) {
			return nil, ErrRunning
		}
		lock, err := lockDir(store.Dir(id))
		if !errors.Is(err, ErrRunning) || time.Now().After(deadline) {
			return lock, err
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// inheritLock returns the release of the upload lock: the one Start handed
// over, or one taken now when the uploader was started otherwise.
func inheritLock(dir string) (unlock func(), err error) {
	v := os.Getenv(envLock)
	if v == "" {
		f, err := lockDir(dir)
		if err != nil {
			return nil, err
		}
		return func() { f.Close() }, nil
	}
	os.Unsetenv(envLock)
	fd, err := strconv.Atoi(v)
	if err != nil || fd < 3 {
		return nil, fmt.Errorf("bad %s=%q", envLock, v)
	}
	unix.CloseOnExec(fd) // credential helpers must not hold it
	f := os.NewFile(uintptr(fd), LockFile)
	return func() { f.Close() }, nil
}

// Running reports whether the uploader recorded in st runs: its pid is
// alive and, when recorded, started at UploaderStart (a recycled pid is
// another process).
func Running(st *snapshot.State) bool {
	return st.UploaderPID > 0 && proc.Alive(st.UploaderPID, st.UploaderStart)
}

// Interrupted reports whether st is stuck: past the capture, not final, and
// its uploader is gone. `seamless status` shows it as PhaseInterrupted.
func Interrupted(st *snapshot.State) bool {
	return !st.Phase.Final() && st.Phase != snapshot.PhaseCapturing && st.UploaderPID != 0 && !Running(st)
}

// uploaderFiles opens the child's fds 0-4: /dev/null, upload.log twice, the
// read end of the sync pipe and the lock. closeAll closes the parent's
// copies (but not lock).
func uploaderFiles(snapDir string, lock *os.File) (files []*os.File, syncW *os.File, closeAll func(), err error) {
	devNull, err := os.Open(os.DevNull)
	if err != nil {
		return nil, nil, nil, err
	}
	logf, err := os.OpenFile(filepath.Join(snapDir, snapshot.LogFile), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		devNull.Close()
		return nil, nil, nil, err
	}
	syncR, syncW, err := os.Pipe()
	if err != nil {
		devNull.Close()
		logf.Close()
		return nil, nil, nil, err
	}
	closeAll = func() {
		devNull.Close()
		logf.Close()
		syncR.Close()
	}
	return []*os.File{devNull, logf, logf, syncR, lock}, syncW, closeAll, nil
}

// uploaderEnv is env with the uploader's role, state dir, sync and lock
// fds set.
func uploaderEnv(env []string, stateDir string) []string {
	out := make([]string, 0, len(env)+4)
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		if k == EnvRole || k == config.EnvStateDir || k == envSync || k == envLock {
			continue
		}
		out = append(out, kv)
	}
	return append(out,
		EnvRole+"="+RoleUploader,
		config.EnvStateDir+"="+stateDir,
		envSync+"=3",
		envLock+"=4",
	)
}

// waitForSpawner blocks until the process that spawned us has recorded our
// pid (it closes the sync pipe), when started by Start.
func waitForSpawner() error {
	v := os.Getenv(envSync)
	if v == "" {
		return nil
	}
	os.Unsetenv(envSync)
	fd, err := strconv.Atoi(v)
	if err != nil || fd < 3 {
		return fmt.Errorf("bad %s=%q", envSync, v)
	}
	f := os.NewFile(uintptr(fd), "uploader-sync")
	if f == nil {
		return fmt.Errorf("bad %s=%q", envSync, v)
	}
	defer f.Close()
	var b [1]byte
	for {
		if _, err := f.Read(b[:]); err != nil {
			return nil // EOF: the spawner is done (or gone)
		}
	}
}
