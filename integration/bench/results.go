package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"
)

// Results is everything a run produced: results.json.
type Results struct {
	Started  time.Time        `json:"started"`
	Finished time.Time        `json:"finished"`
	Host     Host             `json:"host"`
	Options  Options          `json:"options"`
	Sections map[string][]Row `json:"sections"`
	Checks   []Check          `json:"checks"`
	Notes    []string         `json:"notes"`
	order    []string
}

// Host describes the machine the numbers come from.
type Host struct {
	Kernel      string `json:"kernel"`
	CPUs        int    `json:"cpus"`
	Go          string `json:"go"`
	Clocksource string `json:"clocksource"`
	LoadStart   string `json:"loadavg_start"`
	LoadEnd     string `json:"loadavg_end"`
}

// notes explain how to read the numbers; they go to summary.txt and JSON.
var notes = []string{
	"pause = freeze requested -> thaw confirmed, by the tool's own clock (seamless: the shim's pause_us; others: the bench's clock around the same calls).",
	"probe = the gap seen by a process spinning on CLOCK_MONOTONIC inside the container that covers the frozen interval: what the container's processes feel. It occupies one of the machine's CPUs for the whole run, so the shim, the writer and everything else share the rest.",
	"request->thaw = from sending the request (seamless: POST /v1/snapshots, including pre-copy) to the thaw confirmed. results.json also has probe_request_max_us: the longest probe gap anywhere between request and answer (pre-copy competing for the CPU shows there).",
	"violations = captures breaking the writer's invariants / captures checked, only with the writer (files: B <= A <= B+1, both written by pwrite; mmap: N <= M <= N+1, M written through a MAP_SHARED mapping; pool: A-P <= stamp <= A for each of the P files the writer rewrites in turn, which catches a capture made over time whatever the directory order).",
	"floor (freeze -> nothing -> thaw) is inconsistent by design: its verdict comes from a copy of the writer's directory made from the live upper right after the thaw, as the torn prototype captured. full-copy = freeze -> overlay.Capture of the whole upper -> thaw; commit-tar = freeze -> walk + tar (whiteouts, opaque dirs, hardlinks) + gzip + fsync of the layer, as docker/nerdctl commit build it, push excluded -> thaw.",
	"freezer: freeze -> thaw alone, ours vs libcontainer's managers (runc's), round-robin, on an idle one-process cgroup (the issue's reference; no probe there), on the pause section's container (sleeping init + spinning probe) and on a container of 10 spinning and 10 sleeping processes (like a dev container's shells, servers and watchers). libcontainer's v2 Freeze sleeps 10 ms whenever its first read of cgroup.events comes before the last task froze, so its p50 is either ~0.2 ms or ~10 ms depending on the workload and the run.",
	"floor and seamless freeze, work and thaw through freezer.Pause: one locked SCHED_FIFO thread from the freeze request to the confirmed thaw.",
	"Strategies run round-robin on the same container. Seamless and the floor in the 10k/1GiB writer scenarios take --snapshots after a discarded warm-up; every other cell stops at --cell-time once it has 2 samples (N shown with c).",
	"p99 is nearest-rank: with fewer than 100 samples it is the maximum.",
}

func newResults(opts Options) *Results {
	return &Results{Started: time.Now().UTC(), Host: hostInfo(), Options: opts, Sections: map[string][]Row{}, Notes: notes}
}

func (r *Results) add(section string, rows []Row) {
	if _, ok := r.Sections[section]; !ok {
		r.order = append(r.order, section)
	}
	r.Sections[section] = append(r.Sections[section], rows...)
}

func hostInfo() Host {
	var u unix.Utsname
	unix.Uname(&u) //nolint:errcheck // best effort
	return Host{
		Kernel:      unix.ByteSliceToString(u.Release[:]),
		CPUs:        runtime.NumCPU(),
		Go:          runtime.Version(),
		Clocksource: readTrim("/sys/devices/system/clocksource/clocksource0/current_clocksource"),
		LoadStart:   readTrim("/proc/loadavg"),
	}
}

func readTrim(p string) string {
	b, _ := os.ReadFile(p)
	return strings.TrimSpace(string(b))
}

// write prints the report and stores results.json, summary.txt and the
// chart in dir.
func (r *Results) write(dir string) error {
	r.Finished, r.Host.LoadEnd = time.Now().UTC(), readTrim("/proc/loadavg")
	r.Checks = targetChecks(r.Sections)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("results dir: %w", err)
	}
	var summary bytes.Buffer
	r.printReport(io.MultiWriter(os.Stdout, &summary))
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("encode results: %w", err)
	}
	files := map[string][]byte{"results.json": data, "summary.txt": summary.Bytes()}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			return fmt.Errorf("write %s: %w", name, err)
		}
	}
	var chartRows []Row
	for _, row := range append(append([]Row(nil), r.Sections["pause"]...), r.Sections["freezer"]...) {
		if row.Probe.N > 0 {
			chartRows = append(chartRows, row)
		}
	}
	if len(chartRows) > 0 {
		if err := drawChart(filepath.Join(dir, "pause.png"), chartRows); err != nil {
			return err
		}
	}
	logf("results: %s/{results.json,summary.txt,pause.png}", dir)
	return nil
}

// printReport writes the tables, the target checks and the notes.
func (r *Results) printReport(w io.Writer) {
	fmt.Fprintf(w, "\nseamless benchmark, %s, kernel %s, %d CPUs, %s, clocksource %s, load %s -> %s\n",
		r.Started.Format(time.RFC3339), r.Host.Kernel, r.Host.CPUs, r.Host.Go, r.Host.Clocksource, r.Host.LoadStart, r.Host.LoadEnd)
	for _, name := range r.order {
		fmt.Fprintf(w, "\n== %s ==\n", name)
		switch name {
		case "freezer":
			freezerTable(w, r.Sections[name])
		case "upload":
			uploadTable(w, r.Sections[name])
		default:
			pauseTable(w, r.Sections[name])
		}
	}
	checksTable(w, r.Checks)
	if r.Options.Quick {
		fmt.Fprintln(w, "--quick: uppers shrunk (see UPPER) and few snapshots: a smoke test of the harness, not the issue's measurement.")
	}
	fmt.Fprintln(w, "\nNotes:")
	for _, n := range r.Notes {
		fmt.Fprintf(w, "  - %s\n", n)
	}
}

// pauseTable prints one line per strategy and scenario.
func pauseTable(w io.Writer, rows []Row) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "FS\tSCENARIO\tUPPER\tSTRATEGY\tN\tPAUSE p50\tp99\tPROBE p50\tp99\tREQ->THAW p50\tVIOLATIONS\tFREEZE p50\tCAPTURE p50\tTHAW p50\tPRECOPY p50\tERR")
	for i := range rows {
		r := &rows[i]
		name := r.Strategy
		if !r.Consistent {
			name += "*"
		}
		n := fmt.Sprint(r.N)
		if r.Capped {
			n += "c"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\n",
			r.FS, r.label(), upperText(r), name, n, r.Pause.p50(), r.Pause.p99(), r.Probe.p50(), r.Probe.p99(), r.Latency.p50(),
			r.verdictText(), r.Parts["freeze"].p50(), r.Parts["capture"].p50(), r.Parts["thaw"].p50(), precopyText(r), len(r.Errors))
	}
	tw.Flush()
	fmt.Fprintln(w, "* inconsistent by design; N: measured snapshots (c: stopped at --cell-time); ERR: failed snapshots and problems (see errors in results.json)")
}

// upperText is what fill put in the upper dir: files x size.
func upperText(r *Row) string {
	if r.Files == 0 {
		return "-"
	}
	size := r.Bytes / int64(r.Files)
	switch {
	case size >= 1<<20:
		return fmt.Sprintf("%dx%dMiB", r.Files, size>>20)
	case size >= 1<<10:
		return fmt.Sprintf("%dx%dKiB", r.Files, size>>10)
	}
	return fmt.Sprintf("%dx%dB", r.Files, size)
}

func precopyText(r *Row) string {
	if r.PrecopyMS.N == 0 {
		return "-"
	}
	return fmt.Sprintf("%.0fms", r.PrecopyMS.P50)
}

// freezerTable prints one line per freezer mechanism.
func freezerTable(w io.Writer, rows []Row) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "WORKLOAD\tMECHANISM\tN\tFREEZE p50\tp99\tmean\tTHAW p50\tp99\tPAUSE p50\tPROBE p50\tp99\tERR")
	for _, r := range rows {
		fz := r.Parts["freeze"]
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\n", r.Scenario, r.Strategy, r.N,
			fz.p50(), fz.p99(), fmtUS(fz.Mean, fz.N > 0), r.Parts["thaw"].p50(), r.Parts["thaw"].p99(),
			r.Pause.p50(), r.Probe.p50(), r.Probe.p99(), len(r.Errors))
	}
	tw.Flush()
}
