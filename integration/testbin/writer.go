package main

import (
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seamless-snapshot/seamless/integration/bench/contract"
)

// writer keeps the invariants of package contract in --dir forever: each
// tick writes the counter to A then B (pwrite), stores it into M's shared
// mapping then pwrites N, and rewrites one pool file in place (the counter,
// then 0.5–8 KiB of random bytes, then ftruncate to that size), so --rate
// ticks per second change --rate other files per second.
func writer(args []string) error {
	fs := flag.NewFlagSet("writer", flag.ContinueOnError)
	dir := fs.String("dir", "", "directory of the invariant files (created)")
	rate := fs.Int("rate", 100, "ticks per second (= other files changed per second)")
	pool := fs.Int("pool", 100, "files in the pool the writer rewrites")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *dir == "" || *rate <= 0 || *pool <= 0 {
		return fmt.Errorf("usage: testbin writer --dir D [--rate N>0] [--pool P>0]")
	}
	w, err := openWriterFiles(*dir, *pool)
	if err != nil {
		return fmt.Errorf("writer: %w", err)
	}
	return w.run(time.Second / time.Duration(*rate))
}

// writerFiles are the writer's open files.
type writerFiles struct {
	a, b, n *os.File
	m       []byte // FileM mapped MAP_SHARED
	pool    []*os.File
	rng     *rand.Rand
	buf     []byte
	k       uint64
}

// openWriterFiles creates the layout, continuing the counter of an earlier
// run if there is one, and brings every file to a state that satisfies the
// invariants.
func openWriterFiles(dir string, pool int) (*writerFiles, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	w := &writerFiles{rng: rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 7)), buf: make([]byte, 8192)}
	var err error
	if w.a, err = openCounter(filepath.Join(dir, contract.FileA)); err != nil {
		return nil, err
	}
	if w.m, err = mapCounter(filepath.Join(dir, contract.FileM)); err != nil {
		return nil, err
	}
	if w.pool, err = makePool(dir, pool); err != nil {
		return nil, err
	}
	if w.b, err = openCounter(filepath.Join(dir, contract.FileB)); err != nil {
		return nil, err
	}
	if w.n, err = openCounter(filepath.Join(dir, contract.FileN)); err != nil {
		return nil, err
	}
	if rec := make([]byte, contract.CounterWidth); readFull(w.a, rec) == nil {
		w.k, _ = contract.ParseCounter(rec)
	}
	return w, w.initialize()
}

// initialize stamps the pool with the P latest counters (oldest first),
// then sets the pairs to the latest: the invariants hold from here on.
func (w *writerFiles) initialize() error {
	p := uint64(len(w.pool))
	w.k = max(w.k, p)
	for t := w.k - p + 1; t <= w.k; t++ {
		if err := w.churn(t); err != nil {
			return err
		}
	}
	return w.setPairs(w.k)
}

func openCounter(path string) (*os.File, error) {
	return os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
}

func readFull(f *os.File, b []byte) error {
	_, err := f.ReadAt(b, 0)
	return err
}

// mapCounter creates FileM with one page and maps it shared and writable.
func mapCounter(path string) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if err := f.Truncate(contract.MmapFileSize); err != nil {
		return nil, err
	}
	m, err := unix.Mmap(int(f.Fd()), 0, contract.MmapFileSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("mmap %s: %w", path, err)
	}
	return m, nil
}

// makePool creates and opens the pool files.
func makePool(dir string, n int) ([]*os.File, error) {
	files := make([]*os.File, n)
	for i := range files {
		p := filepath.Join(dir, filepath.FromSlash(contract.PoolFile(i)))
		if i == 0 {
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				return nil, err
			}
		}
		f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			return nil, err
		}
		files[i] = f
	}
	return files, nil
}

// run ticks every period until killed; a late tick is not made up for.
func (w *writerFiles) run(period time.Duration) error {
	next := time.Now()
	for {
		if err := w.tick(); err != nil {
			return fmt.Errorf("writer: %w", err)
		}
		next = next.Add(period)
		if d := time.Until(next); d > 0 {
			time.Sleep(d)
		} else if d < -time.Second {
			next = time.Now()
		}
	}
}

// tick advances the counter through both pairs, then churns one pool file.
func (w *writerFiles) tick() error {
	w.k++
	if err := w.setPairs(w.k); err != nil {
		return err
	}
	return w.churn(w.k)
}

// setPairs writes k to A, B, then M (through the mapping), then N.
func (w *writerFiles) setPairs(k uint64) error {
	rec := contract.FormatCounter(k)
	for _, f := range []*os.File{w.a, w.b} {
		if _, err := f.WriteAt(rec, 0); err != nil {
			return err
		}
	}
	copy(w.m, rec)
	_, err := w.n.WriteAt(rec, 0)
	return err
}

// churn rewrites pool file k mod P in place: k, then random bytes up to a
// random size of 0.5–8 KiB (never empty, never without its stamp).
func (w *writerFiles) churn(k uint64) error {
	f := w.pool[k%uint64(len(w.pool))]
	size := 512 + w.rng.IntN(len(w.buf)-512)
	copy(w.buf, contract.FormatCounter(k))
	for i := contract.CounterWidth; i < size; i += 8 {
		v := w.rng.Uint64()
		for j := 0; j < 8 && i+j < size; j++ {
			w.buf[i+j] = byte(v >> (8 * j))
		}
	}
	if _, err := f.WriteAt(w.buf[:size], 0); err != nil {
		return err
	}
	return f.Truncate(int64(size))
}
