package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/seamless-snapshot/seamless/integration/bench/contract"
	"github.com/seamless-snapshot/seamless/overlay"
)

// strategy is one way of snapshotting a running container.
type strategy interface {
	// Name is the row label.
	Name() string
	// Consistent says whether it promises a point-in-time capture.
	Consistent() bool
	// Snapshot takes one snapshot of c. The container must be thawed on
	// every return path.
	Snapshot(ctx context.Context, c *container, round int) (shot, error)
}

// shot is a measured snapshot before the probe's figures are added.
type shot struct {
	Sample
	frozen  window // certainly frozen: frozen confirmed → thaw requested
	request window // request → answer
}

// pauseStrategies are strategies 1–4 of the issue, in table order.
func pauseStrategies(fsKind string) []strategy {
	if fsKind == fsXFS {
		return []strategy{&seamlessStrategy{}, floorStrategy{}}
	}
	return []strategy{&seamlessStrategy{}, copyStrategy{}, tarStrategy{}, floorStrategy{}}
}

// frozen freezes c, runs work, and thaws, timing each part by the bench's
// clock. The thaw is deferred before work runs, so no error or panic leaves
// the container frozen.
func (c *container) frozen(ctx context.Context, work func(context.Context) error) (shot, error) {
	clock := c.env.Clock
	t0 := clock.Now()
	if _, err := c.fr.Freeze(ctx, freezeTimeout); err != nil {
		return shot{}, fmt.Errorf("freeze: %w", err)
	}
	t1 := clock.Now()
	werr, t2, terr := c.workThenThaw(ctx, work)
	t3 := clock.Now()
	if terr != nil {
		return shot{}, errors.Join(werr, fmt.Errorf("thaw: %w", terr))
	}
	if werr != nil {
		return shot{}, werr
	}
	return timedShot(t0, t1, t2, t3), nil
}

// timedShot is the shot of a pause timed by the bench's clock: freeze
// requested (t0), frozen (t1), thaw requested (t2), thawed (t3).
func timedShot(t0, t1, t2, t3 int64) shot {
	var s shot
	s.PauseUS, s.LatencyUS = us(t3-t0), us(t3-t0)
	s.PartsUS = map[string]float64{"freeze": us(t1 - t0), "capture": us(t2 - t1), "thaw": us(t3 - t2)}
	s.frozen, s.request = window{t1, t2}, window{t0, t3}
	return s
}

// workThenThaw runs work on the frozen container and thaws it, also when
// work panics; a failed thaw is retried through testenv's direct writes.
func (c *container) workThenThaw(ctx context.Context, work func(context.Context) error) (werr error, t2 int64, terr error) {
	thawed := false
	defer func() {
		if !thawed {
			if err := c.fr.Thaw(); err != nil {
				c.env.Ctd.Thaw(c.id) //nolint:errcheck // last resort while unwinding
			}
		}
	}()
	werr = work(ctx)
	t2 = c.env.Clock.Now()
	terr = c.fr.Thaw()
	thawed = true
	if terr != nil {
		terr = errors.Join(terr, c.env.Ctd.Thaw(c.id))
	}
	return werr, t2, terr
}

// emptyPause is the floor's pause: freeze → nothing → thaw through
// freezer.Pause, the same call (one SCHED_FIFO thread from the freeze to the
// thaw) the shim makes around its re-capture.
func (c *container) emptyPause(ctx context.Context) (shot, error) {
	clock := c.env.Clock
	var t1, t2 int64
	t0 := clock.Now()
	res, err := c.fr.Pause(ctx, freezeTimeout, func() error {
		t1 = clock.Now()
		t2 = clock.Now()
		return nil
	})
	t3 := clock.Now()
	if err != nil {
		if t1 != 0 {
			err = errors.Join(err, c.env.Ctd.Thaw(c.id))
		}
		return shot{}, fmt.Errorf("pause: %w", err)
	}
	s := timedShot(t0, t1, t2, t3)
	// As the shim reports it: freeze request → thaw confirmed, without the
	// naps Pause takes before and after.
	s.PauseUS = us(res.Total.Nanoseconds())
	s.PartsUS["freeze"], s.PartsUS["thaw"] = us(res.Freeze.Wait.Nanoseconds()), us(res.Thaw.Nanoseconds())
	return s, nil
}

func us(ns int64) float64 { return float64(ns) / 1000 }

// copyStrategy is strategy 2: freeze → full copy of the upper dir
// (overlay.Capture into a temp dir) → thaw.
type copyStrategy struct{}

func (copyStrategy) Name() string     { return "full-copy" }
func (copyStrategy) Consistent() bool { return true }

func (copyStrategy) Snapshot(ctx context.Context, c *container, _ int) (shot, error) {
	tmp, err := os.MkdirTemp(c.env.Scratch, "copy-")
	if err != nil {
		return shot{}, err
	}
	defer os.RemoveAll(tmp)
	var m *overlay.Manifest
	s, err := c.frozen(ctx, func(ctx context.Context) error {
		var err error
		m, _, err = overlay.Capture(ctx, c.upper, tmp, c.captureOpts())
		return err
	})
	if err != nil {
		return s, err
	}
	if c.writing {
		s.verify(manifestView(m, filepath.Join(tmp, "data"), upperRel(writerDir)))
	}
	return s, nil
}

// tarStrategy is strategy 3: freeze → layer tar + gzip straight from the
// live upper dir, as commit tools build it → thaw (push excluded).
type tarStrategy struct{}

func (tarStrategy) Name() string     { return "commit-tar" }
func (tarStrategy) Consistent() bool { return true }

func (tarStrategy) Snapshot(ctx context.Context, c *container, _ int) (shot, error) {
	f, err := os.CreateTemp(c.env.Scratch, "layer-*.tar.gz")
	if err != nil {
		return shot{}, err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	var got map[string][]byte
	var stats commitStats
	s, err := c.frozen(ctx, func(ctx context.Context) error {
		var err error
		got, stats, err = commitLayer(ctx, c.upper, f, c.userXattr, writerKeep(upperRel(writerDir)))
		return err
	})
	if err != nil {
		return s, err
	}
	s.Figures = map[string]any{"layer_bytes": stats.Compressed, "tar_bytes": stats.Uncompressed, "entries": stats.Entries}
	if c.writing {
		s.verify(got)
	}
	return s, nil
}

// floorStrategy is strategy 4: freeze → nothing → thaw. Its capture is
// copied from the live upper right after the thaw, as the torn prototype
// did (see tornCopy): inconsistent by design.
type floorStrategy struct{}

func (floorStrategy) Name() string     { return "floor" }
func (floorStrategy) Consistent() bool { return false }

func (floorStrategy) Snapshot(ctx context.Context, c *container, _ int) (shot, error) {
	s, err := c.emptyPause(ctx)
	if err != nil || !c.writing {
		return s, err
	}
	tmp, err := os.MkdirTemp(c.env.Scratch, "torn-")
	if err != nil {
		return s, err
	}
	defer os.RemoveAll(tmp)
	got, err := tornCopy(ctx, c.upperPath(writerDir), tmp, writerKeep(""))
	if err != nil {
		return s, fmt.Errorf("read after the thaw: %w", err)
	}
	s.verify(got)
	return s, nil
}

// tornCopy copies the tree at src into dst while the container runs, the
// way a capture made after the thaw would: directories in the order the
// filesystem lists them, each regular file copied as it is when reached,
// changes under way tolerated. It returns the start of the copied content
// of the files keep selects (see writerKeep; paths relative to src).
func tornCopy(ctx context.Context, src, dst string, keep func(string) (string, bool)) (map[string][]byte, error) {
	got := map[string][]byte{}
	var walk func(rel string) error
	walk = func(rel string) error {
		names, err := readDirUnsorted(filepath.Join(src, rel))
		if err != nil {
			return err
		}
		for _, name := range names {
			if err := ctx.Err(); err != nil {
				return err
			}
			if err := tornCopyEntry(filepath.Join(src, rel, name), filepath.Join(dst, rel, name), path.Join(rel, name), keep, got, walk); err != nil {
				return err
			}
		}
		return nil
	}
	return got, walk("")
}

// tornCopyEntry copies one entry (recursing into directories through
// walk); an entry that vanished meanwhile is skipped.
func tornCopyEntry(from, to, rel string, keep func(string) (string, bool), got map[string][]byte, walk func(string) error) error {
	fi, err := os.Lstat(from)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return nil
	case err != nil:
		return err
	case fi.IsDir():
		if err := os.Mkdir(to, 0o700); err != nil {
			return err
		}
		return walk(rel)
	case !fi.Mode().IsRegular():
		return nil
	}
	data, err := os.ReadFile(from)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if name, ok := keep(rel); ok {
		got[name] = data[:min(len(data), contract.CounterWidth)]
	}
	return os.WriteFile(to, data, 0o600)
}

// readDirUnsorted lists a directory in the order getdents returns it.
func readDirUnsorted(dir string) ([]string, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return f.Readdirnames(-1)
}

// verify records the writer's invariants on a capture of its directory
// (see contract.Verify).
func (s *shot) verify(files map[string][]byte) {
	s.Checked = true
	s.Violations = contract.Verify(files)
}

// writerKeep selects, among capture paths relative to the captured root,
// the writer's invariant files, given the writer dir relative to that root;
// it returns their name relative to the writer dir.
func writerKeep(dir string) func(string) (string, bool) {
	prefix := ""
	if dir != "" {
		prefix = dir + "/"
	}
	return func(p string) (string, bool) {
		name, ok := strings.CutPrefix(p, prefix)
		return name, ok && contract.IsWriterFile(name)
	}
}

// manifestView reads the writer's invariant files from a capture (manifest
// + data dir); dir is the writer dir relative to the capture's root. A file
// without data is given as empty (it then fails to parse).
func manifestView(m *overlay.Manifest, dataDir, dir string) map[string][]byte {
	keep := writerKeep(dir)
	out := map[string][]byte{}
	for _, e := range m.Entries {
		name, ok := keep(e.Path)
		if !ok || e.Type != overlay.TypeFile {
			continue
		}
		out[name] = nil
		if e.Data != "" {
			out[name], _ = readPrefix(filepath.Join(dataDir, e.Data), contract.CounterWidth)
		}
	}
	return out
}

// readPrefix reads up to n bytes from the start of a file.
func readPrefix(p string, n int) ([]byte, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b := make([]byte, n)
	k, err := f.ReadAt(b, 0)
	if k > 0 {
		err = nil
	}
	return b[:k], err
}
