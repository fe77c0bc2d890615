// Package watchdog keeps the thaw guarantee of a container's snapshots: a
// small process outside the container, the parent of the container's shim,
// thaws the container's cgroup when the shim dies (SIGKILL included) or
// stays frozen past a deadline, and starts a new shim so that the next
// snapshot works.
//
// The shim talks to its watchdog over a SOCK_SEQPACKET socket pair: "arm"
// (answered) before each freeze, "disarm" after the thaw. The end of the
// socket (the shim's death closes it) while armed, or the deadline, makes
// the watchdog thaw at once through freezer files it opened at start. The
// watchdog exits when the shim exits cleanly or, after the container's init
// has exited, when the shim does. Idle, it blocks in the kernel.
package watchdog

import (
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seamless-snapshot/seamless/freezer"
	"github.com/seamless-snapshot/seamless/internal/proc"
)

// Role is the value of the role variable (_SEAMLESS_ROLE) that makes a
// seamless binary run as a watchdog.
const Role = "watchdog"

// Restart budget: at most maxRestarts within restartWindow.
const (
	defaultMaxRestarts = 5
	restartWindow      = 10 * time.Minute
	restartDelay       = 50 * time.Millisecond
)

// Config is what a watchdog knows of its container and child.
type Config struct {
	ContainerID string `json:"container_id"`
	InitPID     int    `json:"init_pid"`
	// InitStart is the init's start time (field 22 of /proc/pid/stat), to
	// tell it from a later process that got its pid.
	InitStart uint64 `json:"init_start,omitempty"`
	// CgroupPaths are runc's cgroup_paths; the watchdog guards the v1
	// "freezer" and the unified ("") directories found there.
	CgroupPaths map[string]string `json:"cgroup_paths"`
	// LogPath is a file the watchdog appends to; empty: standard error.
	LogPath string `json:"log_path,omitempty"`
	// ReadyEnv names the variable holding the watchdog's ready fd: the
	// watchdog writes "error: ..." there if it cannot start, and hands the
	// fd to the first child under the same name.
	ReadyEnv string `json:"ready_env,omitempty"`
	// ChildEnv is set in the child's environment (e.g. its role).
	ChildEnv []string `json:"child_env,omitempty"`
	// MaxRestarts bounds restarts per 10 minutes (0: 5).
	MaxRestarts int `json:"max_restarts,omitempty"`
}

// Encode returns the config as the watchdog's command-line argument.
func (c *Config) Encode() (string, error) {
	b, err := json.Marshal(c)
	if err != nil {
		return "", fmt.Errorf("encode watchdog config: %w", err)
	}
	return string(b), nil
}

// Child is the command the watchdog runs and restarts.
type Child struct {
	Path string
	// Args includes argv[0].
	Args []string
}

// Args builds the watchdog's command line after argv[0]: the config, then
// the child's path and argv.
func Args(cfg *Config, child Child) ([]string, error) {
	enc, err := cfg.Encode()
	if err != nil {
		return nil, err
	}
	return append([]string{enc, child.Path}, child.Args...), nil
}

// Main is the watchdog role's entry point: args are [argv0, config JSON,
// child path, child argv...].
func Main(args []string) int {
	if len(args) < 4 {
		fmt.Fprintln(os.Stderr, "watchdog: usage: CONFIG CHILD-PATH CHILD-ARGV0 [ARG...]")
		return 2
	}
	var cfg Config
	if err := json.Unmarshal([]byte(args[1]), &cfg); err != nil {
		fmt.Fprintf(os.Stderr, "watchdog: decode config: %v\n", err)
		return 2
	}
	ready := inheritedFile(cfg.ReadyEnv)
	logger, closeLog := openLog(cfg.LogPath)
	defer closeLog()
	// Its threads wake around every pause; the one that thaws runs
	// SCHED_FIFO whatever the nice value.
	if nice, err := proc.NiceFromEnv(); err != nil {
		logger.Printf("watchdog for %s: %v", cfg.ContainerID, err)
	} else if err := proc.NiceThreads(nice); err != nil {
		logger.Printf("watchdog for %s: %v", cfg.ContainerID, err)
	}
	w, err := New(&cfg, Child{Path: args[2], Args: args[3:]}, logger)
	if err != nil {
		logger.Printf("watchdog for %s: %v", cfg.ContainerID, err)
		if ready != nil {
			fmt.Fprintf(ready, "error: %v\n", err)
			ready.Close()
		}
		return 1
	}
	defer w.Close()
	if err := w.Run(ready); err != nil {
		logger.Printf("watchdog for %s: %v", cfg.ContainerID, err)
		return 1
	}
	return 0
}

// Watchdog supervises one container's shim.
type Watchdog struct {
	cfg      Config
	child    Child
	log      *log.Logger
	freezers []*freezer.Freezer
	initDone <-chan struct{}
	sigs     chan os.Signal
	restarts []time.Time
}

// New opens the container's freezers and starts watching its init. It
// refuses to run inside the cgroup it guards (it would be frozen with it).
func New(cfg *Config, child Child, logger *log.Logger) (*Watchdog, error) {
	if cfg.InitPID <= 0 || len(cfg.CgroupPaths) == 0 || child.Path == "" || len(child.Args) == 0 {
		return nil, errors.New("watchdog config needs an init pid, cgroup paths and a child")
	}
	if err := checkOutside(cfg.CgroupPaths); err != nil {
		return nil, err
	}
	w := &Watchdog{cfg: *cfg, child: child, log: logger}
	if w.cfg.MaxRestarts == 0 {
		w.cfg.MaxRestarts = defaultMaxRestarts
	}
	var errs []error
	for key, kind := range map[string]freezer.Kind{"freezer": freezer.V1, "": freezer.V2} {
		if dir := cfg.CgroupPaths[key]; dir != "" {
			f, err := freezer.Open(kind, dir)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			w.freezers = append(w.freezers, f)
		}
	}
	if len(w.freezers) == 0 {
		errs = append(errs, errors.New("no v1 freezer or unified cgroup path"))
		return nil, fmt.Errorf("watchdog: nothing to guard: %w", errors.Join(errs...))
	}
	for _, err := range errs {
		w.logf("not guarded (the shim cannot use it either): %v", err)
	}
	done, err := watchInit(cfg.InitPID, cfg.InitStart)
	if err != nil {
		w.Close()
		return nil, err
	}
	w.initDone = done
	w.sigs = make(chan os.Signal, 2)
	signal.Notify(w.sigs, syscall.SIGTERM, syscall.SIGINT)
	signal.Ignore(syscall.SIGHUP)
	return w, nil
}

// Close releases the freezer files and signal handlers.
func (w *Watchdog) Close() {
	if w.sigs != nil {
		signal.Stop(w.sigs)
	}
	for _, f := range w.freezers {
		f.Close()
	}
}

func (w *Watchdog) logf(format string, args ...any) {
	w.log.Printf("watchdog for %s: "+format, append([]any{w.cfg.ContainerID}, args...)...)
}

// freezerFor returns the pre-opened freezer kind/dir, if the watchdog guards it.
func (w *Watchdog) freezerFor(kind freezer.Kind, dir string) *freezer.Freezer {
	for _, f := range w.freezers {
		if f.Kind() == kind && f.Dir() == dir {
			return f
		}
	}
	return nil
}

// Run starts the child and supervises it, starting it again when it dies
// while the container runs, until it exits for good. ready, if not nil, is
// handed to the first child.
func (w *Watchdog) Run(ready *os.File) error {
	for {
		s, err := w.start(ready)
		if ready != nil {
			if err != nil {
				fmt.Fprintf(ready, "error: %v\n", err)
			}
			ready.Close()
			ready = nil
		}
		if err != nil {
			return err
		}
		end := w.supervise(s)
		again, why := w.restartable(s, end)
		if !again {
			w.logf("shim %d %s; %s, exiting", s.pid, describeExit(end.exitErr), why)
			return nil
		}
		w.logf("shim %d %s while the container runs; starting a new shim", s.pid, describeExit(end.exitErr))
		time.Sleep(restartDelay)
	}
}

// restartable decides whether a child that ended should be started again.
func (w *Watchdog) restartable(s *session, end sessionEnd) (bool, string) {
	switch {
	case end.stopped:
		return false, "asked to stop"
	case !proc.Alive(w.cfg.InitPID, w.cfg.InitStart):
		return false, "container init exited"
	case end.exitErr == nil:
		return false, "clean exit"
	case !s.hello:
		return false, "it never served"
	}
	now := time.Now()
	recent := w.restarts[:0]
	for _, t := range w.restarts {
		if now.Sub(t) < restartWindow {
			recent = append(recent, t)
		}
	}
	w.restarts = recent
	if len(w.restarts) >= w.cfg.MaxRestarts {
		return false, fmt.Sprintf("%d restarts within %v already", len(w.restarts), restartWindow)
	}
	w.restarts = append(w.restarts, now)
	return true, ""
}

// checkOutside fails if this process is in one of the cgroups it guards.
func checkOutside(guarded map[string]string) error {
	own, err := freezer.PathsForPID(os.Getpid())
	if err != nil {
		return nil // cannot tell; the kernel has no such cgroup for us
	}
	for key, dir := range guarded {
		if dir != "" && own[key] == dir {
			return fmt.Errorf("watchdog: refusing to run inside the cgroup it guards (%s)", dir)
		}
	}
	return nil
}

// watchInit returns a channel closed when the container's init exits.
func watchInit(pid int, start uint64) (<-chan struct{}, error) {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, fmt.Errorf("watchdog: watch init pid %d: %w", pid, err)
	}
	if !proc.Alive(pid, start) {
		unix.Close(fd)
		return nil, fmt.Errorf("watchdog: init pid %d is gone", pid)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer unix.Close(fd)
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		for {
			if _, err := unix.Poll(fds, -1); !errors.Is(err, unix.EINTR) {
				return
			}
		}
	}()
	return done, nil
}

// inheritedFile returns the file whose fd the variable env names, and
// removes the variable.
func inheritedFile(env string) *os.File {
	if env == "" {
		return nil
	}
	fd, err := strconv.Atoi(os.Getenv(env))
	os.Unsetenv(env)
	if err != nil || fd < 3 {
		return nil
	}
	unix.CloseOnExec(fd)
	return os.NewFile(uintptr(fd), "ready")
}

// openLog appends to path; without one (or on failure) it logs to stderr.
func openLog(path string) (*log.Logger, func()) {
	flags := log.LstdFlags | log.Lmicroseconds
	if path == "" {
		return log.New(os.Stderr, "", flags), func() {}
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return log.New(os.Stderr, "", flags), func() {}
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return log.New(os.Stderr, "", flags), func() {}
	}
	return log.New(f, "", flags), func() { f.Close() }
}
