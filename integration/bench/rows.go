package main

import (
	"fmt"
	"math"
	"sort"
)

// Sample is one measured snapshot (or one freeze/thaw cycle).
type Sample struct {
	Round int `json:"round"`
	// PauseUS is freeze start → thaw confirmed by the tool's own clock (the
	// shim's pause_us for seamless, the bench's clock for the others).
	PauseUS float64 `json:"pause_us"`
	// ProbeUS is the probe's gap covering the frozen interval (absent: no
	// probe ran; a measured gap is never 0).
	ProbeUS    float64 `json:"probe_us,omitempty"`
	ProbeBelow bool    `json:"probe_below_threshold,omitempty"`
	// ProbeRequestMaxUS is the longest probe gap between request and answer.
	ProbeRequestMaxUS float64 `json:"probe_request_max_us,omitempty"`
	// ProbeLeadUS and ProbeTailUS: how far that gap reaches before the
	// frozen interval and after it (probeFigure.Lead, Tail).
	ProbeLeadUS float64 `json:"probe_lead_us,omitempty"`
	ProbeTailUS float64 `json:"probe_tail_us,omitempty"`
	// LatencyUS is request → thaw confirmed.
	LatencyUS float64 `json:"latency_us"`
	// PartsUS breaks the pause down: freeze, capture (seamless: of which
	// tasks, drain, mmap_scan, recapture), thaw.
	PartsUS map[string]float64 `json:"parts_us,omitempty"`
	// Figures are what the snapshot reported besides times (seamless:
	// precopy_ms, dirty_entries, fallback, data_copy, strategy, ...).
	Figures map[string]any `json:"figures,omitempty"`
	// Checked is true when the writer ran and the capture was verified.
	Checked    bool     `json:"checked"`
	Violations []string `json:"violations,omitempty"`
}

// Row aggregates the samples of one strategy in one scenario.
type Row struct {
	Section  string `json:"section"`
	FS       string `json:"fs"`
	Scenario string `json:"scenario"`
	Load     string `json:"load"` // idle or writer
	Files    int    `json:"files"`
	Bytes    int64  `json:"bytes"`
	Strategy string `json:"strategy"`
	// Consistent is false for strategies that do not promise a
	// point-in-time capture (the floor).
	Consistent bool `json:"consistent"`
	// Capped is true when the cell stopped at its time budget.
	Capped     bool            `json:"capped,omitempty"`
	N          int             `json:"n"`
	Errors     []string        `json:"errors,omitempty"`
	Pause      Dist            `json:"pause_us"`
	Probe      Dist            `json:"probe_us"`
	ProbeBelow int             `json:"probe_below_threshold"`
	ProbeReq   Dist            `json:"probe_request_max_us"`
	Latency    Dist            `json:"latency_us"`
	Parts      map[string]Dist `json:"parts_us,omitempty"`
	PrecopyMS  Dist            `json:"precopy_ms"`
	Checked    int             `json:"checked"`
	Violations int             `json:"violations"`
	// ViolationsByPair counts violations per writer invariant (files, mmap).
	ViolationsByPair map[string]int `json:"violations_by_pair,omitempty"`
	Samples          []Sample       `json:"samples"`
}

// label is the row's scenario as shown in tables and charts.
func (r *Row) label() string {
	if r.Load == "" || r.Load == "idle" {
		return r.Scenario
	}
	return r.Scenario + "+" + r.Load
}

// aggregate recomputes the row's figures from its samples.
func (r *Row) aggregate() {
	r.N = len(r.Samples)
	var pause, probe, req, lat, pre []float64
	parts := map[string][]float64{}
	r.ProbeBelow, r.Checked, r.Violations = 0, 0, 0
	r.ViolationsByPair = map[string]int{}
	for _, s := range r.Samples {
		pause, lat = append(pause, s.PauseUS), append(lat, s.LatencyUS)
		if s.ProbeUS > 0 {
			probe, req = append(probe, s.ProbeUS), append(req, s.ProbeRequestMaxUS)
		}
		pre = append(pre, figureFloat(s.Figures, "precopy_ms"))
		for k, v := range s.PartsUS {
			parts[k] = append(parts[k], v)
		}
		if s.ProbeBelow {
			r.ProbeBelow++
		}
		r.countVerdict(s)
	}
	r.Pause, r.Probe, r.ProbeReq, r.Latency, r.PrecopyMS = distOf(pause), distOf(probe), distOf(req), distOf(lat), distOf(pre)
	r.Parts = map[string]Dist{}
	for k, v := range parts {
		r.Parts[k] = distOf(v)
	}
}

func (r *Row) countVerdict(s Sample) {
	if !s.Checked {
		return
	}
	r.Checked++
	if len(s.Violations) > 0 {
		r.Violations++
	}
	for _, v := range s.Violations {
		r.ViolationsByPair[violationPair(v)]++
	}
}

// violationPair is the invariant a violation message is about ("files:
// ..." → files).
func violationPair(msg string) string {
	for i := 0; i < len(msg); i++ {
		if msg[i] == ':' {
			return msg[:i]
		}
	}
	return "other"
}

// figureFloat reads a numeric figure, NaN when absent.
func figureFloat(f map[string]any, key string) float64 {
	switch v := f[key].(type) {
	case float64:
		return v
	case int64:
		return float64(v)
	case int:
		return float64(v)
	}
	return math.NaN()
}

// verdictText renders "violations/checked" ("-" without a writer).
func (r *Row) verdictText() string {
	if r.Checked == 0 {
		return "-"
	}
	s := fmt.Sprintf("%d/%d", r.Violations, r.Checked)
	if r.Violations > 0 {
		var pairs []string
		for k := range r.ViolationsByPair {
			pairs = append(pairs, k)
		}
		sort.Strings(pairs)
		s += " ("
		for i, k := range pairs {
			if i > 0 {
				s += ","
			}
			s += fmt.Sprintf("%s %d", k, r.ViolationsByPair[k])
		}
		s += ")"
	}
	return s
}
