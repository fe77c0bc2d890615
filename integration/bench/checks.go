package main

import (
	"fmt"
	"io"
	"text/tabwriter"
)

// Check is one of issue 3's targets evaluated on this run's rows.
type Check struct {
	Target string `json:"target"`
	Value  string `json:"value"`
	Want   string `json:"want"`
	// Result is PASS, FAIL, N/A (rows missing) or INFO (reported, no target).
	Result string `json:"result"`
}

// rowIndex finds rows by filesystem, scenario, load and strategy.
type rowIndex map[string]*Row

func indexRows(sections map[string][]Row) rowIndex {
	idx := rowIndex{}
	for _, rows := range sections {
		for i := range rows {
			r := &rows[i]
			idx[r.FS+"/"+r.Scenario+"/"+r.Load+"/"+r.Strategy] = r
		}
	}
	return idx
}

func (x rowIndex) get(fs, scenario, load, strategy string) *Row {
	r := x[fs+"/"+scenario+"/"+load+"/"+strategy]
	if r == nil || r.N == 0 {
		return nil
	}
	return r
}

// minTargetSnapshots is the sample size for the headline targets.
const minTargetSnapshots = 50

// targetChecks evaluates the targets (quoted in each Target).
func targetChecks(sections map[string][]Row) []Check {
	x := indexRows(sections)
	var out []Check
	for _, sc := range []string{"10k", "1GiB"} {
		out = append(out, headlineChecks(x, sc)...)
	}
	for _, load := range []string{loadIdle, loadWriter} {
		small, big := x.get(fsExt4, "1k", load, "seamless"), x.get(fsExt4, "50k", load, "seamless")
		out = append(out, ratioCheck(fmt.Sprintf("size independence (%s): seamless probe p50 at 50k <= 1.5x at 1k", load),
			probeP50(big), probeP50(small), "50k/1k", 1.5, false))
	}
	for _, load := range []string{loadIdle, loadWriter} {
		s, t := x.get(fsExt4, "10k", load, "seamless"), x.get(fsExt4, "10k", load, "commit-tar")
		out = append(out, ratioCheck(fmt.Sprintf("vs commit tools (10k, %s): commit-tar probe p50 >= 100x seamless", load),
			probeP50(t), probeP50(s), "tar/seamless", 100, true))
	}
	for _, w := range freezeWorkloads {
		lib, ours := x.get(fsExt4, w.name, loadIdle, "libcontainer-v2"), x.get(fsExt4, w.name, loadIdle, "ours-v2")
		out = append(out, ratioCheck("freezer (cgroup v2, "+w.name+"): libcontainer Freeze p50 >= 10x ours",
			freezeP50(lib), freezeP50(ours), "lib/ours", 10, true))
	}
	out = append(out, mmapCheck(x))
	out = append(out, xfsChecks(x)...)
	out = append(out, uploadChecks(x)...)
	return out
}

// headlineChecks are the 10k / 1 GiB writer targets.
func headlineChecks(x rowIndex, sc string) []Check {
	s, f := x.get(fsExt4, sc, loadWriter, "seamless"), x.get(fsExt4, sc, loadWriter, "floor")
	p := sc + "+writer: seamless "
	out := []Check{
		ratioCheck(p+"probe p50 <= 1.5x floor p50", probeP50(s), probeP50(f), "seamless/floor", 1.5, false),
		limitCheck(p+"probe p50 <= 500µs", probeP50(s), 500),
		limitCheck(p+"probe p99 <= 2ms", probeP99(s), 2000),
		consistencyCheck(p+"0 violations over >= 50 snapshots", s),
	}
	c := Check{Target: sc + "+writer: floor violations (expected)", Want: "> 0", Result: "N/A"}
	if f != nil {
		c.Value, c.Result = fmt.Sprintf("%d/%d", f.Violations, f.Checked), "INFO"
	}
	return append(out, c)
}

type stat struct {
	v  float64
	ok bool
}

func probeP50(r *Row) stat { return rowStat(r, func(r *Row) Dist { return r.Probe }, false) }
func probeP99(r *Row) stat { return rowStat(r, func(r *Row) Dist { return r.Probe }, true) }
func freezeP50(r *Row) stat {
	return rowStat(r, func(r *Row) Dist { return r.Parts["freeze"] }, false)
}

func rowStat(r *Row, d func(*Row) Dist, p99 bool) stat {
	if r == nil || d(r).N == 0 {
		return stat{}
	}
	if p99 {
		return stat{d(r).P99, true}
	}
	return stat{d(r).P50, true}
}

// ratioCheck compares a/b with limit: at least (atLeast) or at most.
func ratioCheck(target string, a, b stat, what string, limit float64, atLeast bool) Check {
	want := fmt.Sprintf("%s <= %g", what, limit)
	if atLeast {
		want = fmt.Sprintf("%s >= %g", what, limit)
	}
	c := Check{Target: target, Want: want, Result: "N/A"}
	if !a.ok || !b.ok || b.v <= 0 {
		return c
	}
	ratio := a.v / b.v
	c.Value = fmt.Sprintf("%s / %s = %.2f", fmtUS(a.v, true), fmtUS(b.v, true), ratio)
	c.Result = passFail(ratio <= limit)
	if atLeast {
		c.Result = passFail(ratio >= limit)
	}
	return c
}

func limitCheck(target string, v stat, limitUS float64) Check {
	c := Check{Target: target, Want: "<= " + fmtUS(limitUS, true), Result: "N/A"}
	if v.ok {
		c.Value, c.Result = fmtUS(v.v, true), passFail(v.v <= limitUS)
	}
	return c
}

func consistencyCheck(target string, r *Row) Check {
	c := Check{Target: target, Want: fmt.Sprintf("0/>=%d", minTargetSnapshots), Result: "N/A"}
	if r != nil {
		c.Value = fmt.Sprintf("%d/%d", r.Violations, r.Checked)
		c.Result = passFail(r.Violations == 0 && r.Checked >= minTargetSnapshots && len(r.Errors) == 0)
	}
	return c
}

// mmapCheck: captures must hold the content written through a shared
// mapping at the frozen instant (the mmap pair), for every seamless row.
func mmapCheck(x rowIndex) Check {
	c := Check{Target: "mmap writer: seamless captures keep MAP_SHARED stores (mmap pair violations)", Want: "0", Result: "N/A"}
	bad, checked := 0, 0
	for _, r := range x {
		if r.Strategy == "seamless" && r.Load == loadWriter {
			bad += r.ViolationsByPair["mmap"]
			checked += r.Checked
		}
	}
	if checked > 0 {
		c.Value, c.Result = fmt.Sprintf("%d/%d", bad, checked), passFail(bad == 0)
	}
	return c
}

// xfsChecks report pre-copy times on XFS next to ext4's.
func xfsChecks(x rowIndex) []Check {
	var out []Check
	for _, sc := range []string{"10k", "1GiB"} {
		e, f := x.get(fsExt4, sc, loadWriter, "seamless"), x.get(fsXFS, sc, loadWriter, "seamless")
		if f == nil {
			continue
		}
		out = append(out, Check{
			Target: sc + "+writer: seamless pre-copy p50, ext4 vs XFS (reflink)",
			Value: fmt.Sprintf("%s vs %s (request->thaw p50 %s vs %s)", precopyP50(e), precopyP50(f),
				latencyP50(e), latencyP50(f)),
			Want: "reported", Result: "INFO",
		})
	}
	return out
}

func precopyP50(r *Row) string {
	if r == nil {
		return "-"
	}
	if r.PrecopyMS.N == 0 {
		return "not reported"
	}
	return fmt.Sprintf("%.0fms", r.PrecopyMS.P50)
}

func latencyP50(r *Row) string {
	if r == nil {
		return "-"
	}
	return r.Latency.p50()
}

func passFail(ok bool) string {
	if ok {
		return "PASS"
	}
	return "FAIL"
}

// checksTable prints the checks.
func checksTable(w io.Writer, checks []Check) {
	fmt.Fprintln(w, "\n== targets (issue 3) ==")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "RESULT\tTARGET\tVALUE\tWANT")
	for _, c := range checks {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", c.Result, c.Target, c.Value, c.Want)
	}
	tw.Flush()
}
