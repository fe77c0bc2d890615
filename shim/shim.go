package shim

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seamless-snapshot/seamless/config"
	"github.com/seamless-snapshot/seamless/freezer"
	"github.com/seamless-snapshot/seamless/internal/proc"
	"github.com/seamless-snapshot/seamless/snapshot"
	"github.com/seamless-snapshot/seamless/watchdog"
)

// Shim serves one container.
type Shim struct {
	cfg           *Config
	dirs          config.Dirs
	store         snapshot.Store
	exe           string
	log           *log.Logger
	freezeTimeout time.Duration
	busy          sync.Mutex
	pauseDelay    time.Duration
	startedAt     time.Time
	// watchdog thaws the container if this process dies while it is
	// frozen; nil when the shim was started without one.
	watchdog *watchdog.Client
	// maxPause bounds a pause after the freeze; past it the watchdog thaws.
	maxPause time.Duration
}

// New prepares a shim for cfg. exe is the binary re-executed as the uploader.
func New(cfg *Config, exe string, logger *log.Logger) (*Shim, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	dirs := config.Dirs{State: cfg.StateDir, Run: cfg.RunDir}
	return &Shim{
		cfg: cfg, dirs: dirs, store: snapshot.Store{Root: dirs.SnapshotsDir()},
		exe: exe, log: logger, freezeTimeout: 2 * time.Second, startedAt: time.Now(),
		pauseDelay: cfg.testPauseDelay(), maxPause: defaultMaxPause,
	}, nil
}

// defaultMaxPause is how long a capture may keep the container frozen
// before the watchdog thaws it (and the snapshot fails).
const defaultMaxPause = 30 * time.Second

// SetWatchdog makes every freeze depend on the watchdog c: it is armed
// before the freeze and disarmed after the thaw.
func (s *Shim) SetWatchdog(c *watchdog.Client) { s.watchdog = c }

func (s *Shim) logf(format string, args ...any) {
	if s.log != nil {
		s.log.Printf(format, args...)
	}
}

// ErrAlreadyRunning means another shim already serves the container.
var ErrAlreadyRunning = errors.New("a shim already serves this container")

// Listen opens the control socket (0600). It fails with ErrAlreadyRunning
// when a live shim answers on it; a stale socket is replaced.
func (s *Shim) Listen() (net.Listener, error) {
	path := s.dirs.Socket(s.cfg.ContainerID)
	if err := os.MkdirAll(s.dirs.Run, 0o700); err != nil {
		return nil, fmt.Errorf("run dir %s: %w", s.dirs.Run, err)
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, ErrAlreadyRunning
	}
	os.Remove(path)
	old := syscall.Umask(0o177)
	l, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("chmod %s: %w", path, err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	return &peerCheckListener{Listener: l, uid: uint32(os.Geteuid())}, nil
}

// Run serves requests on l until ctx is done or the container's init exits,
// then finishes any capture in progress and removes the socket.
func (s *Shim) Run(ctx context.Context, l net.Listener) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer s.cleanup()

	if err := s.writeInfo(); err != nil {
		return err
	}
	s.ensureAnchor()
	initExited, err := s.watchInit()
	if err != nil {
		return err
	}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGUSR1, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)

	srv := &http.Server{Handler: s.handler(), ReadHeaderTimeout: 10 * time.Second}
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(l) }()
	s.logf("shim for %s listening on %s (init pid %d)", s.cfg.ContainerID, s.dirs.Socket(s.cfg.ContainerID), s.cfg.InitPID)

	for {
		select {
		case sig := <-sigs:
			if sig == syscall.SIGUSR1 {
				go s.signalSnapshot(ctx)
				continue
			}
			s.logf("shim for %s: %v, stopping", s.cfg.ContainerID, sig)
		case <-initExited:
			s.logf("shim for %s: container init exited, stopping", s.cfg.ContainerID)
		case <-ctx.Done():
		case err := <-serveErr:
			return fmt.Errorf("serve: %w", err)
		}
		return s.shutdown(srv)
	}
}

// shutdown stops accepting requests and waits for a capture in progress.
func (s *Shim) shutdown(srv *http.Server) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := srv.Shutdown(ctx)
	s.busy.Lock() // a signal-started capture holds this until sealed
	s.busy.Unlock()
	return err
}

func (s *Shim) signalSnapshot(ctx context.Context) {
	req, err := s.annotationRequest(time.Now())
	if err != nil {
		s.logf("SIGUSR1 snapshot of %s: %v", s.cfg.ContainerID, err)
		return
	}
	if _, err := s.Snapshot(ctx, req); err != nil {
		s.logf("SIGUSR1 snapshot of %s: %v", s.cfg.ContainerID, err)
	}
}

// watchInit returns a channel closed when the container's init exits.
func (s *Shim) watchInit() (<-chan struct{}, error) {
	fd, err := unix.PidfdOpen(s.cfg.InitPID, 0)
	if err != nil {
		return nil, fmt.Errorf("watch init pid %d of %s: %w", s.cfg.InitPID, s.cfg.ContainerID, err)
	}
	if s.cfg.InitStart != 0 {
		if start, err := ProcessStartTime(s.cfg.InitPID); err != nil || start != s.cfg.InitStart {
			unix.Close(fd)
			return nil, fmt.Errorf("init pid %d of %s is gone (start time %d, want %d)", s.cfg.InitPID, s.cfg.ContainerID, start, s.cfg.InitStart)
		}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer unix.Close(fd)
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		for {
			_, err := unix.Poll(fds, -1)
			if err == nil || !errors.Is(err, unix.EINTR) {
				return
			}
		}
	}()
	return done, nil
}

// freezerKind is the freezer the shim's snapshots use.
func (s *Shim) freezerKind() freezer.Kind {
	kind, _, _ := freezer.Choose(s.cfg.CgroupPaths, freezer.Kind(s.cfg.Freezer))
	return kind
}

func (s *Shim) info() Info {
	kind, cg, _ := freezer.Choose(s.cfg.CgroupPaths, freezer.Kind(s.cfg.Freezer))
	upper := ""
	if mnt, err := s.overlayMount(); err == nil {
		upper = mnt.Upperdir
	}
	return Info{
		ContainerID: s.cfg.ContainerID, ShimPID: os.Getpid(), InitPID: s.cfg.InitPID,
		Cgroup: cg, Freezer: string(kind), Upperdir: upper, Bundle: s.cfg.Bundle,
		Engine: s.cfg.Engine, Namespace: s.cfg.ContainerdNamespace, Image: s.cfg.Image,
		Socket: s.dirs.Socket(s.cfg.ContainerID), StartedAt: s.startedAt.UTC().Format(time.RFC3339Nano),
	}
}

func (s *Shim) writeInfo() error {
	b, err := jsonIndent(s.info())
	if err != nil {
		return err
	}
	path := s.dirs.ShimInfo(s.cfg.ContainerID)
	if err := snapshot.WriteFileAtomic(path, b, 0o600); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

func (s *Shim) cleanup() {
	os.Remove(s.dirs.Socket(s.cfg.ContainerID))
	os.Remove(s.dirs.ShimInfo(s.cfg.ContainerID))
}

// ProcessStartTime returns field 22 of /proc/<pid>/stat (start time in clock ticks).
func ProcessStartTime(pid int) (uint64, error) { return proc.StartTime(pid) }

// EnvFreezerAnchor ("1" or "true") makes shims that use the v1 freezer keep
// the anchor cgroup freezer.AnchorName frozen (see freezer.EnsureAnchor):
// v1 freezes and thaws then skip a kernel text patch (~100 µs each).
const EnvFreezerAnchor = "SEAMLESS_FREEZER_ANCHOR"

// ensureAnchor creates the v1 freezer anchor when EnvFreezerAnchor asks for
// it and this shim uses the v1 freezer. Failures are logged only.
func (s *Shim) ensureAnchor() {
	if v := os.Getenv(EnvFreezerAnchor); (v != "1" && v != "true") || s.freezerKind() != freezer.V1 {
		return
	}
	dir, err := freezer.DefaultAnchorDir()
	if err == nil {
		err = freezer.EnsureAnchor(dir)
	}
	if err != nil {
		s.logf("shim for %s: no freezer anchor: %v", s.cfg.ContainerID, err)
	}
}

// pauseGuard is the watchdog armed for one pause. Its zero value (no
// watchdog) guards nothing.
type pauseGuard struct {
	wd       *watchdog.Client
	deadline time.Time
	disarmed bool
}

// armWatchdog arms the watchdog for a freeze of fr. Without a watchdog the
// freeze goes ahead unguarded; with one that cannot be armed it must not.
func (s *Shim) armWatchdog(fr *freezer.Freezer, before time.Duration) (*pauseGuard, error) {
	if s.watchdog == nil {
		return &pauseGuard{}, nil
	}
	timeout := before + s.freezeTimeout + s.maxPause
	deadline := time.Now().Add(timeout)
	if err := s.watchdog.Arm(fr.Kind(), fr.Dir(), timeout); err != nil {
		return nil, fmt.Errorf("no freeze without the thaw watchdog: %w", err)
	}
	return &pauseGuard{wd: s.watchdog, deadline: deadline}, nil
}

// check fails when the pause outlived the watchdog's deadline: the
// watchdog may then have thawed the container during the capture.
func (g *pauseGuard) check() error {
	if g.wd != nil && !time.Now().Before(g.deadline) {
		return errors.New("the pause outlived the watchdog's deadline: the container may have run during the capture, which is discarded")
	}
	return nil
}

// disarmAfter waits d, then disarms (a guard that armed nothing returns
// at once).
func (g *pauseGuard) disarmAfter(d time.Duration) {
	if g.wd == nil || g.disarmed {
		return
	}
	time.Sleep(d)
	g.disarm()
}

// disarm ends the guard (once); it does not wait for the watchdog.
func (g *pauseGuard) disarm() {
	if g.wd == nil || g.disarmed {
		return
	}
	g.disarmed = true
	_ = g.wd.Disarm()
}
