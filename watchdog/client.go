package watchdog

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seamless-snapshot/seamless/freezer"
)

// EnvFD names the fd on which a supervised child talks to its watchdog.
const EnvFD = "_SEAMLESS_WATCHDOG_FD"

// replyTimeout bounds the wait for the watchdog's answer to an arm.
const replyTimeout = 2 * time.Second

// message is one message of the child to its watchdog, one per SEQPACKET
// datagram. Only arm is answered (with a reply).
type message struct {
	// Op is "hello" (the child serves), "arm" or "disarm".
	Op string `json:"op"`
	// Kind and Dir name the freezer that is about to be frozen (arm).
	Kind string `json:"kind,omitempty"`
	Dir  string `json:"dir,omitempty"`
	// TimeoutNS is how long the cgroup may stay frozen (arm).
	TimeoutNS int64 `json:"timeout_ns,omitempty"`
	// PID is the child's pid (hello).
	PID int `json:"pid,omitempty"`
	// fr is the watchdog's freezer for Kind and Dir (nil: not guarded).
	fr *freezer.Freezer
}

// reply answers an arm.
type reply struct {
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
}

// maxMessage bounds a message (a cgroup path and a few fields).
const maxMessage = 64 << 10

// Client is the supervised child's end of the watchdog connection. It is
// safe for concurrent use; calls are serialized.
type Client struct {
	mu   sync.Mutex
	conn *os.File
}

// ClientFromEnv returns the client of the watchdog that started this
// process, or nil when none did (EnvFD unset). The fd is made close-on-exec:
// no process this one starts may hold it, since its closing tells the
// watchdog that this process died.
func ClientFromEnv() (*Client, error) {
	v := os.Getenv(EnvFD)
	if v == "" {
		return nil, nil
	}
	os.Unsetenv(EnvFD)
	fd, err := strconv.Atoi(v)
	if err != nil || fd < 3 {
		return nil, fmt.Errorf("watchdog connection: bad %s=%q", EnvFD, v)
	}
	return NewClient(fd)
}

// NewClient wraps fd, one end of a SOCK_SEQPACKET socket pair whose other
// end a watchdog serves.
func NewClient(fd int) (*Client, error) {
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil || typ != unix.SOCK_SEQPACKET {
		return nil, fmt.Errorf("watchdog connection: fd %d is not a seqpacket socket (%v)", fd, err)
	}
	unix.CloseOnExec(fd)
	fd = moveHigh(fd)
	if err := unix.SetNonblock(fd, true); err != nil {
		return nil, fmt.Errorf("watchdog connection: %w", err)
	}
	return &Client{conn: os.NewFile(uintptr(fd), "watchdog")}, nil
}

// highFD is where the connection moves to, if the fd limit allows.
const highFD = 1000

// moveHigh moves fd to a number above those the process will open, and
// returns the new number (fd itself if it cannot). A dying process's files
// are released in the reverse order of their numbers (the exit path queues
// one task work per file and runs them last-in first-out): the highest goes
// first, so the watchdog learns of the death before slow releases, such as
// a fanotify group's (measured in the end-to-end test: thawed 14–24 ms
// after the SIGKILL with the connection on fd 4, 1.6–2.9 ms from fd 1000).
func moveHigh(fd int) int {
	var rl unix.Rlimit
	if unix.Getrlimit(unix.RLIMIT_NOFILE, &rl) != nil || rl.Cur <= highFD || fd >= highFD {
		return fd
	}
	hi, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, highFD)
	if err != nil {
		return fd
	}
	unix.Close(fd)
	return hi
}

// Hello tells the watchdog that the child serves: from now on, its death
// while the container runs makes the watchdog start it again.
func (c *Client) Hello() error {
	return c.send(message{Op: "hello", PID: os.Getpid()})
}

// Arm asks the watchdog to thaw the cgroup if this process dies or timeout
// passes before Disarm; the freeze may start once it returns nil. kind and
// dir must be a freezer of the container the watchdog guards.
func (c *Client) Arm(kind freezer.Kind, dir string, timeout time.Duration) error {
	if timeout <= 0 {
		return errors.New("arm watchdog: timeout must be positive")
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.sendLocked(message{Op: "arm", Kind: string(kind), Dir: dir, TimeoutNS: int64(timeout)}); err != nil {
		return err
	}
	var r reply
	if err := c.receiveLocked(&r); err != nil {
		return err
	}
	if !r.OK {
		return fmt.Errorf("watchdog refused to arm: %s", r.Error)
	}
	return nil
}

// Disarm ends the guard of the last Arm. It does not wait for the watchdog.
func (c *Client) Disarm() error {
	return c.send(message{Op: "disarm"})
}

// Close closes the connection; the watchdog then treats the child as gone.
func (c *Client) Close() error {
	return c.conn.Close()
}

func (c *Client) send(m message) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.sendLocked(m)
}

func (c *Client) sendLocked(m message) error {
	b, err := json.Marshal(m)
	if err != nil {
		return fmt.Errorf("watchdog %s: %w", m.Op, err)
	}
	if _, err := c.conn.Write(b); err != nil {
		return fmt.Errorf("watchdog %s: %w", m.Op, err)
	}
	return nil
}

func (c *Client) receiveLocked(r *reply) error {
	if err := c.conn.SetReadDeadline(time.Now().Add(replyTimeout)); err != nil {
		return fmt.Errorf("watchdog reply: %w", err)
	}
	buf := make([]byte, maxMessage)
	n, err := c.conn.Read(buf)
	if err != nil {
		return fmt.Errorf("watchdog reply: %w", err)
	}
	if err := json.Unmarshal(buf[:n], r); err != nil {
		return fmt.Errorf("watchdog reply: %w", err)
	}
	return nil
}
