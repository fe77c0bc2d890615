package watchdog

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seamless-snapshot/seamless/freezer"
)

// exitDrain is how long the watchdog still reads messages after the child
// exited (an arm sent just before death is still in the socket).
const exitDrain = 100 * time.Millisecond

// session is one run of the child.
//
// Its connection is read by one goroutine locked to a SCHED_FIFO thread
// (reader), blocked in read(2) while idle: the end of the connection (the
// child's death) wakes it ahead of any ordinary task, and it thaws the
// armed cgroup itself before anything else. The supervising goroutine
// answers arms, runs the deadline and decides on restarts.
type session struct {
	cmd    *exec.Cmd
	pid    int
	fd     int          // our end of the socket pair (blocking)
	msgs   chan message // closed when the connection ends
	exited chan error   // the child's exit
	hello  bool
	timer  *time.Timer // the armed guard's deadline; nil when not armed
	// armed is the freezer to thaw when the guard fires; set and cleared
	// by the reader in message order, swapped to nil by whoever thaws.
	armed atomic.Pointer[freezer.Freezer]
	// eof is the reader's thaw at the end of the connection, if it did
	// one; read after msgs is closed.
	eof *thawReport
}

// thawReport is one thaw done by the watchdog.
type thawReport struct {
	fr   *freezer.Freezer
	done time.Time // when the thaw returned
	took time.Duration
	err  error
}

// newThawReport thaws fr and reports how it went.
func newThawReport(fr *freezer.Freezer) *thawReport {
	start := time.Now()
	err := fr.Thaw()
	done := time.Now()
	return &thawReport{fr: fr, done: done, took: done.Sub(start), err: err}
}

// ThawLogLayout is the time layout of "done at" in the watchdog's thaw log
// lines (local time).
const ThawLogLayout = "15:04:05.000000"

// sessionEnd is how a session ended.
type sessionEnd struct {
	exitErr error // the child's exit (nil: status 0)
	stopped bool  // the watchdog was asked to stop
}

// start runs the child with one end of a new socket pair (and the ready
// fd, if any) and starts reading its messages.
func (w *Watchdog) start(ready *os.File) (*session, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("watchdog: socket pair: %w", err)
	}
	theirs := os.NewFile(uintptr(fds[1]), "watchdog-child")
	defer theirs.Close()

	cmd := &exec.Cmd{Path: w.child.Path, Args: w.child.Args, Dir: "/"}
	var set []string
	if ready != nil {
		cmd.ExtraFiles = append(cmd.ExtraFiles, ready)
		set = append(set, fmt.Sprintf("%s=%d", w.cfg.ReadyEnv, 2+len(cmd.ExtraFiles)))
	}
	cmd.ExtraFiles = append(cmd.ExtraFiles, theirs)
	set = append(set, fmt.Sprintf("%s=%d", EnvFD, 2+len(cmd.ExtraFiles)))
	cmd.Env = childEnv(os.Environ(), append(w.cfg.ChildEnv, set...), w.cfg.ReadyEnv)
	if err := cmd.Start(); err != nil {
		unix.Close(fds[0])
		return nil, fmt.Errorf("watchdog: start %s: %w", w.child.Path, err)
	}
	s := &session{
		cmd: cmd, pid: cmd.Process.Pid, fd: fds[0],
		msgs: make(chan message), exited: make(chan error, 1),
	}
	go s.read(w)
	go func() { s.exited <- cmd.Wait() }()
	return s, nil
}

// childEnv is env without the variables set assigns (and without drop),
// followed by set.
func childEnv(env, set []string, drop string) []string {
	skip := map[string]bool{drop: drop != ""}
	for _, kv := range set {
		k, _, _ := strings.Cut(kv, "=")
		skip[k] = true
	}
	var out []string
	for _, kv := range env {
		if k, _, _ := strings.Cut(kv, "="); !skip[k] {
			out = append(out, kv)
		}
	}
	return append(out, set...)
}

// read forwards the child's messages until the connection ends, keeping
// s.armed in step with them, and then thaws if armed. It runs on its own
// SCHED_FIFO thread, which ends with it.
func (s *session) read(w *Watchdog) {
	defer close(s.msgs)
	runtime.LockOSThread() // never unlocked: the real-time thread exits with us
	raiseToFIFO()
	buf := make([]byte, maxMessage)
	for {
		n, err := unix.Read(s.fd, buf)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil || n == 0 {
			break
		}
		var m message
		if err := json.Unmarshal(buf[:n], &m); err != nil {
			w.logf("bad message from shim %d: %v", s.pid, err)
			continue
		}
		switch m.Op {
		case "arm":
			m.fr = w.freezerFor(freezer.Kind(m.Kind), m.Dir)
			if m.fr != nil && m.TimeoutNS > 0 {
				s.armed.Store(m.fr)
			}
		case "disarm":
			s.armed.Store(nil)
		}
		s.msgs <- m
	}
	if fr := s.armed.Swap(nil); fr != nil {
		s.eof = newThawReport(fr)
	}
}

// raiseToFIFO makes the calling thread SCHED_FIFO; refusals are ignored
// (the watchdog still works, with ordinary wake-up latency).
func raiseToFIFO() {
	attr := unix.SchedAttr{Policy: unix.SCHED_FIFO, Priority: freezer.DefaultRTPriority, Flags: unix.SCHED_FLAG_RESET_ON_FORK}
	_ = unix.SchedSetAttr(0, &attr, 0)
}

// supervise serves the child's messages and thaws when the guard fires,
// until the child has exited.
func (w *Watchdog) supervise(s *session) sessionEnd {
	defer s.close()
	var (
		end      sessionEnd
		msgs     = s.msgs
		exited   = s.exited
		initDone = w.initDone
		drain    <-chan time.Time
	)
	for {
		select {
		case m, ok := <-msgs:
			if !ok {
				msgs = nil
				w.connectionEnded(s)
				if exited == nil {
					return end
				}
				continue
			}
			w.handle(s, m)
		case <-s.deadline():
			s.timer = nil
			w.release(s, "the pause passed its deadline")
		case err := <-exited:
			exited, end.exitErr = nil, err
			if msgs == nil {
				return end
			}
			drain = time.After(exitDrain)
		case <-drain:
			// The connection outlives the child (a leaked fd): end it;
			// the reader then thaws if armed.
			unix.Shutdown(s.fd, unix.SHUT_RDWR)
			drain = nil
		case <-initDone:
			initDone = nil
			w.logf("container init exited")
		case sig := <-w.sigs:
			end.stopped = true
			w.logf("%v: passing it to shim %d", sig, s.pid)
			s.cmd.Process.Signal(sig)
		}
	}
}

// close ends the connection and waits for the reader.
func (s *session) close() {
	unix.Shutdown(s.fd, unix.SHUT_RDWR)
	for range s.msgs {
	}
	unix.Close(s.fd)
	if s.timer != nil {
		s.timer.Stop()
	}
}

// deadline is the armed guard's timer channel (nil when not armed).
func (s *session) deadline() <-chan time.Time {
	if s.timer == nil {
		return nil
	}
	return s.timer.C
}

// handle serves one message of the child.
func (w *Watchdog) handle(s *session, m message) {
	switch m.Op {
	case "hello":
		s.hello = true
	case "arm":
		w.answerArm(s, m)
	case "disarm":
		if s.timer != nil {
			s.timer.Stop()
			s.timer = nil
		}
	default:
		w.logf("unknown message %q from shim %d", m.Op, s.pid)
	}
}

// answerArm starts the deadline of a valid arm and answers it.
func (w *Watchdog) answerArm(s *session, m message) {
	var err error
	switch {
	case m.fr == nil:
		err = fmt.Errorf("not a freezer of container %s: %s %s", w.cfg.ContainerID, m.Kind, m.Dir)
	case m.TimeoutNS <= 0:
		err = errors.New("no timeout")
	}
	r := reply{OK: err == nil}
	if err != nil {
		r.Error = err.Error()
		w.logf("arm refused: %v", err)
	} else {
		if s.timer != nil {
			s.timer.Stop()
		}
		s.timer = time.NewTimer(time.Duration(m.TimeoutNS))
	}
	b, _ := json.Marshal(r)
	if _, werr := unix.Write(s.fd, b); werr != nil {
		w.logf("answer shim %d: %v", s.pid, werr)
	}
}

// connectionEnded logs the reader's thaw, if it did one.
func (w *Watchdog) connectionEnded(s *session) {
	if s.timer != nil {
		s.timer.Stop()
		s.timer = nil
	}
	if r := s.eof; r != nil {
		w.report("the shim's connection ended", s, r)
	}
}

// release thaws the armed cgroup, if any (the deadline passed).
func (w *Watchdog) release(s *session, why string) {
	fr := s.armed.Swap(nil)
	if fr == nil {
		return
	}
	w.report(why, s, newThawReport(fr))
}

func (w *Watchdog) report(why string, s *session, r *thawReport) {
	if r.err != nil {
		w.logf("%s (shim %d) while armed; thaw of %s failed after %v: %v", why, s.pid, r.fr.Dir(), r.took, r.err)
		return
	}
	w.logf("%s (shim %d) while armed; thawed %s %s in %v, done at %s",
		why, s.pid, r.fr.Kind(), r.fr.Dir(), r.took.Round(time.Microsecond), r.done.Format(ThawLogLayout))
}

// describeExit words a child's exit for the log.
func describeExit(err error) string {
	var ee *exec.ExitError
	if err == nil {
		return "exited cleanly"
	}
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return "was killed by " + unix.SignalName(ws.Signal())
		}
		return "exited with status " + strconv.Itoa(ee.ExitCode())
	}
	return "ended: " + err.Error()
}
