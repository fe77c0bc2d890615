package uploader

import (
	"bufio"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/zstd"
	"github.com/klauspost/pgzip"
	"github.com/seamless-snapshot/seamless/snapshot"
)

// Compression settings. The layer digest must not depend on the machine or
// on how the tar is chunked into writes (a resumed upload rebuilds the same
// blob), so block sizes and levels are fixed here and never derived from
// the number of CPUs: the number of CPUs only sets how many blocks are
// compressed at once.
const (
	// gzipBlockSize is the uncompressed size of each independently
	// compressed gzip block (each is primed with the previous 32 KiB).
	gzipBlockSize = 1 << 20
	// zstdWindow is the zstd window; parallel jobs are 4 windows long.
	zstdWindow = 4 << 20
)

// codec is a layer compression: how to write and read it, and how to name it.
type codec struct {
	name      string
	file      string
	newWriter func(io.Writer) (io.WriteCloser, error)
	newReader func(io.Reader) (io.ReadCloser, error)
}

// parallelism is how many blocks are compressed at once: every CPU, and at
// least 2 (zstd's parallel mode, whose output differs from its serial
// mode's, needs 2).
func parallelism() int { return max(2, runtime.GOMAXPROCS(0)) }

// codecFor returns the codec for a request's compression ("" means gzip).
// Both compress in parallel and deterministically.
func codecFor(compression string) (codec, error) {
	switch compression {
	case "", "gzip":
		return codec{
			name:      "gzip",
			file:      snapshot.LayerFile,
			newWriter: newGzipWriter,
			newReader: func(r io.Reader) (io.ReadCloser, error) { return pgzip.NewReader(r) },
		}, nil
	case "zstd":
		return codec{
			name:      "zstd",
			file:      "layer.tar.zst",
			newWriter: newZstdWriter,
			newReader: func(r io.Reader) (io.ReadCloser, error) {
				d, err := zstd.NewReader(r)
				if err != nil {
					return nil, err
				}
				return d.IOReadCloser(), nil
			},
		}, nil
	}
	return codec{}, fmt.Errorf("unsupported compression %q (want gzip or zstd)", compression)
}

// newGzipWriter is a block-parallel gzip writer at the fastest level: one
// gzip member whose deflate stream is made of independently compressed,
// byte-aligned blocks.
func newGzipWriter(w io.Writer) (io.WriteCloser, error) {
	z, err := pgzip.NewWriterLevel(w, pgzip.BestSpeed)
	if err != nil {
		return nil, err
	}
	if err := z.SetConcurrency(gzipBlockSize, parallelism()); err != nil {
		return nil, err
	}
	z.ModTime = time.Unix(0, 0) // "no time" in the header, as a tar | gzip -n would write
	return z, nil
}

// newZstdWriter is a zstd writer at the fastest level compressing jobs of
// the stream in parallel into one frame.
func newZstdWriter(w io.Writer) (io.WriteCloser, error) {
	return zstd.NewWriter(w,
		zstd.WithEncoderLevel(zstd.SpeedFastest),
		zstd.WithWindowSize(zstdWindow),
		zstd.WithEncoderConcurrency(parallelism()),
		zstd.WithConcurrentBlocks(true),
	)
}

// layerMediaType is the media type of a new layer compressed with c in an
// image whose manifest has media type manifestMT.
func (c codec) layerMediaType(manifestMT types.MediaType) (types.MediaType, error) {
	switch {
	case manifestMT == types.OCIManifestSchema1 && c.name == "zstd":
		return types.OCILayerZStd, nil
	case manifestMT == types.OCIManifestSchema1:
		return types.OCILayer, nil
	case manifestMT == types.DockerManifestSchema2 && c.name == "gzip":
		return types.DockerLayer, nil
	}
	return "", fmt.Errorf("no %s layer media type for a %q manifest", c.name, manifestMT)
}

// spoolPath is where the layer compressed with c is spooled in snapshot dir.
func spoolPath(dir string, c codec) string { return filepath.Join(dir, c.file) }

// build produces the layer blob: the spool of an earlier run when the state
// records it and the file still hashes to it, else a new spool built from
// the capture (a big one also uploaded to ref's repository as it is built).
func (u *upload) build(ctx context.Context, c codec, ref name.Reference) (*spoolLayer, error) {
	start := time.Now()
	st := u.state.snapshot()
	l, reused, err := u.reuseSpool(ctx, c, st)
	if err != nil {
		return nil, err
	}
	if !reused {
		if l, err = u.buildSpool(ctx, c, ref, st.Request); err != nil {
			return nil, err
		}
	}
	u.stall(stallBuilt, 0)
	err = u.state.update(func(st *snapshot.State) {
		st.Upload.BuildMS = time.Since(start).Milliseconds()
		st.Upload.SpoolReused = reused
	})
	return l, err
}

// reuseSpool returns the spool recorded in st when it is complete and
// intact. A missing, short or altered spool is not an error: it is rebuilt.
func (u *upload) reuseSpool(ctx context.Context, c codec, st snapshot.State) (*spoolLayer, bool, error) {
	if st.LayerDigest == "" || st.DiffID == "" || st.LayerSize <= 0 {
		return nil, false, nil
	}
	digest, err1 := v1.NewHash(st.LayerDigest)
	diffID, err2 := v1.NewHash(st.DiffID)
	if err := errors.Join(err1, err2); err != nil {
		u.logf("spool record unreadable (%v): rebuilding", err)
		return nil, false, nil
	}
	path := spoolPath(u.dir, c)
	fi, err := os.Stat(path)
	if err != nil || fi.Size() != st.LayerSize {
		u.logf("no complete spool at %s: rebuilding the layer from the capture", path)
		return nil, false, nil
	}
	if err := u.state.phase(snapshot.PhaseBuilding, fi.Size()); err != nil {
		return nil, false, err
	}
	u.logf("checking the spool of an earlier run: %s", path)
	got, err := hashFile(ctx, path, func(n int64) { u.state.progress(n, fi.Size()) })
	if err != nil {
		if ctx.Err() != nil {
			return nil, false, err
		}
		u.logf("spool unreadable (%v): rebuilding", err)
		return nil, false, nil
	}
	if got != digest {
		u.logf("spool hashes to %s, not %s: rebuilding", got, digest)
		return nil, false, nil
	}
	u.logf("reusing spool %s (%d bytes)", digest, fi.Size())
	return &spoolLayer{path: path, codec: c, digest: digest, diffID: diffID, size: st.LayerSize, usize: st.LayerUncompressedSize}, true, nil
}

// buildSpool runs the layer writer into a new spool file, hashing both
// streams on the way, and records the result in the state. A layer of at
// least streamMin bytes is uploaded to ref's repository at the same time.
func (u *upload) buildSpool(ctx context.Context, c codec, ref name.Reference, req snapshot.Request) (*spoolLayer, error) {
	if u.opts.Layer == nil {
		return nil, errors.New("build layer: no layer writer")
	}
	total := u.opts.LayerSize
	if total <= 0 {
		total = u.state.snapshot().Bytes
	}
	if err := u.state.update(func(st *snapshot.State) {
		st.Phase = snapshot.PhaseBuilding
		st.Progress = snapshot.Progress{Total: total}
		st.LayerDigest, st.DiffID, st.LayerSize, st.LayerUncompressedSize = "", "", 0, 0
	}); err != nil {
		return nil, err
	}
	path := spoolPath(u.dir, c)
	progress := func(n int64) {
		u.state.progress(n, total)
		u.stall(stallBuild, n)
	}
	var s *layerStream
	var tee io.Writer
	if total >= streamMin && ref != nil {
		s = u.startStream(ctx, ref, req)
		tee = s
		u.logf("uploading the layer to %s while it is built", ref.Context())
	}
	l, err := writeSpool(ctx, path, c, u.opts.Layer, progress, tee)
	if s != nil {
		u.endStream(s, l)
	}
	if err != nil {
		return nil, fmt.Errorf("build layer: %w", err)
	}
	u.stall(stallSpooled, 0)
	u.logf("layer built: %s (%d bytes, %d uncompressed), diff_id %s", l.digest, l.size, l.usize, l.diffID)
	u.state.progress(l.usize, l.usize)
	if err := u.state.update(func(st *snapshot.State) {
		st.LayerDigest, st.DiffID = l.digest.String(), l.diffID.String()
		st.LayerSize, st.LayerUncompressedSize = l.size, l.usize
	}); err != nil {
		return nil, err
	}
	return l, nil
}

// writeSpool streams lw through c into path (via a temp file renamed at the
// end), computing diff_id, digest and sizes in the same pass; tee, when not
// nil, gets a copy of the compressed stream. The temp file is removed on
// failure, before the caller records it, so that a full disk has room
// again for state.json.
func writeSpool(ctx context.Context, path string, c codec, lw LayerWriter, progress func(int64), tee io.Writer) (l *spoolLayer, err error) {
	tmp := path + ".partial"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return nil, err
	}
	defer func() {
		if f != nil {
			f.Close()
		}
		if err != nil {
			os.Remove(tmp)
			err = diskFull(err, filepath.Dir(path))
		}
	}()
	buf := bufio.NewWriterSize(f, 1<<20)
	var out io.Writer = buf
	if tee != nil {
		out = io.MultiWriter(buf, tee)
	}
	compressed := newHashCounter(out)
	zw, err := c.newWriter(compressed)
	if err != nil {
		return nil, err
	}
	uncompressed := newHashCounter(zw)
	uncompressed.onWrite = progress
	lerr := lw(ctx, &ctxWriter{ctx: ctx, w: uncompressed})
	// Close even after a failure: it stops the compressor's goroutines.
	cerr := zw.Close()
	switch {
	case ctx.Err() != nil:
		return nil, ctx.Err()
	case lerr != nil:
		return nil, lerr
	case cerr != nil:
		return nil, fmt.Errorf("compress: %w", cerr)
	}
	if err := buf.Flush(); err != nil {
		return nil, fmt.Errorf("write %s: %w", tmp, err)
	}
	// No fsync: a killed uploader leaves the spool in the page cache, and
	// after a crash a resumed upload hashes the spool before reusing it.
	// Syncing would cost seconds per GiB on a slow disk.
	err = f.Close()
	f = nil
	if err != nil {
		return nil, fmt.Errorf("close %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return nil, err
	}
	return &spoolLayer{
		path:   path,
		codec:  c,
		digest: compressed.sum(),
		diffID: uncompressed.sum(),
		size:   compressed.n,
		usize:  uncompressed.n,
	}, nil
}

// diskFull rewrites an out-of-space error into one that says so plainly.
func diskFull(err error, dir string) error {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return fmt.Errorf("disk full: no room for the layer spool in %s (the capture is kept; free space, then `seamless retry`): %w", dir, err)
	}
	return err
}

// hashFile returns the sha256 of the file at path, reporting bytes read.
func hashFile(ctx context.Context, path string, progress func(int64)) (v1.Hash, error) {
	f, err := os.Open(path)
	if err != nil {
		return v1.Hash{}, err
	}
	defer f.Close()
	hc := newHashCounter(io.Discard)
	hc.onWrite = progress
	if _, err := io.CopyBuffer(&ctxWriter{ctx: ctx, w: hc}, f, make([]byte, 1<<20)); err != nil {
		return v1.Hash{}, fmt.Errorf("read %s: %w", path, err)
	}
	return hc.sum(), nil
}

// hashCounter passes writes to w while hashing and counting them.
type hashCounter struct {
	w       io.Writer
	h       hash.Hash
	n       int64
	onWrite func(total int64)
}

func newHashCounter(w io.Writer) *hashCounter { return &hashCounter{w: w, h: sha256.New()} }

func (hc *hashCounter) Write(p []byte) (int, error) {
	n, err := hc.w.Write(p)
	hc.h.Write(p[:n])
	hc.n += int64(n)
	if hc.onWrite != nil {
		hc.onWrite(hc.n)
	}
	return n, err
}

func (hc *hashCounter) sum() v1.Hash {
	return v1.Hash{Algorithm: "sha256", Hex: fmt.Sprintf("%x", hc.h.Sum(nil))}
}

// ctxWriter fails writes once ctx is done, so that a layer writer that
// ignores its context still stops promptly.
type ctxWriter struct {
	ctx context.Context
	w   io.Writer
}

func (cw *ctxWriter) Write(p []byte) (int, error) {
	if err := cw.ctx.Err(); err != nil {
		return 0, err
	}
	return cw.w.Write(p)
}
