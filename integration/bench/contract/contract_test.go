package contract

import (
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestRingRoundTrip(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ring")
	w, err := CreateRing(path, 4, 10*time.Microsecond, 1)
	if err != nil {
		t.Fatal(err)
	}
	r, err := OpenRing(path)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if r.Threshold() != 10*time.Microsecond {
		t.Errorf("threshold %v", r.Threshold())
	}
	w.Add(Gap{Start: 10, End: 20})
	w.Add(Gap{Start: 30, End: 45})
	w.Beat(50)
	gaps, lost := r.Read()
	if lost != 0 || len(gaps) != 2 || gaps[1] != (Gap{30, 45}) || gaps[1].Len() != 15 {
		t.Fatalf("read %v lost %d", gaps, lost)
	}
	if r.Heartbeat() != 50 {
		t.Errorf("heartbeat %d", r.Heartbeat())
	}
	for i := range 6 { // laps the 4-slot ring
		w.Add(Gap{Start: int64(100 + i), End: int64(200 + i)})
	}
	// Two entries were overwritten; the oldest slot still readable is the
	// one the next Add rewrites, so it is dropped too.
	gaps, lost = r.Read()
	if lost != 3 || len(gaps) != 3 || gaps[0].Start != 103 || gaps[2].Start != 105 {
		t.Fatalf("after lapping: %v lost %d", gaps, lost)
	}
	if gaps, _ := r.Read(); len(gaps) != 0 {
		t.Errorf("read again: %v", gaps)
	}
}

func TestGapOverlaps(t *testing.T) {
	g := Gap{Start: 10, End: 20}
	for _, c := range []struct {
		a, b int64
		want bool
	}{{0, 9, false}, {0, 10, true}, {12, 13, true}, {20, 30, true}, {21, 30, false}} {
		if got := g.Overlaps(c.a, c.b); got != c.want {
			t.Errorf("Overlaps(%d, %d) = %v", c.a, c.b, got)
		}
	}
}

func TestClockMatchesWall(t *testing.T) {
	c := NewClock()
	now := time.Now()
	if d := c.FromWall(now) - c.Now(); d > int64(time.Millisecond) || d < -int64(time.Millisecond) {
		t.Errorf("FromWall(now) is %v off Now()", time.Duration(d))
	}
	if d := c.ToWall(c.FromWall(now)).Sub(now.Round(0)); d != 0 {
		t.Errorf("ToWall(FromWall(t)) is %v off", d)
	}
}

// state builds a writer capture with counter a for A and M, b for B and N,
// and the pool stamped with the pool latest stamps up to top.
func state(a, b, top uint64, pool int) map[string][]byte {
	files := map[string][]byte{FileA: FormatCounter(a), FileB: FormatCounter(b), FileM: FormatCounter(a), FileN: FormatCounter(b)}
	for k := top - uint64(pool) + 1; k <= top; k++ {
		files[PoolFile(int(k%uint64(pool)))] = append(FormatCounter(k), "random tail"...)
	}
	return files
}

func TestVerify(t *testing.T) {
	cases := []struct {
		name  string
		files map[string][]byte
		want  []string // invariant names broken
	}{
		{"between ticks", state(500, 500, 500, 100), nil},
		{"after A", state(501, 500, 500, 100), nil},
		{"B ahead", state(500, 501, 500, 100), []string{"files", "mmap"}},
		{"A two ahead", state(502, 500, 500, 100), []string{"files", "mmap", "pool"}},
		{"pool ahead of A", state(500, 500, 503, 100), []string{"pool"}},
		{"pool far behind A", state(500, 500, 450, 100), []string{"pool"}},
	}
	for _, c := range cases {
		got := Verify(c.files)
		if len(got) != len(c.want) {
			t.Errorf("%s: %q, want %v broken", c.name, got, c.want)
			continue
		}
		for i, w := range c.want {
			if !strings.HasPrefix(got[i], w+":") {
				t.Errorf("%s: %q, want %v broken", c.name, got, c.want)
			}
		}
	}
	files := state(500, 500, 500, 100)
	delete(files, FileB)
	if got := Verify(files); len(got) != 1 || !strings.Contains(got[0], "inv-b missing") {
		t.Errorf("missing B: %q", got)
	}
}
