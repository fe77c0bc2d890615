package overlay

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// frozenRound is one snapshot taken while a child writes: pre-copy, freeze,
// Recapture, reference Capture (same freeze), thaw, Seal.
type frozenRound struct {
	pre        PrecopyStats
	fin        FinishStats
	freezeWait time.Duration
	capture    CaptureStats
	diffs      []string
	m          *Manifest
	snap       string
}

// runFrozenRound runs one round (even ones call Prepare before freezing, as
// the shim does); pids selects the processes whose mappings
// Recapture scans (nil: none, the negative control).
func runFrozenRound(t *testing.T, o *testOverlay, cg *testCgroup, base string, i int, opts PrecopyOptions, pids func() []int) frozenRound {
	t.Helper()
	ctx := context.Background()
	snapA, snapB := snapDirs(t, base, i)
	p, err := StartPrecopy(ctx, o.upper, snapA, opts)
	mustNil(t, err)
	defer p.Close()
	r := frozenRound{pre: p.Stats(), snap: snapA}
	time.Sleep(time.Duration(rand.IntN(30)) * time.Millisecond)
	if i%2 == 0 { // as the shim does; odd rounds go without
		mustNil(t, p.Prepare(ctx, pids()))
	}
	r.freezeWait = cg.freeze(t)
	fin, rerr := p.Recapture(ctx, pids())
	ref, capStats, cerr := Capture(ctx, o.upper, snapB, opts.CaptureOptions)
	cg.thaw(t)
	if rerr != nil || cerr != nil {
		t.Fatalf("round %d: Recapture: %v; reference Capture: %v", i, rerr, cerr)
	}
	m, err := p.Seal(ctx)
	mustNil(t, err)
	r.fin, r.capture, r.m = fin, capStats, m
	r.diffs = captureDiffs(t, m, snapA, ref, snapB)
	return r
}

// cleanRound removes a round's snapshot dirs (they add up on a slow disk).
func cleanRound(t *testing.T, base string, i int) {
	for _, d := range []string{fmt.Sprintf("pre-%d", i), fmt.Sprintf("ref-%d", i)} {
		if err := os.RemoveAll(filepath.Join(base, d)); err != nil {
			t.Errorf("clean up: %v", err)
		}
	}
}

// TestPrecopyConsistentUnderWriter snapshots an overlay 20 times while a
// writer in a frozen cgroup rewrites, renames, chmods, copies up, deletes
// and replaces: each capture must equal a full Capture of the same frozen
// instant, and the writer's cross-file invariant must hold in it.
func TestPrecopyConsistentUnderWriter(t *testing.T) {
	requireRoot(t)
	if testing.Short() {
		t.Skip("short mode")
	}
	o := writerOverlay(t)
	cg := newTestCgroup(t)
	w := startChild(t, cg, "writer", false, o.merged)
	time.Sleep(100 * time.Millisecond)
	base := t.TempDir()
	opts := PrecopyOptions{Mountpoint: o.merged}
	var dirty, recapture []int
	fallbacks := 0
	for i := 0; i < 20; i++ {
		w.alive(t)
		r := runFrozenRound(t, o, cg, base, i, opts, func() []int { return cg.pids(t) })
		for _, d := range r.diffs {
			t.Errorf("round %d: %s", i, d)
		}
		a, b := checkInvariant(t, r.snap, r.m)
		if r.fin.Fallback {
			// A fallback round must still be consistent (checked above); the
			// tracker must carry the others.
			fallbacks++
			t.Logf("round %d: fallback: %s", i, r.fin.FallbackReason)
			if fallbacks > 2 {
				t.Errorf("round %d: %d fallbacks in %d rounds: %s", i, fallbacks, i+1, r.fin.FallbackReason)
			}
		}
		dirty = append(dirty, r.fin.DirtyEntries)
		recapture = append(recapture, int(r.fin.Recapture.Microseconds()))
		t.Logf("round %2d: A=%d B=%d precopy %v (%d rounds %v), freeze wait %v, drain %v, maps %v, recapture %v (%d dirty, %d files), capture %v",
			i, a, b, r.pre.Duration.Round(time.Millisecond), r.pre.Rounds, r.pre.RoundDirty, r.freezeWait.Round(time.Microsecond),
			r.fin.Drain.Round(time.Microsecond), r.fin.MmapScan.Round(time.Microsecond), r.fin.Recapture.Round(time.Microsecond),
			r.fin.DirtyEntries, r.fin.Files, r.capture.Duration.Round(time.Millisecond))
		cleanRound(t, base, i)
		if t.Failed() {
			break
		}
	}
	t.Logf("dirty entries p50 %d max %d; recapture µs p50 %d max %d", median(dirty), slices.Max(dirty), median(recapture), slices.Max(recapture))
}

// TestPrecopyMmapWriter: a process storing into a MAP_SHARED mapping (never
// msync'ed, no fanotify event) must be captured as frozen, whether it runs in
// our mount namespace (maps shows the merged path) or pivot_root'ed into the
// overlay like a container (maps shows "/mm"), and whether the mapped file
// was created in the upper dir or copied up from a lower one.
func TestPrecopyMmapWriter(t *testing.T) {
	requireRoot(t)
	for _, tc := range []struct {
		name string
		ns   bool
		file string
	}{{"host-ns/upper-file", false, "mm"}, {"host-ns/copied-up", false, "lmm"}, {"own-ns/upper-file", true, "mm"}, {"own-ns/copied-up", true, "lmm"}} {
		t.Run(tc.name, func(t *testing.T) {
			o := newOverlay(t, t.TempDir(), func(lower string) {
				writeFile(t, filepath.Join(lower, "lmm"), string(make([]byte, 64<<10)))
			})
			writeFile(t, filepath.Join(o.merged, "mm"), string(make([]byte, 64<<10)))
			cg := newTestCgroup(t)
			args := []string{filepath.Join(o.merged, tc.file)}
			if tc.ns {
				args = []string{"/" + tc.file, o.merged}
			}
			w := startChild(t, cg, "mmap", tc.ns, args...)
			base := t.TempDir()
			opts := PrecopyOptions{Mountpoint: o.merged}
			negative := 0
			for i := 0; i < 6; i++ {
				w.alive(t)
				control := i%2 == 1
				pids := func() []int { return cg.pids(t) }
				if control {
					pids = func() []int { return nil }
				}
				r := runFrozenRound(t, o, cg, base, i, opts, pids)
				switch {
				case control && len(r.diffs) > 0:
					negative++
				case !control:
					for _, d := range r.diffs {
						t.Errorf("round %d: %s", i, d)
					}
					if r.fin.MappedFiles != 1 || r.fin.Fallback {
						t.Errorf("round %d: finish %+v, want 1 mapped file and no fallback", i, r.fin)
					}
				}
				t.Logf("round %d (control %v): %d diffs, recapture %v, maps %v, finish %+v", i, control, len(r.diffs), r.fin.Recapture, r.fin.MmapScan, r.fin)
				cleanRound(t, base, i)
			}
			if negative == 0 {
				t.Error("without the maps rule no capture differed: the test does not exercise mmap stores")
			}
		})
	}
}

// TestPrecopyHeldMapped: a mapped file held open since Prepare is re-copied
// through those descriptors when only stores through the mapping (and
// changes to other files) happened since, and the ordinary way when its
// name or status changed; every capture equals a full Capture of the same
// frozen instant.
func TestPrecopyHeldMapped(t *testing.T) {
	requireRoot(t)
	for _, tc := range []struct {
		name string
		ops  func(merged string) []string // run after Prepare
		held int                          // want FinishStats.MappedHeld
	}{
		{"stores only", nil, 1},
		{"other file written", func(m string) []string { return []string{"write:" + m + "/other:y"} }, 1},
		{"chmod", func(m string) []string { return []string{"chmod:" + m + "/mm:600"} }, 0},
		{"xattr", func(m string) []string { return []string{"xattr:" + m + "/mm:user.k:v"} }, 0},
		{"renamed over", func(m string) []string { return []string{"write:" + m + "/new:z", "mv:" + m + "/new:" + m + "/mm"} }, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			o := newOverlay(t, t.TempDir(), nil)
			writeFile(t, filepath.Join(o.merged, "mm"), string(make([]byte, 64<<10)))
			cg := newTestCgroup(t)
			startChild(t, cg, "mmap", false, filepath.Join(o.merged, "mm"))
			snapA, snapB := snapDirs(t, t.TempDir(), 0)
			p, err := StartPrecopy(ctx, o.upper, snapA, PrecopyOptions{Mountpoint: o.merged})
			mustNil(t, err)
			defer p.Close()
			mustNil(t, p.Prepare(ctx, cg.pids(t)))
			if len(p.held) != 1 {
				t.Fatalf("Prepare held %d files, want the mapped one", len(p.held))
			}
			if tc.ops != nil {
				// Their events wait in the kernel's queue for the drain.
				runOpsChild(t, tc.ops(o.merged)...)
			}
			cg.freeze(t)
			fin, rerr := p.Recapture(ctx, cg.pids(t))
			ref, _, cerr := Capture(ctx, o.upper, snapB, CaptureOptions{})
			cg.thaw(t)
			if rerr != nil || cerr != nil {
				t.Fatalf("Recapture: %v; reference Capture: %v", rerr, cerr)
			}
			m, err := p.Seal(ctx)
			mustNil(t, err)
			for _, d := range captureDiffs(t, m, snapA, ref, snapB) {
				t.Error(d)
			}
			if fin.MappedHeld != tc.held || fin.Fallback {
				t.Errorf("finish %+v, want %d mapped file(s) re-copied through held descriptors, no fallback", fin, tc.held)
			}
			if p.held != nil || p.maps.held != nil {
				t.Error("held files not closed by Seal")
			}
		})
	}
}

// TestPrecopyPauseProportional: with 10k files in the upper dir, Recapture
// of an idle container, and of one with a slow writer, costs a small
// fraction of a full Capture.
func TestPrecopyPauseProportional(t *testing.T) {
	requireRoot(t)
	if testing.Short() {
		t.Skip("short mode")
	}
	o := bigOverlay(t, 100, 100)
	cg := newTestCgroup(t)
	startChild(t, cg, "idle", false)
	base := t.TempDir()
	opts := PrecopyOptions{Mountpoint: o.merged}
	check := func(name string, i int) {
		r := runFrozenRound(t, o, cg, base, i, opts, func() []int { return cg.pids(t) })
		for _, d := range r.diffs {
			t.Errorf("%s: %s", name, d)
		}
		t.Logf("%s: precopy %v (rounds %d %v, %s), freeze wait %v; Recapture %v (drain %v, maps %v, %d dirty, %d files) vs full Capture %v (%d entries)",
			name, r.pre.Duration.Round(time.Millisecond), r.pre.Rounds, r.pre.RoundDirty, r.pre.DataCopy, r.freezeWait.Round(time.Microsecond),
			r.fin.Recapture.Round(time.Microsecond), r.fin.Drain.Round(time.Microsecond), r.fin.MmapScan.Round(time.Microsecond),
			r.fin.DirtyEntries, r.fin.Files, r.capture.Duration.Round(time.Millisecond), r.capture.Entries)
		total := r.fin.Drain + r.fin.MmapScan + r.fin.Recapture
		if r.fin.Fallback || total > r.capture.Duration/5 {
			t.Errorf("%s: in-pause work %v (fallback %v) is not small next to a full capture (%v)", name, total, r.fin.Fallback, r.capture.Duration)
		}
		if name == "idle" && r.fin.DirtyEntries != 0 {
			t.Errorf("idle: %d dirty entries, want 0", r.fin.DirtyEntries)
		}
		cleanRound(t, base, i)
	}
	check("idle", 0)
	startChild(t, cg, "slowwriter", false, o.merged)
	time.Sleep(200 * time.Millisecond)
	check("writer 100 files/s", 1)
}

// bigOverlay makes an overlay whose upper dir holds dirs×files small files
// (0–8 KiB, avg 4 KiB), written before the mount.
func bigOverlay(t *testing.T, dirs, files int) *testOverlay {
	t.Helper()
	base := t.TempDir()
	o := &testOverlay{lower: filepath.Join(base, "lower"), upper: filepath.Join(base, "upper"), work: filepath.Join(base, "work"), merged: filepath.Join(base, "merged")}
	for _, d := range []string{o.lower, o.upper, o.work, o.merged} {
		mustNil(t, os.MkdirAll(d, 0o755))
	}
	data := pseudoRandom(8192)
	for d := 0; d < dirs; d++ {
		dir := filepath.Join(o.upper, fmt.Sprintf("d%02d", d))
		mustNil(t, os.Mkdir(dir, 0o755))
		for f := 0; f < files; f++ {
			n := (d*files + f) * 7919 % 8192
			mustNil(t, os.WriteFile(filepath.Join(dir, fmt.Sprintf("f%03d", f)), data[:n], 0o644))
		}
	}
	mountOverlay(t, o.merged, "lowerdir="+o.lower+",upperdir="+o.upper+",workdir="+o.work)
	return o
}

func median(v []int) int {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}
