package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/stream"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/seamless-snapshot/seamless/baseimage"
	"github.com/seamless-snapshot/seamless/overlay"
	"github.com/seamless-snapshot/seamless/snapshot"
	"github.com/seamless-snapshot/seamless/uploader"
)

// uploadSection measures the upload (issue 4): from a sealed capture of an
// upper dir of 1 GiB in 10k files, half compressible text and half random
// bytes, to the image's manifest pushed to the local registry, for
// seamless's uploader (a real detached process, gzip and zstd) and, on the
// same data in the same run, for the baselines: `tar -C upper -c . |
// gzip -1 > file` (no push) and go-containerregistry's single-threaded gzip
// layers (stream.Layer, tarball.LayerFromOpener) pushed with remote.Write.
// Everything reads the same files from the page cache.
type uploadSection struct{}

func (uploadSection) Name() string { return "upload" }

// Upload strategies, in run order.
const (
	upSeamlessZstd = "seamless zstd"
	upSeamlessGzip = "seamless gzip"
	upTarGzip      = "tar|gzip -1"
	upGGCRStream   = "ggcr stream.Layer"
	upGGCROpener   = "ggcr tarball.LayerFromOpener"
)

// uploadScenario is the upper the section builds.
type uploadScenario struct {
	name   string
	files  int
	bytes  int64
	rounds int
}

func uploadScenarioFor(quick bool) uploadScenario {
	if quick {
		return uploadScenario{name: "128MiB", files: 1000, bytes: 128 << 20, rounds: 1}
	}
	return uploadScenario{name: "1GiB", files: 10_000, bytes: 1 << 30, rounds: 3}
}

// uploadRun is one timed upload.
type uploadRun struct {
	total, build, push time.Duration
	compressed         int64
}

func (uploadSection) Run(ctx context.Context, env *Env) ([]Row, error) {
	sc := uploadScenarioFor(env.Opts.Quick)
	dir := filepath.Join(env.Scratch, "upload")
	defer os.RemoveAll(dir)
	logf("[%s] upload: writing an upper of %s in %d files", env.FS, sc.name, sc.files)
	capture, err := writeUploadCapture(filepath.Join(dir, "upper"), filepath.Join(dir, "capture"), sc)
	if err != nil {
		return nil, err
	}
	if err := syncFS(dir); err != nil {
		return nil, err
	}
	strategies := []string{upSeamlessZstd, upSeamlessGzip, upTarGzip, upGGCRStream, upGGCROpener}
	rows := make(map[string]*Row, len(strategies))
	for _, s := range strategies {
		rows[s] = &Row{Section: "upload", FS: env.FS, Scenario: sc.name, Load: loadIdle, Files: sc.files, Bytes: sc.bytes, Strategy: s, Consistent: true}
	}
	runs := map[string][]uploadRun{}
	for round := 0; round < sc.rounds; round++ {
		for _, s := range strategies {
			if ctx.Err() != nil {
				return collectUploadRows(strategies, rows, runs), ctx.Err()
			}
			r, err := runUpload(ctx, env, s, capture, round)
			if err != nil {
				logf("[%s] upload: %s round %d: %v", env.FS, s, round, err)
				rows[s].Errors = append(rows[s].Errors, err.Error())
				continue
			}
			logf("[%s] upload: %s round %d: %.2fs, %.0f MB/s", env.FS, s, round, r.total.Seconds(), mbps(sc.bytes, r.total))
			runs[s] = append(runs[s], r)
		}
	}
	return collectUploadRows(strategies, rows, runs), nil
}

// collectUploadRows turns the runs into rows: Parts holds total, build and
// push times (µs), each sample the compressed size.
func collectUploadRows(strategies []string, rows map[string]*Row, runs map[string][]uploadRun) []Row {
	var out []Row
	for _, s := range strategies {
		r := rows[s]
		var total, build, push []float64
		r.Samples = nil
		for i, u := range runs[s] {
			total, build, push = append(total, durUS(u.total)), append(build, durUS(u.build)), append(push, durUS(u.push))
			r.Samples = append(r.Samples, Sample{Round: i, LatencyUS: durUS(u.total), Figures: map[string]any{
				"compressed_bytes": u.compressed, "mb_s": mbps(r.Bytes, u.total)}})
		}
		r.N = len(runs[s])
		r.Latency = distOf(total)
		r.Parts = map[string]Dist{"total": distOf(total), "build": distOf(build), "push": distOf(push)}
		out = append(out, *r)
	}
	return out
}

// durUS is d in µs, NaN (unknown) when not measured.
func durUS(d time.Duration) float64 {
	if d <= 0 {
		return math.NaN()
	}
	return float64(d.Microseconds())
}

// mbps is bytes per second in MB (10^6).
func mbps(bytes int64, d time.Duration) float64 {
	if d <= 0 {
		return 0
	}
	return float64(bytes) / 1e6 / d.Seconds()
}

// uploadCapture is a sealed capture in the snapshot format (manifest.json
// and data/) whose data files are also linked into an upper dir tree.
type uploadCapture struct {
	upper    string
	dir      string
	manifest []byte
	entries  int
	bytes    int64
}

// writeUploadCapture writes sc's files: data/<n> in captureDir, each also
// hardlinked as upper/dNNN/fNNNNN (one copy of the bytes, two views).
// Sizes are spread log-normally; every file is text or random, so that
// half the bytes compress well and half not at all.
func writeUploadCapture(upper, captureDir string, sc uploadScenario) (*uploadCapture, error) {
	data := filepath.Join(captureDir, snapshot.DataDir)
	for _, d := range []string{upper, data} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
	}
	sizes := fileSizes(sc.files, sc.bytes)
	rng := rand.New(rand.NewPCG(4, 2))
	mtime := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano()
	m := overlay.Manifest{Version: overlay.ManifestVersion}
	var text, random int64
	buf := make([]byte, 0, 1<<20)
	for i, size := range sizes {
		dirName := fmt.Sprintf("d%03d", i/100)
		if i%100 == 0 {
			if err := os.Mkdir(filepath.Join(upper, dirName), 0o755); err != nil {
				return nil, err
			}
			m.Entries = append(m.Entries, overlay.Entry{Path: dirName, Type: overlay.TypeDir, Mode: 0o755, MtimeNS: mtime})
		}
		isText := text <= random
		buf = fillContent(buf[:0], rng, int(size), isText)
		if isText {
			text += size
		} else {
			random += size
		}
		dataName := strconv.Itoa(i)
		if err := os.WriteFile(filepath.Join(data, dataName), buf, 0o644); err != nil {
			return nil, err
		}
		rel := fmt.Sprintf("%s/f%05d", dirName, i)
		if err := os.Link(filepath.Join(data, dataName), filepath.Join(upper, rel)); err != nil {
			return nil, err
		}
		m.Entries = append(m.Entries, overlay.Entry{Path: rel, Type: overlay.TypeFile, Mode: 0o644, Size: size, Data: dataName, MtimeNS: mtime})
	}
	raw, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(captureDir, snapshot.ManifestFile), raw, 0o600); err != nil {
		return nil, err
	}
	return &uploadCapture{upper: upper, dir: captureDir, manifest: raw, entries: len(m.Entries), bytes: sc.bytes}, nil
}

// fileSizes returns n log-normal sizes adding up to total exactly.
func fileSizes(n int, total int64) []int64 {
	rng := rand.New(rand.NewPCG(1, 2))
	w := make([]float64, n)
	sum := 0.0
	for i := range w {
		w[i] = math.Exp(rng.NormFloat64() * 1.2)
		sum += w[i]
	}
	sizes := make([]int64, n)
	var acc int64
	for i := range w {
		sizes[i] = max(1, int64(w[i]/sum*float64(total)))
		acc += sizes[i]
	}
	sizes[n-1] += total - acc
	return sizes
}

// words make log-like text that gzip -1 shrinks about 3 to 4 times.
var words = []string{"INFO", "WARN", "request", "GET", "/api/v1/items", "200", "user", "session", "took", "ms", "cache", "miss", "hit", "container", "snapshot", "layer", "the", "of", "and", "retry"}

// fillContent appends size bytes of text or random bytes to buf.
func fillContent(buf []byte, rng *rand.Rand, size int, text bool) []byte {
	if !text {
		for len(buf) < size {
			var b [8]byte
			v := rng.Uint64()
			for i := range b {
				b[i] = byte(v >> (8 * i))
			}
			buf = append(buf, b[:min(8, size-len(buf))]...)
		}
		return buf
	}
	for len(buf) < size {
		buf = strconv.AppendInt(buf, rng.Int64N(1_000_000), 10)
		for j := 0; j < 8 && len(buf) < size; j++ {
			buf = append(buf, ' ')
			buf = append(buf, words[rng.IntN(len(words))]...)
		}
		buf = append(buf, '\n')
	}
	return buf[:size]
}

// runUpload times one upload of the capture with strategy s.
func runUpload(ctx context.Context, env *Env, s string, c *uploadCapture, round int) (uploadRun, error) {
	repo := fmt.Sprintf("%s/bench-upload/r%d-%s", env.Reg.Host, round, repoSafe(s))
	switch s {
	case upSeamlessZstd:
		return runSeamlessUpload(ctx, env, c, repo+":1", "zstd")
	case upSeamlessGzip:
		return runSeamlessUpload(ctx, env, c, repo+":1", "gzip")
	case upTarGzip:
		return runTarGzip(ctx, env, c)
	case upGGCRStream, upGGCROpener:
		return runGGCR(ctx, env, c, repo+":1", s == upGGCRStream)
	}
	return uploadRun{}, fmt.Errorf("unknown strategy %q", s)
}

func repoSafe(s string) string {
	out := []byte{}
	for _, r := range []byte(s) {
		if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' {
			out = append(out, r)
		} else if len(out) > 0 && out[len(out)-1] != '-' {
			out = append(out, '-')
		}
	}
	return string(bytes.TrimRight(out, "-"))
}

// runSeamlessUpload makes a snapshot record of the capture (its data
// hardlinked, since a successful upload removes it) and times the real
// uploader process from its spawn to its exit.
func runSeamlessUpload(ctx context.Context, env *Env, c *uploadCapture, target, compression string) (uploadRun, error) {
	store := snapshot.Store{Root: env.Dirs.SnapshotsDir()}
	id, err := snapshot.NewID(time.Now())
	if err != nil {
		return uploadRun{}, err
	}
	dir, err := store.Create(id)
	if err != nil {
		return uploadRun{}, err
	}
	if err := linkCapture(c, dir); err != nil {
		return uploadRun{}, err
	}
	st := &snapshot.State{
		ID: id, Container: "bench-upload", Target: target, Phase: snapshot.PhaseCaptured,
		Request:    snapshot.Request{Target: target, PlainHTTP: true, Compression: compression},
		Base:       snapshot.Base{Source: "containerd", Ref: imageName, ContainerdAddress: env.Ctd.Address, ContainerdNamespace: env.Ctd.Namespace},
		CapturedAt: time.Now().UTC(), Entries: c.entries, Bytes: c.bytes,
	}
	if err := store.Save(st); err != nil {
		return uploadRun{}, err
	}
	if err := syncFS(dir); err != nil {
		return uploadRun{}, err
	}
	start := time.Now()
	p, err := uploader.Start(filepath.Join(env.Bin, "seamless"), env.Dirs.State, id)
	if err != nil {
		return uploadRun{}, err
	}
	waited := make(chan error, 1)
	go func() { _, err := p.Wait(); waited <- err }()
	select {
	case err = <-waited:
	case <-ctx.Done():
		p.Kill()
		<-waited
		return uploadRun{}, ctx.Err()
	}
	total := time.Since(start)
	if err != nil {
		return uploadRun{}, err
	}
	done, err := store.Load(id)
	if err != nil {
		return uploadRun{}, err
	}
	if done.Phase != snapshot.PhaseDone {
		log, _ := os.ReadFile(filepath.Join(dir, snapshot.LogFile))
		return uploadRun{}, fmt.Errorf("upload %s: %s: %s\n%s", id, done.Phase, done.Error, log)
	}
	return uploadRun{
		total:      total,
		build:      time.Duration(done.Upload.BuildMS) * time.Millisecond,
		push:       time.Duration(done.Upload.PushMS) * time.Millisecond,
		compressed: done.LayerSize,
	}, nil
}

// linkCapture gives dir the capture's manifest and hardlinks to its data.
func linkCapture(c *uploadCapture, dir string) error {
	if err := os.WriteFile(filepath.Join(dir, snapshot.ManifestFile), c.manifest, 0o600); err != nil {
		return err
	}
	src, dst := filepath.Join(c.dir, snapshot.DataDir), filepath.Join(dir, snapshot.DataDir)
	if err := os.Mkdir(dst, 0o700); err != nil {
		return err
	}
	ents, err := os.ReadDir(src)
	if err != nil {
		return err
	}
	for _, e := range ents {
		if err := os.Link(filepath.Join(src, e.Name()), filepath.Join(dst, e.Name())); err != nil {
			return err
		}
	}
	return nil
}

// runTarGzip times the shell baseline; it pushes nothing.
func runTarGzip(ctx context.Context, env *Env, c *uploadCapture) (uploadRun, error) {
	out := filepath.Join(env.Scratch, "upload", "baseline.tar.gz")
	defer os.Remove(out)
	start := time.Now()
	cmd := exec.CommandContext(ctx, "sh", "-c", `tar -C "$1" -c . | gzip -1 > "$2"`, "sh", c.upper, out)
	if b, err := cmd.CombinedOutput(); err != nil {
		return uploadRun{}, fmt.Errorf("tar | gzip: %v: %s", err, b)
	}
	total := time.Since(start)
	fi, err := os.Stat(out)
	if err != nil {
		return uploadRun{}, err
	}
	return uploadRun{total: total, build: total, compressed: fi.Size()}, nil
}

// runGGCR times go-containerregistry's own path on the same layer tar (the
// one seamless builds): the base image from containerd plus a gzip layer
// made by stream.Layer (compressed once, while uploading) or by
// tarball.LayerFromOpener (compressed once to hash it, again to upload),
// pushed with remote.Write.
func runGGCR(ctx context.Context, env *Env, c *uploadCapture, target string, streaming bool) (uploadRun, error) {
	start := time.Now()
	base, closer, err := baseimage.FromContainerd(ctx, env.Ctd.Address, env.Ctd.Namespace, imageName)
	if err != nil {
		return uploadRun{}, err
	}
	defer closer.Close()
	writeTar := uploader.OverlayLayer(c.dir)
	open := func() (io.ReadCloser, error) {
		pr, pw := io.Pipe()
		go func() { pw.CloseWithError(writeTar(ctx, pw)) }()
		return pr, nil
	}
	var layer v1.Layer
	if streaming {
		rc, _ := open()
		layer = stream.NewLayer(rc)
	} else if layer, err = tarball.LayerFromOpener(open); err != nil {
		return uploadRun{}, err
	}
	img, err := mutate.AppendLayers(base, layer)
	if err != nil {
		return uploadRun{}, err
	}
	ref, err := name.ParseReference(target, name.Insecure)
	if err != nil {
		return uploadRun{}, err
	}
	if err := remote.Write(ref, img, remote.WithContext(ctx), remote.WithTransport(http.DefaultTransport)); err != nil {
		return uploadRun{}, fmt.Errorf("remote.Write: %w", err)
	}
	total := time.Since(start)
	size, err := layer.Size()
	if err != nil {
		return uploadRun{}, errors.Join(errors.New("layer size"), err)
	}
	return uploadRun{total: total, compressed: size}, nil
}

// uploadTable prints one line per strategy: time, throughput over the
// upper's bytes, compression and the speed-up over tar|gzip -1.
func uploadTable(w io.Writer, rows []Row) {
	baseline := map[string]float64{}
	for _, r := range rows {
		if r.Strategy == upTarGzip && r.Parts["total"].N > 0 {
			baseline[r.FS+r.Scenario] = r.Parts["total"].P50
		}
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "FS\tUPPER\tSTRATEGY\tN\tTIME p50\tMB/s\tCOMPRESSED\tBUILD p50\tPUSH p50\tvs tar|gzip -1\tERR")
	for _, r := range rows {
		t := r.Parts["total"]
		speed, ratio, vs := "-", "-", "-"
		if t.N > 0 {
			speed = fmt.Sprintf("%.0f", float64(r.Bytes)/t.P50)
			if b := baseline[r.FS+r.Scenario]; b > 0 {
				vs = fmt.Sprintf("%.2fx", b/t.P50)
			}
		}
		if n := len(r.Samples); n > 0 {
			if cb, ok := r.Samples[n-1].Figures["compressed_bytes"].(int64); ok && r.Bytes > 0 {
				ratio = fmt.Sprintf("%.1f%%", 100*float64(cb)/float64(r.Bytes))
			}
		}
		fmt.Fprintf(tw, "%s\t%s (%d files)\t%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%d\n", r.FS, r.Scenario, r.Files, r.Strategy, r.N,
			t.p50(), speed, ratio, r.Parts["build"].p50(), r.Parts["push"].p50(), vs, len(r.Errors))
	}
	tw.Flush()
	fmt.Fprintln(w, "TIME: sealed capture -> manifest pushed (tar|gzip -1: archive written, nothing pushed); MB/s over the upper's bytes; COMPRESSED: layer size / upper size")
}

// uploadChecks are issue 4's throughput targets.
func uploadChecks(x rowIndex) []Check {
	var out []Check
	for _, tc := range []struct {
		strategy string
		limit    float64
	}{{upSeamlessZstd, 2}, {upSeamlessGzip, 1.3}} {
		for _, sc := range []string{"1GiB", "128MiB"} {
			s, b := x.get(fsExt4, sc, loadIdle, tc.strategy), x.get(fsExt4, sc, loadIdle, upTarGzip)
			if s == nil && b == nil && sc != "1GiB" {
				continue
			}
			out = append(out, ratioCheck(fmt.Sprintf("upload %s (issue 4): %s build+push >= %gx the throughput of tar|gzip -1", sc, tc.strategy, tc.limit),
				uploadTime(b), uploadTime(s), "tar|gzip time / seamless time", tc.limit, true))
		}
	}
	return out
}

func uploadTime(r *Row) stat {
	if r == nil || r.Parts["total"].N == 0 {
		return stat{}
	}
	return stat{r.Parts["total"].P50, true}
}
