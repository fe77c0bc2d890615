package uploader

import (
	"bufio"
	"context"
	"crypto/sha256"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/seamless-snapshot/seamless/snapshot"
)

// codec is a layer compression: how to write and read it, and how to name it.
type codec struct {
	name      string
	file      string
	newWriter func(io.Writer) (io.WriteCloser, error)
	newReader func(io.Reader) (io.ReadCloser, error)
}

// codecFor returns the codec for a request's compression ("" means gzip).
func codecFor(compression string) (codec, error) {
	switch compression {
	case "", "gzip":
		return codec{
			name: "gzip",
			file: snapshot.LayerFile,
			newWriter: func(w io.Writer) (io.WriteCloser, error) {
				return gzip.NewWriterLevel(w, gzip.BestSpeed)
			},
			newReader: func(r io.Reader) (io.ReadCloser, error) { return gzip.NewReader(r) },
		}, nil
	case "zstd":
		return codec{
			name: "zstd",
			file: "layer.tar.zst",
			newWriter: func(w io.Writer) (io.WriteCloser, error) {
				return zstd.NewWriter(w, zstd.WithEncoderLevel(zstd.SpeedFastest))
			},
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

// layerMediaType is the media type of a new layer compressed with c on top
// of a base whose manifest has media type base.
func (c codec) layerMediaType(base types.MediaType) (types.MediaType, error) {
	switch {
	case c.name == "zstd" && (base == types.OCIManifestSchema1 || base == types.DockerManifestSchema2):
		return types.OCILayerZStd, nil
	case base == types.OCIManifestSchema1:
		return types.OCILayer, nil
	case base == types.DockerManifestSchema2:
		return types.DockerLayer, nil
	}
	return "", fmt.Errorf("unsupported base manifest media type %q", base)
}

// build runs the layer writer into the compressed spool file of the
// snapshot, hashing both streams on the way, and returns the spooled layer
// (media type still unset).
func (u *upload) build(ctx context.Context, c codec, total int64) (*spoolLayer, error) {
	if err := u.state.phase(snapshot.PhaseBuilding, total); err != nil {
		return nil, err
	}
	path := filepath.Join(u.dir, c.file)
	l, err := writeSpool(ctx, path, c, u.opts.Layer, func(n int64) { u.state.progress(n, total) })
	if err != nil {
		return nil, fmt.Errorf("build layer: %w", err)
	}
	u.logf("layer built: %s (%d bytes, %d uncompressed), diff_id %s", l.digest, l.size, l.usize, l.diffID)
	u.state.progress(l.usize, total)
	if err := u.state.update(func(st *snapshot.State) { st.LayerDigest = l.digest.String() }); err != nil {
		return nil, err
	}
	return l, nil
}

// writeSpool streams lw through c into path (via a temp file renamed at the
// end), computing diff_id, digest and sizes in the same pass.
func writeSpool(ctx context.Context, path string, c codec, lw LayerWriter, progress func(int64)) (l *spoolLayer, err error) {
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
		}
	}()
	buf := bufio.NewWriterSize(f, 1<<20)
	compressed := newHashCounter(buf)
	zw, err := c.newWriter(compressed)
	if err != nil {
		return nil, err
	}
	uncompressed := newHashCounter(zw)
	uncompressed.onWrite = progress
	if err := lw(ctx, &ctxWriter{ctx: ctx, w: uncompressed}); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, fmt.Errorf("compress: %w", err)
	}
	if err := buf.Flush(); err != nil {
		return nil, err
	}
	if err := f.Sync(); err != nil {
		return nil, err
	}
	err = f.Close()
	f = nil
	if err != nil {
		return nil, err
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
