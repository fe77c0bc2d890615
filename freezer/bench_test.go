package freezer

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// benchSpacing separates iterations: a freeze right after a thaw finds
// tasks that never ran in between and is confirmed for free, and v2 change
// notifications are rate-limited to one per ~12 ms. Snapshots are seconds
// apart.
const benchSpacing = 50 * time.Millisecond

// BenchmarkFreezeThaw compares this package's Freezer with libcontainer's
// managers (what runc uses) on an idle one-task cgroup (sleep 1000): v1
// with and without the anchor, and v2. The two run interleaved, one
// iteration each in turn, so machine noise hits both alike. Reported: p50
// and p99 of freeze (request → confirmed frozen) and thaw, in µs. Run with
// -benchtime=200x; every iteration sleeps 2 × benchSpacing.
func BenchmarkFreezeThaw(b *testing.B) {
	for _, c := range []struct {
		name   string
		kind   Kind
		anchor bool
	}{{"v1", V1, false}, {"v1+anchor", V1, true}, {"v2", V2, false}} {
		b.Run(c.name, func(b *testing.B) {
			root := "/sys/fs/cgroup/freezer"
			if c.kind == V2 {
				var err error
				if root, err = unifiedMount(); err != nil {
					b.Skip(err)
				}
			}
			dir, _ := cgroupWith(b, root, "sleep", "1000")
			if c.anchor {
				testAnchor(b)
			}
			benchFreezeThaw(b, c.kind, dir)
		})
	}
}

func benchFreezeThaw(b *testing.B, kind Kind, dir string) {
	f, err := Open(kind, dir)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	var ours, lib samples
	b.ResetTimer()
	for range b.N {
		b.StopTimer()
		time.Sleep(benchSpacing)
		b.StartTimer()
		start := time.Now()
		if _, err := f.Freeze(context.Background(), time.Second); err != nil {
			b.Fatal(err)
		}
		frozen := time.Now()
		if err := f.Thaw(); err != nil {
			b.Fatal(err)
		}
		ours.add(frozen.Sub(start), time.Since(frozen))

		b.StopTimer()
		time.Sleep(benchSpacing)
		b.StartTimer()
		freeze, thaw, err := LibcontainerFreezeThaw(kind, dir)
		if err != nil {
			b.Fatal(err)
		}
		lib.add(freeze, thaw)
	}
	b.StopTimer()
	ours.report(b, "ours")
	lib.report(b, "lib")
	if kind == V1 {
		if others := otherFrozenV1(dir); len(others) > 0 {
			b.Logf("other frozen v1 cgroups act as an anchor for the whole run: %v", others)
		}
	}
}

// otherFrozenV1 lists the v1 freezer cgroups other than self that are not
// THAWED: any of them keeps the kernel's freezer static key enabled.
func otherFrozenV1(self string) []string {
	var out []string
	filepath.WalkDir("/sys/fs/cgroup/freezer", func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() || p == self {
			return nil
		}
		if b, err := os.ReadFile(filepath.Join(p, "freezer.state")); err == nil && strings.TrimSpace(string(b)) != "THAWED" {
			out = append(out, p)
		}
		return nil
	})
	return out
}

// samples collects freeze and thaw durations.
type samples struct{ freeze, thaw []time.Duration }

func (s *samples) add(freeze, thaw time.Duration) {
	s.freeze = append(s.freeze, freeze)
	s.thaw = append(s.thaw, thaw)
}

func (s *samples) report(b *testing.B, who string) {
	for _, m := range []struct {
		name string
		d    []time.Duration
	}{{"freeze", s.freeze}, {"thaw", s.thaw}} {
		b.ReportMetric(percentileUS(m.d, 50), fmt.Sprintf("%s-%s-p50-µs", who, m.name))
		b.ReportMetric(percentileUS(m.d, 99), fmt.Sprintf("%s-%s-p99-µs", who, m.name))
	}
}

// percentileUS is the p-th percentile of d in microseconds (nearest rank).
func percentileUS(d []time.Duration, p int) float64 {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	i := (len(s)*p + 99) / 100
	return float64(s[max(i-1, 0)]) / float64(time.Microsecond)
}
