// Package proc reads what seamless needs to know about a process from
// /proc: whether it runs, and when it started (to tell it from a later
// process that got the same pid); NiceThreads lowers this process's CPU
// priority.
package proc

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Stat is the part of /proc/PID/stat seamless uses.
type Stat struct {
	// State is the one-letter process state (R, S, D, Z, X, ...).
	State byte
	// StartTime is field 22: clock ticks after boot at which the process started.
	StartTime uint64
}

// ReadStat reads /proc/PID/stat.
func ReadStat(pid int) (Stat, error) {
	if pid <= 0 {
		return Stat{}, fmt.Errorf("read stat: invalid pid %d", pid)
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return Stat{}, fmt.Errorf("read stat of pid %d: %w", pid, err)
	}
	st, err := ParseStat(string(b))
	if err != nil {
		return Stat{}, fmt.Errorf("pid %d: %w", pid, err)
	}
	return st, nil
}

// ParseStat parses a /proc/PID/stat line. The command name (field 2) is
// in parentheses and may hold spaces and parentheses: fields are counted
// from the last ')'.
func ParseStat(line string) (Stat, error) {
	i := strings.LastIndexByte(line, ')')
	if i < 0 {
		return Stat{}, errors.New("malformed stat: no ')'")
	}
	f := strings.Fields(line[i+1:])
	// f[0] is field 3 (state); field 22 is f[19].
	if len(f) < 20 || len(f[0]) != 1 {
		return Stat{}, errors.New("malformed stat: too few fields")
	}
	start, err := strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return Stat{}, fmt.Errorf("malformed stat: start time %q: %w", f[19], err)
	}
	return Stat{State: f[0][0], StartTime: start}, nil
}

// StartTime returns the start time of pid (field 22 of its stat).
func StartTime(pid int) (uint64, error) {
	st, err := ReadStat(pid)
	return st.StartTime, err
}

// Alive reports whether pid runs (exists and is not a zombie) and, when
// start is not 0, is the process that started at start.
func Alive(pid int, start uint64) bool {
	st, err := ReadStat(pid)
	if err != nil || st.State == 'Z' || st.State == 'X' {
		return false
	}
	return start == 0 || st.StartTime == start
}

// EnvNice sets the nice value of the watchdogs, shims and uploaders
// (default DefaultNice): their pre-copy, catch-up and compression then yield
// the CPU to the container's own processes. The pause itself runs
// SCHED_FIFO whatever this says.
const EnvNice = "SEAMLESS_NICE"

// DefaultNice is the nice value when EnvNice is not set.
const DefaultNice = 10

// NiceFromEnv returns the nice value EnvNice asks for, or DefaultNice (with
// an error saying why when the setting is not a nice value).
func NiceFromEnv() (int, error) {
	v := os.Getenv(EnvNice)
	if v == "" {
		return DefaultNice, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < -20 || n > 19 {
		return DefaultNice, fmt.Errorf("%s=%q: want a nice value from -20 to 19; using %d", EnvNice, v, DefaultNice)
	}
	return n, nil
}

// NiceThreads sets the nice value of every thread of this process. On Linux
// nice is per thread (setpriority on the process id reaches only the main
// thread); threads created later inherit it from the thread that creates
// them, so calling this early in a Go program covers the runtime's threads.
func NiceThreads(nice int) error {
	entries, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return fmt.Errorf("list threads: %w", err)
	}
	var errs []error
	for _, e := range entries {
		tid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if err := unix.Setpriority(unix.PRIO_PROCESS, tid, nice); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("nice thread %d: %w", tid, err))
		}
	}
	return errors.Join(errs...)
}
