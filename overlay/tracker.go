package overlay

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// maxOutsideCache bounds the cache of directory handles found outside the
// upper dir (the filesystem mark sees the whole host filesystem).
const maxOutsideCache = 1 << 16

// readerTick (ms) bounds how long the reader sleeps without checking whether
// it was stopped (it is normally woken at once through its eventfd).
const readerTick = 100

// tracker collects the upper dir's dirty names from a fanotify filesystem
// mark. A goroutine keeps the kernel queue drained while the container runs;
// after the freeze drainAndTake reads what is left and returns the complete
// set (events are queued synchronously by the syscalls that cause them).
// Each read(2) and the recording of its events happen under mu, so no
// batch is ever read but not yet recorded when someone else holds mu.
type tracker struct {
	fd        int    // fanotify group
	wake      int    // eventfd that stops the reader goroutine
	upperFd   int    // the upper dir (not owned): mount fd for open_by_handle_at
	upperDev  uint64 // device of the upper dir
	upperPath string // real path of the upper dir, as /proc/self/fd shows it
	self      int32  // our pid: our own staging writes are not dirt
	done      chan struct{}
	buf       []byte

	// mu is held while events are read and recorded, so whoever holds it
	// sees every event read so far in dirty.
	mu       sync.Mutex
	dirty    map[string]map[string]uint64 // dir handle -> name -> OR of event masks
	names    int                          // distinct (handle, name) pairs in dirty
	inside   map[string]dirLocation       // dir handles found under the upper dir, where they were
	outside  map[string]bool              // dir handles found elsewhere
	overflow bool                         // the kernel dropped events
	err      error                        // the tracker failed: its set is incomplete
	events   int                          // events read
	stopped  bool
}

// dirLocation is where a directory handle was found in the upper dir. It may
// be stale (the directory moved since): users verify it by inode.
type dirLocation struct {
	rel string // path relative to the upper dir ("" for its root)
	ino uint64 // inode of the directory
}

// dirtyDir is one directory of the dirty set.
type dirtyDir struct {
	handle string
	loc    dirLocation       // last known location (verify before use)
	names  map[string]uint64 // dirty names in it -> OR of event masks ("." = the dir itself)
}

// startTracker marks the upper's filesystem and starts the reader goroutine.
func startTracker(upperFd int, upperPath string, upperDev uint64) (*tracker, error) {
	fd, err := newFanotifyGroup(upperFd)
	if err != nil {
		return nil, err
	}
	wake, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	t := &tracker{
		fd: fd, wake: wake, upperFd: upperFd, upperPath: upperPath, upperDev: upperDev,
		self: int32(os.Getpid()), done: make(chan struct{}), buf: make([]byte, 256<<10),
		dirty: map[string]map[string]uint64{}, inside: map[string]dirLocation{}, outside: map[string]bool{},
	}
	go t.run()
	return t, nil
}

// run reads events until stopped or reading fails.
func (t *tracker) run() {
	defer close(t.done)
	fds := []unix.PollFd{{Fd: int32(t.fd), Events: unix.POLLIN}, {Fd: int32(t.wake), Events: unix.POLLIN}}
	for {
		if _, err := unix.Poll(fds, readerTick); err != nil && !errors.Is(err, unix.EINTR) {
			t.fail(fmt.Errorf("poll fanotify: %w", err))
			return
		}
		if fds[0].Revents&(unix.POLLERR|unix.POLLHUP|unix.POLLNVAL) != 0 {
			t.fail(fmt.Errorf("poll fanotify: revents %#x", fds[0].Revents))
			return
		}
		for {
			t.mu.Lock()
			more := !t.stopped && t.err == nil && t.readOnce()
			stop := t.stopped || t.err != nil
			t.mu.Unlock()
			if stop {
				return
			}
			if !more {
				break
			}
		}
	}
}

// signalStop asks the reader goroutine to end, without waiting for it.
func (t *tracker) signalStop() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.stopped {
		return
	}
	t.stopped = true
	var one [8]byte
	binary.NativeEndian.PutUint64(one[:], 1)
	if _, err := unix.Write(t.wake, one[:]); err != nil {
		t.err = errors.Join(t.err, fmt.Errorf("wake fanotify reader: %w", err)) // it still ends within readerTick
	}
}

// stopReader ends the reader goroutine and waits until it is gone; events
// then stay queued in the kernel until drainAndTake reads them. The pause
// then never waits for the reader to let go of the lock.
func (t *tracker) stopReader() {
	t.signalStop()
	<-t.done
}

// drainAndTake reads every queued event (non-blocking, to EAGAIN) and
// returns the dirty set, starting a new one. After the freeze, events of
// every completed syscall are queued, so the set is complete.
func (t *tracker) drainAndTake() []dirtyDir {
	t.mu.Lock()
	defer t.mu.Unlock()
	for t.err == nil && t.readOnce() {
		// until EAGAIN
	}
	return t.takeLocked()
}

// close stops the reader goroutine, waits for it and releases the group and
// the eventfd.
func (t *tracker) close() error {
	t.signalStop()
	<-t.done
	var errs []error
	for _, fd := range []*int{&t.fd, &t.wake} {
		if *fd >= 0 {
			if err := unix.Close(*fd); err != nil {
				errs = append(errs, fmt.Errorf("close fanotify tracker: %w", err))
			}
			*fd = -1
		}
	}
	return errors.Join(errs...)
}

// readOnce reads one batch of events and records them; it reports whether
// there may be more (false at EAGAIN or when the tracker failed). Called with
// t.mu held.
func (t *tracker) readOnce() bool {
	for {
		n, err := unix.Read(t.fd, t.buf)
		switch {
		case errors.Is(err, unix.EINTR):
			continue
		case errors.Is(err, unix.EAGAIN):
			return false
		case err != nil:
			t.err = errors.Join(t.err, fmt.Errorf("read fanotify: %w", err))
			return false
		case n <= 0:
			return false
		}
		if err := parseEvents(t.buf[:n], t.record); err != nil {
			t.err = errors.Join(t.err, err)
			return false
		}
		return true
	}
}

// record keeps one event if it names something under the upper dir. Called
// with t.mu held.
func (t *tracker) record(ev *fanEvent) {
	t.events++
	switch {
	case ev.mask&unix.FAN_Q_OVERFLOW != 0:
		t.overflow = true
		return
	case ev.pid == t.self || ev.dirHandle == "":
		return // our own staging writes; FID-only events duplicate named ones
	}
	if !t.isInside(ev.dirHandle) {
		return
	}
	if ev.mask&unix.FAN_ONDIR != 0 && ev.mask&unix.FAN_MOVED_TO != 0 {
		// A directory moved in (e.g. overlay's opaque dir built in the
		// workdir): handles once found outside may now be inside.
		t.outside = map[string]bool{}
	}
	names := t.dirty[ev.dirHandle]
	if names == nil {
		names = map[string]uint64{}
		t.dirty[ev.dirHandle] = names
	}
	if _, ok := names[ev.name]; !ok {
		t.names++
	}
	names[ev.name] |= ev.mask
}

// isInside reports whether a directory handle names a directory under the
// upper dir, resolving each handle once. Called with t.mu held.
func (t *tracker) isInside(handle string) bool {
	if _, ok := t.inside[handle]; ok {
		return true
	}
	if t.outside[handle] {
		return false
	}
	loc, ok, err := t.locate(handle)
	if err != nil {
		t.err = errors.Join(t.err, err)
		return true // keep it: Finish falls back anyway
	}
	if ok {
		t.inside[handle] = loc
		return true
	}
	if len(t.outside) >= maxOutsideCache {
		t.outside = map[string]bool{}
	}
	t.outside[handle] = true
	return false
}

// locate opens a directory handle and returns where the directory is now in
// the upper dir. ok is false for a directory that is gone or not under the
// upper dir; err reports a failure that makes tracking unusable.
func (t *tracker) locate(handle string) (loc dirLocation, ok bool, err error) {
	fh, err := fileHandle(handle)
	if err != nil {
		return loc, false, err
	}
	fd, err := unix.OpenByHandleAt(t.upperFd, fh, unix.O_PATH|unix.O_CLOEXEC)
	// Decoding the handle of a directory being removed has been seen to fail
	// with ENOMEM under rm -rf churn; try again before giving up on tracking.
	for try := 0; errors.Is(err, unix.ENOMEM) && try < 3; try++ {
		runtime.Gosched()
		fd, err = unix.OpenByHandleAt(t.upperFd, fh, unix.O_PATH|unix.O_CLOEXEC)
	}
	if errors.Is(err, unix.ESTALE) || errors.Is(err, unix.ENOENT) {
		return loc, false, nil
	}
	if err != nil {
		return loc, false, fmt.Errorf("open_by_handle_at: %w", err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return loc, false, fmt.Errorf("fstat handle: %w", err)
	}
	if uint64(st.Dev) != t.upperDev || st.Nlink == 0 || st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return loc, false, nil
	}
	target, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
	if err != nil {
		return loc, false, fmt.Errorf("readlink handle: %w", err)
	}
	loc.rel, ok = relUnder(t.upperPath, target)
	loc.ino = st.Ino
	return loc, ok, nil
}

// takeLocked returns the dirty set with the last known location of each
// directory and starts a new set. Called with t.mu held.
func (t *tracker) takeLocked() []dirtyDir {
	out := make([]dirtyDir, 0, len(t.dirty))
	for handle, names := range t.dirty {
		out = append(out, dirtyDir{handle: handle, loc: t.inside[handle], names: names})
	}
	t.dirty, t.names = map[string]map[string]uint64{}, 0
	return out
}

// take is takeLocked for callers not holding t.mu.
func (t *tracker) take() []dirtyDir {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.takeLocked()
}

// relocate finds a directory handle's current location and caches it.
func (t *tracker) relocate(handle string) (dirLocation, bool, error) {
	loc, ok, err := t.locate(handle)
	if err == nil && ok {
		t.mu.Lock()
		t.inside[handle] = loc
		t.mu.Unlock()
	}
	return loc, ok, err
}

// pending reports how many distinct dirty names wait to be taken.
func (t *tracker) pending() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.names
}

// status reports why the collected set cannot be trusted ("" when it can)
// and how many events were read.
func (t *tracker) status() (reason string, events int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	switch {
	case t.err != nil:
		return "dirty tracker failed: " + t.err.Error(), t.events
	case t.overflow:
		return "fanotify queue overflow", t.events
	}
	return "", t.events
}

func (t *tracker) fail(err error) {
	t.mu.Lock()
	t.err = errors.Join(t.err, err)
	t.mu.Unlock()
}

// relUnder returns p relative to dir when p is dir or below it.
func relUnder(dir, p string) (string, bool) {
	if p == dir {
		return "", true
	}
	if dir == "/" {
		return strings.TrimPrefix(p, "/"), strings.HasPrefix(p, "/") && len(p) > 1
	}
	if strings.HasPrefix(p, dir+"/") {
		return p[len(dir)+1:], true
	}
	return "", false
}
