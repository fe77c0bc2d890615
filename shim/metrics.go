package shim

import (
	"fmt"
	"io"
	"net/http"
	"sort"
	"strconv"
	"sync"

	"github.com/seamless-snapshot/seamless/snapshot"
	"github.com/seamless-snapshot/seamless/uploader"
)

// Metric names served on GET /metrics.
const (
	metricSnapshotsTotal = "seamless_snapshots_total"
	metricSnapshots      = "seamless_snapshots"
	metricPause          = "seamless_pause_seconds"
	metricPushedBytes    = "seamless_pushed_bytes_total"
	metricUploadDuration = "seamless_upload_duration_seconds"
)

// Outcomes counted by seamless_snapshots_total.
const (
	outcomeCaptured      = "captured"
	outcomeCaptureFailed = "capture_failed"
	outcomeDone          = "done"
	outcomeUploadFailed  = "upload_failed"
)

// Histogram buckets, in seconds.
var (
	pauseBuckets  = []float64{50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1, 2.5}
	uploadBuckets = []float64{0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600}
)

// metrics is the shim's Prometheus endpoint. Everything comes from the
// state files of the container's snapshots, read at each scrape: the shim
// writes captures' records, the uploaders write theirs. Counters and
// histograms only grow: each event is counted once, when first seen, and
// stays counted when gc removes its snapshot.
type metrics struct {
	store     snapshot.Store
	container string

	mu          sync.Mutex
	counted     map[string]bool  // events already counted: "<id> <what>"
	outcomes    map[string]int64 // seamless_snapshots_total by outcome
	pushed      map[string]int64 // pushed bytes last seen per snapshot
	pushedTotal int64
	pause       histogram
	upload      histogram
}

// newMetrics returns the /metrics handler for container's snapshots.
func newMetrics(store snapshot.Store, container string) *metrics {
	return &metrics{
		store: store, container: container,
		counted:  map[string]bool{},
		outcomes: map[string]int64{outcomeCaptured: 0, outcomeCaptureFailed: 0, outcomeDone: 0, outcomeUploadFailed: 0},
		pushed:   map[string]int64{},
		pause:    newHistogram(pauseBuckets),
		upload:   newHistogram(uploadBuckets),
	}
}

// ServeHTTP writes the metrics in the Prometheus text format (0.0.4).
func (m *metrics) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	all, err := m.store.List()
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	m.write(w, all)
}

// write folds the states of the container's snapshots into the counters
// and writes every metric.
func (m *metrics) write(w io.Writer, all []*snapshot.State) {
	m.mu.Lock()
	defer m.mu.Unlock()
	current := map[snapshot.Phase]int64{}
	for _, st := range all {
		if st.Container != m.container {
			continue
		}
		phase := st.Phase
		if uploader.Interrupted(st) {
			phase = snapshot.PhaseInterrupted
		}
		current[phase]++
		m.observe(st)
	}

	fmt.Fprintf(w, "# HELP %s Snapshots of this container by outcome: captured (sealed, uploader started), capture_failed, done (pushed), upload_failed (once per uploader run).\n", metricSnapshotsTotal)
	fmt.Fprintf(w, "# TYPE %s counter\n", metricSnapshotsTotal)
	for _, o := range sortedKeys(m.outcomes) {
		fmt.Fprintf(w, "%s{outcome=%q} %d\n", metricSnapshotsTotal, o, m.outcomes[o])
	}
	fmt.Fprintf(w, "# HELP %s Snapshots of this container on disk by state (interrupted: the uploader died mid-way).\n", metricSnapshots)
	fmt.Fprintf(w, "# TYPE %s gauge\n", metricSnapshots)
	for _, p := range []snapshot.Phase{snapshot.PhaseCapturing, snapshot.PhaseCaptured, snapshot.PhaseBuilding, snapshot.PhasePushing,
		snapshot.PhaseDone, snapshot.PhaseFailed, snapshot.PhaseInterrupted} {
		fmt.Fprintf(w, "%s{state=%q} %d\n", metricSnapshots, p, current[p])
	}
	m.pause.write(w, metricPause, "Time the container was frozen for a capture.")
	fmt.Fprintf(w, "# HELP %s Bytes sent to registries by the uploads of this container's snapshots (blobs the registry had are not sent).\n", metricPushedBytes)
	fmt.Fprintf(w, "# TYPE %s counter\n", metricPushedBytes)
	fmt.Fprintf(w, "%s %d\n", metricPushedBytes, m.pushedTotal)
	m.upload.write(w, metricUploadDuration, "Time from the start of a snapshot's upload to its pushed manifest (retries included).")
}

// observe counts what st shows that was not counted yet.
func (m *metrics) observe(st *snapshot.State) {
	once := func(what string) bool {
		key := st.ID + " " + what
		if m.counted[key] {
			return false
		}
		m.counted[key] = true
		return true
	}
	if st.PauseUS > 0 && once("pause") {
		m.pause.observe(float64(st.PauseUS) / 1e6)
	}
	sealed := st.Phase != snapshot.PhaseCapturing && !(st.Phase == snapshot.PhaseFailed && st.Upload.Runs == 0 && st.UploaderPID == 0)
	if sealed && once("captured") {
		m.outcomes[outcomeCaptured]++
	}
	if !sealed && st.Phase == snapshot.PhaseFailed && once("capture_failed") {
		m.outcomes[outcomeCaptureFailed]++
	}
	run := strconv.Itoa(st.Upload.Runs)
	switch {
	case st.Phase == snapshot.PhaseDone && once("done"):
		m.outcomes[outcomeDone]++
		if !st.Upload.StartedAt.IsZero() && st.Upload.FinishedAt.After(st.Upload.StartedAt) {
			m.upload.observe(st.Upload.FinishedAt.Sub(st.Upload.StartedAt).Seconds())
		}
	case st.Phase == snapshot.PhaseFailed && st.Upload.Runs > 0 && once("upload_failed "+run):
		m.outcomes[outcomeUploadFailed]++
	}
	if d := st.Upload.PushedBytes - m.pushed[st.ID]; d > 0 {
		m.pushed[st.ID] = st.Upload.PushedBytes
		m.pushedTotal += d
	}
}

// histogram is a Prometheus histogram: cumulative bucket counts, sum, count.
type histogram struct {
	bounds []float64
	counts []int64 // counts[i]: observations <= bounds[i] (not cumulative)
	sum    float64
	count  int64
}

func newHistogram(bounds []float64) histogram {
	return histogram{bounds: bounds, counts: make([]int64, len(bounds))}
}

func (h *histogram) observe(v float64) {
	h.sum += v
	h.count++
	i := sort.SearchFloat64s(h.bounds, v) // first bound >= v
	if i < len(h.bounds) {
		h.counts[i]++
	}
}

func (h *histogram) write(w io.Writer, name, help string) {
	fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name)
	var cum int64
	for i, b := range h.bounds {
		cum += h.counts[i]
		fmt.Fprintf(w, "%s_bucket{le=%q} %d\n", name, formatFloat(b), cum)
	}
	fmt.Fprintf(w, "%s_bucket{le=\"+Inf\"} %d\n", name, h.count)
	fmt.Fprintf(w, "%s_sum %s\n", name, formatFloat(h.sum))
	fmt.Fprintf(w, "%s_count %d\n", name, h.count)
}

func formatFloat(f float64) string { return strconv.FormatFloat(f, 'g', -1, 64) }

func sortedKeys(m map[string]int64) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
