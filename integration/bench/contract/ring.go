package contract

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// DefaultProbeFile is where testbin probe keeps its ring inside the
// container: /dev/shm is a tmpfs outside the overlay, so the probe never
// dirties the upper dir it is measuring.
const DefaultProbeFile = "/dev/shm/seamless-probe"

// The ring file is a header followed by Capacity entries of two
// little-endian (native) uint64: the CLOCK_MONOTONIC nanoseconds of the last
// loop iteration before a gap and of the first one after it. Entry i lives in
// slot i % Capacity; Index counts entries ever written. The writer fills a
// slot, then publishes it by storing Index+1 (atomically); Heartbeat is the
// writer's latest clock reading, refreshed every few dozen iterations.
const (
	ringMagic    = "SLPROBE1"
	headerSize   = 64
	entrySize    = 16
	offCapacity  = 8
	offThreshold = 16
	offStarted   = 24
	offIndex     = 32
	offHeartbeat = 40
)

// Gap is an interval in which the probe did not run.
type Gap struct {
	Start, End int64 // CLOCK_MONOTONIC ns
}

// Len is the gap's duration.
func (g Gap) Len() time.Duration { return time.Duration(g.End - g.Start) }

// Overlaps reports whether the gap and [a, b] share an instant.
func (g Gap) Overlaps(a, b int64) bool { return g.Start <= b && g.End >= a }

// RingWriter is the probe's side of the ring.
type RingWriter struct {
	mem      []byte
	capacity uint64
	index    uint64
}

// CreateRing creates (or replaces) the ring file at path with room for
// capacity gaps longer than threshold, and maps it.
func CreateRing(path string, capacity int, threshold time.Duration, started int64) (*RingWriter, error) {
	if capacity < 1 {
		return nil, fmt.Errorf("ring capacity %d: must be positive", capacity)
	}
	size := headerSize + capacity*entrySize
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, fmt.Errorf("create ring: %w", err)
	}
	defer f.Close()
	if err := f.Truncate(int64(size)); err != nil {
		return nil, fmt.Errorf("size ring %s: %w", path, err)
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("map ring %s: %w", path, err)
	}
	w := &RingWriter{mem: mem, capacity: uint64(capacity)}
	*w.word(offCapacity) = uint64(capacity)
	*w.word(offThreshold) = uint64(threshold)
	*w.word(offStarted) = uint64(started)
	copy(mem, ringMagic) // last: a reader trusts the header once it sees the magic
	return w, nil
}

func (w *RingWriter) word(off int) *uint64 { return (*uint64)(unsafe.Pointer(&w.mem[off])) }

// Add records one gap.
func (w *RingWriter) Add(g Gap) {
	off := headerSize + int(w.index%w.capacity)*entrySize
	*w.word(off) = uint64(g.Start)
	*w.word(off + 8) = uint64(g.End)
	w.index++
	atomic.StoreUint64(w.word(offIndex), w.index)
}

// Beat publishes the probe's latest clock reading.
func (w *RingWriter) Beat(now int64) { atomic.StoreUint64(w.word(offHeartbeat), uint64(now)) }

// RingReader is the benchmark's side of the ring.
type RingReader struct {
	mem      []byte
	capacity uint64
	next     uint64
}

// OpenRing maps the ring file at path read-only. Only gaps recorded after
// OpenRing returns are reported by Read.
func OpenRing(path string) (*RingReader, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open ring: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat ring: %w", err)
	}
	if st.Size() < headerSize {
		return nil, fmt.Errorf("ring %s: %d bytes, not a ring (yet?)", path, st.Size())
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, int(st.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("map ring %s: %w", path, err)
	}
	r := &RingReader{mem: mem}
	if !bytes.Equal(mem[:len(ringMagic)], []byte(ringMagic)) {
		r.Close()
		return nil, fmt.Errorf("ring %s: bad magic (probe not started yet?)", path)
	}
	r.capacity = *r.word(offCapacity)
	if want := uint64(headerSize) + r.capacity*entrySize; uint64(len(mem)) < want {
		r.Close()
		return nil, fmt.Errorf("ring %s: %d bytes, header says %d", path, len(mem), want)
	}
	r.next = atomic.LoadUint64(r.word(offIndex))
	return r, nil
}

func (r *RingReader) word(off int) *uint64 { return (*uint64)(unsafe.Pointer(&r.mem[off])) }

// Threshold is the shortest gap the probe records.
func (r *RingReader) Threshold() time.Duration { return time.Duration(*r.word(offThreshold)) }

// Heartbeat is the probe's latest clock reading (CLOCK_MONOTONIC ns).
func (r *RingReader) Heartbeat() int64 { return int64(atomic.LoadUint64(r.word(offHeartbeat))) }

// Read returns the gaps recorded since the previous Read (or OpenRing), and
// how many were overwritten before they could be read.
func (r *RingReader) Read() (gaps []Gap, lost uint64) {
	end := atomic.LoadUint64(r.word(offIndex))
	start := r.next
	if end-start > r.capacity {
		lost = end - start - r.capacity
		start = end - r.capacity
	}
	for i := start; i < end; i++ {
		off := headerSize + int(i%r.capacity)*entrySize
		gaps = append(gaps, Gap{Start: int64(*r.word(off)), End: int64(*r.word(off + 8))})
	}
	r.next = end
	// Entry i's slot is rewritten while entry i+capacity is being added:
	// drop what the writer may have overwritten while we copied it.
	if now := atomic.LoadUint64(r.word(offIndex)); now+1 > r.capacity {
		if valid := now + 1 - r.capacity; valid > start {
			drop := min(valid-start, uint64(len(gaps)))
			gaps, lost = gaps[drop:], lost+drop
		}
	}
	return gaps, lost
}

// WaitBeat waits until the probe's heartbeat reaches mono (it has run after
// that instant, so every gap up to it is published), or timeout passes.
func (r *RingReader) WaitBeat(clock Clock, mono int64, timeout time.Duration) error {
	deadline := clock.Now() + int64(timeout)
	for r.Heartbeat() < mono {
		if clock.Now() > deadline {
			return fmt.Errorf("probe heartbeat stuck %v before the awaited instant (is the probe running? is the container frozen?)",
				time.Duration(mono-r.Heartbeat()))
		}
		time.Sleep(200 * time.Microsecond)
	}
	return nil
}

// Close unmaps the ring.
func (r *RingReader) Close() error {
	if r.mem == nil {
		return nil
	}
	err := unix.Munmap(r.mem)
	r.mem = nil
	if err != nil {
		return errors.Join(errors.New("unmap ring"), err)
	}
	return nil
}
