package testenv

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// daemon is a background process started in its own session, with its
// stdout and stderr appended to a log file.
type daemon struct {
	cmd     *exec.Cmd
	logPath string
	done    chan struct{}
	waitErr error // valid once done is closed
}

// startDaemon starts bin with args and env (appended to the current
// environment) in a new session, logging to logPath.
func startDaemon(bin string, args, env []string, logPath string) (*daemon, error) {
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open log: %w", err)
	}
	defer logf.Close()
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	d := &daemon{cmd: cmd, logPath: logPath, done: make(chan struct{})}
	go func() {
		d.waitErr = cmd.Wait()
		close(d.done)
	}()
	return d, nil
}

func (d *daemon) pid() int { return d.cmd.Process.Pid }

func (d *daemon) exited() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

// waitReady polls probe until it succeeds, the daemon exits or timeout passes.
func (d *daemon) waitReady(ctx context.Context, timeout time.Duration, probe func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		pctx, pcancel := context.WithTimeout(ctx, 5*time.Second)
		last = probe(pctx)
		pcancel()
		if last == nil {
			return nil
		}
		select {
		case <-d.done:
			return fmt.Errorf("exited before ready (%v); log tail:\n%s", d.waitErr, logTail(d.logPath, 30))
		case <-ctx.Done():
			return fmt.Errorf("not ready after %v: %w; log tail:\n%s", timeout, last, logTail(d.logPath, 30))
		case <-tick.C:
		}
	}
}

// stop sends SIGTERM, waits up to grace, then SIGKILLs and waits for the exit.
func (d *daemon) stop(grace time.Duration) error {
	if d.exited() {
		return nil
	}
	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("SIGTERM pid %d: %w", d.pid(), err)
	}
	select {
	case <-d.done:
		return nil
	case <-time.After(grace):
	}
	if err := d.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("SIGKILL pid %d: %w", d.pid(), err)
	}
	select {
	case <-d.done:
		return nil
	case <-time.After(10 * time.Second):
		return fmt.Errorf("pid %d still alive after SIGKILL", d.pid())
	}
}

// logTail returns the last n lines of the file at path (best effort).
func logTail(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", path, err)
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// ProcessAlive reports whether pid exists and is not a zombie.
func ProcessAlive(pid int) bool {
	if pid <= 0 {
		return false
	}
	if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
		return false
	}
	stat, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return false
	}
	// The state follows the parenthesised command name, which may hold spaces.
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 || i+2 >= len(stat) {
		return true
	}
	return stat[i+2] != 'Z'
}

// waitGone polls until none of pids is alive or timeout passes.
func waitGone(pids []int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		var alive []int
		for _, p := range pids {
			if ProcessAlive(p) {
				alive = append(alive, p)
			}
		}
		if len(alive) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("processes still alive after %v: %v", timeout, alive)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// killPIDs sends SIGKILL to every pid (ignoring ones already gone) and waits
// for them to disappear.
func killPIDs(pids []int) error {
	var errs []error
	for _, p := range pids {
		if err := syscall.Kill(p, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
			errs = append(errs, fmt.Errorf("kill %d: %w", p, err))
		}
	}
	if err := waitGone(pids, 10*time.Second); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// processCmdlines returns the argv of every process readable in /proc.
func processCmdlines() (map[int][]string, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, fmt.Errorf("read /proc: %w", err)
	}
	out := make(map[int][]string)
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		raw, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || len(raw) == 0 {
			continue // gone, or a kernel thread
		}
		out[pid] = strings.Split(strings.TrimRight(string(raw), "\x00"), "\x00")
	}
	return out, nil
}

// ShimPIDs returns the PIDs of containerd-shim-runc-v2 processes started for
// the containerd listening on address (matched on "-address <address>").
func ShimPIDs(address string) ([]int, error) {
	procs, err := processCmdlines()
	if err != nil {
		return nil, err
	}
	var pids []int
	for pid, argv := range procs {
		if filepath.Base(argv[0]) != "containerd-shim-runc-v2" {
			continue
		}
		for i := 1; i+1 < len(argv); i++ {
			if (argv[i] == "-address" || argv[i] == "--address") && argv[i+1] == address {
				pids = append(pids, pid)
				break
			}
		}
	}
	return pids, nil
}

// ProcessesOf lists live processes (this one excepted) whose executable lies
// in dir: the seamless shims, watchdogs and uploaders a test's binaries
// became.
func ProcessesOf(dir string) []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		exe, err := os.Readlink(filepath.Join("/proc", e.Name(), "exe"))
		if err == nil && strings.HasPrefix(exe, dir+"/") && ProcessAlive(pid) {
			pids = append(pids, pid)
		}
	}
	return pids
}
