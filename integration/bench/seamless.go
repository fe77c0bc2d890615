package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/seamless-snapshot/seamless/integration/testenv"
	"github.com/seamless-snapshot/seamless/overlay"
	"github.com/seamless-snapshot/seamless/snapshot"
)

// seamlessStrategy is strategy 1: a real snapshot through the shim's
// control socket (POST /v1/snapshots), timed by the shim (pause_us and its
// parts) and by the probe.
//
// The upload the shim starts is not part of the measurement. The first
// snapshot of an environment is pushed to the local registry and awaited
// (it proves the whole path); the uploaders of the others are interrupted
// (SIGTERM to the pid the answer names, after checking it is our uploader
// for that snapshot) and awaited before the next measurement, so no upload
// competes with it, unless --push lets every upload finish.
type seamlessStrategy struct{}

func (*seamlessStrategy) Name() string     { return "seamless" }
func (*seamlessStrategy) Consistent() bool { return true }

func (*seamlessStrategy) Snapshot(ctx context.Context, c *container, round int) (shot, error) {
	req := snapshot.Request{Target: fmt.Sprintf("%s/bench/%s:r%d", c.env.Reg.Host, c.id, round), PlainHTTP: true}
	push := c.env.Opts.Push || c.env.claimPush()
	from := c.env.Clock.Now()
	raw, st, err := postSnapshot(ctx, c.env.Dirs.Socket(c.id), req)
	to := c.env.Clock.Now()
	if st != nil && st.ID != "" {
		defer c.finishUpload(ctx, st, push && err == nil)
	}
	if err != nil {
		return shot{}, err
	}
	s := seamlessShot(c, st, raw, window{from, to})
	if c.writing {
		dir := snapshot.Store{Root: c.env.Dirs.SnapshotsDir()}.Dir(st.ID)
		m, err := overlay.LoadManifest(dir)
		if err != nil {
			return s, fmt.Errorf("capture of %s: %w", st.ID, err)
		}
		s.verify(manifestView(m, filepath.Join(dir, snapshot.DataDir), upperRel(writerDir)))
	}
	return s, nil
}

// seamlessShot turns the shim's answer into a shot. The shim reports the
// frozen instant (frozen_at_mono_ns; captured_at, on the wall clock, from
// older shims) and the pause parts; on CLOCK_MONOTONIC, the frozen instant
// plus the time spent frozen (capture_us, which includes the drain and the
// mmap scan) give the frozen window the probe is matched against, plus the
// thaw the instant the container ran again.
func seamlessShot(c *container, st *snapshot.State, raw map[string]any, request window) shot {
	p := st.Pause
	frozenAt := c.env.Clock.FromWall(st.CapturedAt)
	if p.FrozenAtMonoNS > 0 { // immune to steps of the wall clock
		frozenAt = p.FrozenAtMonoNS
	}
	frozenEnd := frozenAt + p.CaptureUS*1000
	var s shot
	s.PauseUS = float64(st.PauseUS)
	s.LatencyUS = us(frozenEnd + p.ThawUS*1000 - request.From)
	s.PartsUS = map[string]float64{"freeze": float64(p.FreezeUS), "capture": float64(p.CaptureUS), "thaw": float64(p.ThawUS)}
	if p.DrainUS > 0 || p.MmapScanUS > 0 {
		s.PartsUS["drain"], s.PartsUS["mmap_scan"] = float64(p.DrainUS), float64(p.MmapScanUS)
		s.PartsUS["tasks"], s.PartsUS["recapture"] = float64(p.TasksUS), float64(p.RecaptureUS)
	}
	s.Figures = captureFigures(raw)
	s.Figures["entries"], s.Figures["bytes"], s.Figures["freezer"] = st.Entries, st.Bytes, st.Freezer
	s.frozen, s.request = window{frozenAt, frozenEnd}, request
	return s
}

// figureKeys are the capture figures issue 3 asks the shim to report;
// they are looked up anywhere in the answer, so the bench keeps working
// whichever object the shim nests them in.
var figureKeys = []string{"precopy_ms", "precopy_rounds", "dirty_entries", "mapped_files", "mapped_held", "fallback", "fallback_reason", "strategy", "data_copy", "quiesce_wait_us", "quiesce_timed_out"}

func captureFigures(raw map[string]any) map[string]any {
	out := map[string]any{}
	for _, k := range figureKeys {
		if v, ok := findKey(raw, k); ok {
			out[k] = v
		}
	}
	return out
}

// findKey returns the first value named key in a decoded JSON tree.
func findKey(v any, key string) (any, bool) {
	switch t := v.(type) {
	case map[string]any:
		if x, ok := t[key]; ok {
			return x, true
		}
		for _, x := range t {
			if r, ok := findKey(x, key); ok {
				return r, true
			}
		}
	case []any:
		for _, x := range t {
			if r, ok := findKey(x, key); ok {
				return r, true
			}
		}
	}
	return nil, false
}

// postSnapshot asks the shim for a snapshot, as curl --unix-socket would.
// It returns the answer both decoded generically and as a State; a failed
// snapshot's state is returned with the error when the shim sent one.
func postSnapshot(ctx context.Context, socket string, req snapshot.Request) (map[string]any, *snapshot.State, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return nil, nil, err
	}
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
	}}
	defer client.CloseIdleConnections()
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://shim/v1/snapshots", bytes.NewReader(body))
	if err != nil {
		return nil, nil, err
	}
	hreq.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(hreq)
	if err != nil {
		return nil, nil, fmt.Errorf("POST /v1/snapshots on %s: %w", socket, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return nil, nil, fmt.Errorf("read answer: %w", err)
	}
	return decodeAnswer(resp.StatusCode, b)
}

func decodeAnswer(code int, b []byte) (map[string]any, *snapshot.State, error) {
	if code/100 != 2 {
		var e struct {
			Error string          `json:"error"`
			State *snapshot.State `json:"state"`
		}
		json.Unmarshal(b, &e) //nolint:errcheck // the status says enough
		return nil, e.State, fmt.Errorf("POST /v1/snapshots: HTTP %d: %s", code, strings.TrimSpace(string(b)))
	}
	var raw map[string]any
	var st snapshot.State
	if err := json.Unmarshal(b, &raw); err != nil {
		return nil, nil, fmt.Errorf("decode answer: %w", err)
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, nil, fmt.Errorf("decode answer: %w", err)
	}
	if st.ID == "" || st.PauseUS <= 0 || st.CapturedAt.IsZero() {
		return raw, &st, fmt.Errorf("answer lacks id, pause_us or captured_at: %s", b)
	}
	return raw, &st, nil
}

// finishUpload either waits for the snapshot's upload to finish (push) or
// interrupts it, waits for the uploader to exit, and removes the snapshot.
func (c *container) finishUpload(ctx context.Context, st *snapshot.State, push bool) {
	store := snapshot.Store{Root: c.env.Dirs.SnapshotsDir()}
	if push {
		start := time.Now()
		if final, err := waitUpload(ctx, store, st.ID); err != nil {
			logf("  upload of %s: %v", st.ID, err)
		} else {
			logf("  pushed %s (%s, %d bytes) in %v: %s", st.Target, final.Phase, final.Bytes, time.Since(start).Round(time.Millisecond), final.Error)
		}
	}
	if err := c.stopUploader(st); err != nil {
		logf("  uploader of %s: %v", st.ID, err)
	}
	if err := os.RemoveAll(store.Dir(st.ID)); err != nil {
		logf("  remove snapshot %s: %v", st.ID, err)
	}
}

// waitUpload waits until snapshot id reaches a final phase.
func waitUpload(ctx context.Context, store snapshot.Store, id string) (*snapshot.State, error) {
	var last *snapshot.State
	err := waitFor(ctx, 10*time.Minute, 50*time.Millisecond, func() (bool, error) {
		st, err := store.Load(id)
		if err != nil {
			return false, nil
		}
		last = st
		return st.Phase.Final(), nil
	})
	return last, err
}

// stopUploader interrupts the uploader of st if it still runs, and waits
// for it to exit. It only signals the pid if it runs our seamless-runc for
// this very snapshot.
func (c *container) stopUploader(st *snapshot.State) error {
	pid := st.UploaderPID
	if pid <= 0 || !testenv.ProcessAlive(pid) || !isUploaderOf(pid, filepath.Join(c.env.Bin, "seamless-runc"), st.ID) {
		return nil
	}
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("SIGTERM %d: %w", pid, err)
	}
	gone := func() (bool, error) { return !testenv.ProcessAlive(pid), nil }
	if waitFor(context.Background(), 30*time.Second, 5*time.Millisecond, gone) == nil {
		return nil
	}
	if isUploaderOf(pid, filepath.Join(c.env.Bin, "seamless-runc"), st.ID) {
		syscall.Kill(pid, syscall.SIGKILL) //nolint:errcheck // checked below
	}
	return waitFor(context.Background(), 10*time.Second, 5*time.Millisecond, gone)
}

// isUploaderOf reports whether pid runs exe with the snapshot id among its
// arguments (the shim spawns the uploader as "exe id").
func isUploaderOf(pid int, exe, id string) bool {
	got, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
	if err != nil || got != exe {
		return false
	}
	cmd, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	args := strings.Split(strings.TrimRight(string(cmd), "\x00"), "\x00")
	for _, a := range args[1:] {
		if a == id {
			return true
		}
	}
	return false
}
