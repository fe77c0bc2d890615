package shim

import (
	"bufio"
	"net/http"
	"net/http/httptest"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/seamless-snapshot/seamless/snapshot"
)

// scrape fetches /metrics and returns sample values by "name{labels}",
// checking that every line is a comment or a well-formed sample.
func scrape(t *testing.T, h http.Handler) map[string]float64 {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != 200 || !strings.HasPrefix(rec.Header().Get("Content-Type"), "text/plain; version=0.0.4") {
		t.Fatalf("GET /metrics: %d %q", rec.Code, rec.Header().Get("Content-Type"))
	}
	sample := regexp.MustCompile(`^([a-z_]+(?:\{[a-z_]+="[^"]*"\})?) (\S+)$`)
	out := map[string]float64{}
	sc := bufio.NewScanner(rec.Body)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "# HELP ") || strings.HasPrefix(line, "# TYPE ") {
			continue
		}
		m := sample.FindStringSubmatch(line)
		if m == nil {
			t.Fatalf("malformed line %q", line)
		}
		v, err := strconv.ParseFloat(m[2], 64)
		if err != nil {
			t.Fatalf("line %q: %v", line, err)
		}
		out[m[1]] = v
	}
	return out
}

func TestMetrics(t *testing.T) {
	store := snapshot.Store{Root: t.TempDir()}
	save := func(st *snapshot.State) {
		t.Helper()
		if _, err := os.Stat(store.Dir(st.ID)); err != nil {
			if _, err := store.Create(st.ID); err != nil {
				t.Fatal(err)
			}
		}
		if err := store.Save(st); err != nil {
			t.Fatal(err)
		}
	}
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	done := &snapshot.State{ID: "s1", Container: "c1", Phase: snapshot.PhaseDone, PauseUS: 800, UploaderPID: 1,
		Upload: snapshot.UploadFigures{Runs: 1, StartedAt: t0, FinishedAt: t0.Add(3 * time.Second), PushedBytes: 1000}}
	save(done)
	save(&snapshot.State{ID: "s2", Container: "c1", Phase: snapshot.PhaseFailed, Error: "freeze timed out"})
	failedUpload := &snapshot.State{ID: "s3", Container: "c1", Phase: snapshot.PhaseFailed, PauseUS: 40, UploaderPID: 1,
		Upload: snapshot.UploadFigures{Runs: 1, PushedBytes: 300}}
	save(failedUpload)
	save(&snapshot.State{ID: "s4", Container: "c1", Phase: snapshot.PhasePushing, PauseUS: 30_000, UploaderPID: 1 << 22}) // dead uploader
	save(&snapshot.State{ID: "s5", Container: "other", Phase: snapshot.PhaseDone, PauseUS: 5, Upload: snapshot.UploadFigures{PushedBytes: 1 << 30}})

	m := newMetrics(store, "c1")
	got := scrape(t, m)
	want := map[string]float64{
		`seamless_snapshots_total{outcome="captured"}`:       3,
		`seamless_snapshots_total{outcome="capture_failed"}`: 1,
		`seamless_snapshots_total{outcome="done"}`:           1,
		`seamless_snapshots_total{outcome="upload_failed"}`:  1,
		`seamless_snapshots{state="done"}`:                   1,
		`seamless_snapshots{state="failed"}`:                 2,
		`seamless_snapshots{state="interrupted"}`:            1,
		`seamless_snapshots{state="pushing"}`:                0,
		`seamless_pause_seconds_bucket{le="5e-05"}`:          1,
		`seamless_pause_seconds_bucket{le="0.001"}`:          2,
		`seamless_pause_seconds_bucket{le="0.025"}`:          2,
		`seamless_pause_seconds_bucket{le="0.05"}`:           3,
		`seamless_pause_seconds_bucket{le="+Inf"}`:           3,
		`seamless_pause_seconds_count`:                       3,
		`seamless_pause_seconds_sum`:                         0.03084,
		`seamless_pushed_bytes_total`:                        1300,
		`seamless_upload_duration_seconds_bucket{le="2"}`:    0,
		`seamless_upload_duration_seconds_bucket{le="5"}`:    1,
		`seamless_upload_duration_seconds_count`:             1,
		`seamless_upload_duration_seconds_sum`:               3,
	}
	check := func(want map[string]float64) {
		t.Helper()
		for k, v := range want {
			if g, ok := got[k]; !ok || g < v-1e-9 || g > v+1e-9 {
				t.Errorf("%s = %v (present %v), want %v", k, g, ok, v)
			}
		}
	}
	check(want)

	// The failed upload is retried and pushed; the done one is collected.
	failedUpload.Phase, failedUpload.Upload.Runs, failedUpload.Upload.PushedBytes = snapshot.PhaseDone, 2, 800
	failedUpload.Upload.StartedAt, failedUpload.Upload.FinishedAt = t0, t0.Add(90*time.Second)
	save(failedUpload)
	os.RemoveAll(store.Dir("s1"))
	got = scrape(t, m)
	check(map[string]float64{
		`seamless_snapshots_total{outcome="captured"}`:      3, // each snapshot once
		`seamless_snapshots_total{outcome="done"}`:          2,
		`seamless_snapshots_total{outcome="upload_failed"}`: 1,
		`seamless_snapshots{state="done"}`:                  1, // s1 is gone, s3 is done
		`seamless_pause_seconds_count`:                      3,
		`seamless_pushed_bytes_total`:                       1800, // counters never go down
		`seamless_upload_duration_seconds_count`:            2,
		`seamless_upload_duration_seconds_bucket{le="60"}`:  1,
		`seamless_upload_duration_seconds_bucket{le="120"}`: 2,
	})
}
