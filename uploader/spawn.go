package uploader

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/seamless-snapshot/seamless/config"
	"github.com/seamless-snapshot/seamless/snapshot"
)

// EnvRole selects a binary's role; RoleUploader makes it run Main.
const (
	EnvRole      = "_SEAMLESS_ROLE"
	RoleUploader = "uploader"
)

// envSync names the fd on which a spawned uploader waits until Spawn has
// recorded its pid, so that the two never overwrite each other's state.
const envSync = "_SEAMLESS_UPLOADER_SYNC"

// Spawn starts the detached uploader for snapshot id (see Start) and returns
// its pid, also recorded in state.json. Spawn does not wait for it: the
// caller reaps it (os.FindProcess(pid) then Wait, e.g. in a goroutine) or
// lets it be reparented when the caller exits.
func Spawn(exe, stateDir, id string) (pid int, err error) {
	p, err := Start(exe, stateDir, id)
	if err != nil {
		return 0, err
	}
	pid = p.Pid
	p.Release() //nolint:errcheck // drops our handle only; the child runs on
	return pid, nil
}

// Start starts exe as the uploader of snapshot id: role and SEAMLESS_STATE_DIR
// in its environment, args [exe, id], a new session, cwd /, stdin /dev/null,
// stdout and stderr appended to the snapshot's upload.log. Its pid is saved
// as the state's UploaderPID before it reads the state. The caller owns the
// returned process (Wait or Release it) and must not save the state again:
// from now on the uploader owns state.json.
func Start(exe, stateDir, id string) (*os.Process, error) {
	store := snapshot.Store{Root: config.Dirs{State: stateDir}.SnapshotsDir()}
	st, err := store.Load(id)
	if err != nil {
		return nil, fmt.Errorf("spawn uploader: %w", err)
	}
	files, syncW, closeAll, err := uploaderFiles(store.Dir(id))
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
	if err := store.Save(st); err != nil {
		// The child is still waiting on the sync pipe: it has done nothing.
		p.Kill()
		p.Wait()
		return nil, fmt.Errorf("spawn uploader for %s: %w", id, err)
	}
	return p, nil
}

// uploaderFiles opens the child's fds 0-3: /dev/null, upload.log twice and
// the read end of the sync pipe. closeAll closes the parent's copies.
func uploaderFiles(snapDir string) (files []*os.File, syncW *os.File, closeAll func(), err error) {
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
	return []*os.File{devNull, logf, logf, syncR}, syncW, closeAll, nil
}

// uploaderEnv is env with the uploader's role, state dir and sync fd set.
func uploaderEnv(env []string, stateDir string) []string {
	out := make([]string, 0, len(env)+3)
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		if k == EnvRole || k == config.EnvStateDir || k == envSync {
			continue
		}
		out = append(out, kv)
	}
	return append(out,
		EnvRole+"="+RoleUploader,
		config.EnvStateDir+"="+stateDir,
		envSync+"=3",
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
