package uploader

import (
	"bytes"
	"compress/gzip"
	"context"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"
	"github.com/seamless-snapshot/seamless/snapshot"
)

// mixedData returns n bytes alternating compressible text and random
// bytes, the same for the same seed.
func mixedData(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed))
	words := strings.Fields("the layer of a container snapshot is pushed to the registry after a short freeze INFO request 200 GET /v2/")
	var b bytes.Buffer
	chunk := make([]byte, 64<<10)
	for b.Len() < n {
		if r.IntN(2) == 0 {
			for i := 0; i < len(chunk)/8; i++ {
				b.WriteString(words[r.IntN(len(words))])
				b.WriteByte(" \n"[r.IntN(2)])
			}
			continue
		}
		for i := range chunk {
			chunk[i] = byte(r.Uint32())
		}
		b.Write(chunk)
	}
	return b.Bytes()[:n]
}

// compressWith compresses in with c, writing it in pieces of size chunk.
func compressWith(t *testing.T, c codec, in []byte, chunk int) []byte {
	t.Helper()
	var out bytes.Buffer
	w, err := c.newWriter(&out)
	if err != nil {
		t.Fatal(err)
	}
	for len(in) > 0 {
		n := min(chunk, len(in))
		if _, err := w.Write(in[:n]); err != nil {
			t.Fatal(err)
		}
		in = in[n:]
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

// TestCompressionDeterministic: the blob depends on the input only, not on
// how it is cut into writes nor on the number of CPUs; it is standard gzip
// or zstd, made of several parallel blocks.
func TestCompressionDeterministic(t *testing.T) {
	in := mixedData(1, 40<<20) // > 2 zstd jobs, 40 gzip blocks
	for _, name := range []string{"gzip", "zstd"} {
		t.Run(name, func(t *testing.T) {
			c, err := codecFor(name)
			if err != nil {
				t.Fatal(err)
			}
			ref := compressWith(t, c, in, 32<<10)
			for _, tc := range []struct {
				procs, chunk int
			}{{1, 32 << 10}, {2, 1<<20 + 7}, {4, 4093}, {8, 64 << 20}} {
				prev := runtime.GOMAXPROCS(tc.procs)
				got := compressWith(t, c, in, tc.chunk)
				runtime.GOMAXPROCS(prev)
				if !bytes.Equal(got, ref) {
					t.Errorf("GOMAXPROCS=%d, writes of %d bytes: output differs (%d vs %d bytes)", tc.procs, tc.chunk, len(got), len(ref))
				}
			}
			if len(ref) > len(in)*3/4 || len(ref) < len(in)/4 {
				t.Errorf("compressed %d to %d bytes: not the mixed ratio expected", len(in), len(ref))
			}
			// Standard decoders read it back (the stdlib for gzip).
			var rd io.Reader
			switch name {
			case "gzip":
				zr, err := gzip.NewReader(bytes.NewReader(ref))
				if err != nil {
					t.Fatal(err)
				}
				if zr.ModTime.Unix() > 0 {
					t.Errorf("gzip header has a time: %v", zr.ModTime)
				}
				rd = zr
			case "zstd":
				zr, err := zstd.NewReader(bytes.NewReader(ref))
				if err != nil {
					t.Fatal(err)
				}
				defer zr.Close()
				rd = zr
			}
			back, err := io.ReadAll(rd)
			if err != nil || !bytes.Equal(back, in) {
				t.Fatalf("round trip: %v, equal %v", err, bytes.Equal(back, in))
			}
		})
	}
}

// TestWriteSpoolHashes: one pass gives both digests and sizes; the spool is
// the compressed blob.
func TestWriteSpoolHashes(t *testing.T) {
	in := mixedData(2, 3<<20)
	for _, name := range []string{"gzip", "zstd"} {
		c, _ := codecFor(name)
		path := filepath.Join(t.TempDir(), c.file)
		var last int64
		l, err := writeSpool(context.Background(), path, c, bytesLayer(in), func(n int64) { last = n }, nil)
		if err != nil {
			t.Fatal(err)
		}
		blob, _ := os.ReadFile(path)
		if l.diffID != sha256Hash(in) || l.digest != sha256Hash(blob) || l.size != int64(len(blob)) || l.usize != int64(len(in)) || last != int64(len(in)) {
			t.Errorf("%s: spool %+v, progress %d; want diff_id %s digest %s", name, l, last, sha256Hash(in), sha256Hash(blob))
		}
		if exists(path + ".partial") {
			t.Errorf("%s: partial spool left", name)
		}
	}
}

// refuse answers every request 403.
func refuse(w http.ResponseWriter, _ *http.Request) bool {
	http.Error(w, "nope", http.StatusForbidden)
	return true
}

// TestResumeReusesSpool: a run killed after the spool was recorded leaves
// a spool the next run pushes without rebuilding; an altered spool is
// rebuilt, to the same digest.
func TestResumeReusesSpool(t *testing.T) {
	reg := newTestRegistry(t)
	store := snapshot.Store{Root: t.TempDir()}
	target := reg.host + "/test/resume:1"
	newSnapshot(t, store, "s1", target)
	layerTar := tarOf(t, "big", string(mixedData(3, 2<<20)))
	base := baseImage(t, false)

	// First run: the registry refuses everything, so it fails after the build.
	reg.setIntercept(refuse)
	if err := Upload(context.Background(), store, "s1", Options{Layer: bytesLayer(layerTar), Base: fixedBase(base, &trackingCloser{}), Retry: fastRetry}); err == nil {
		t.Fatal("upload to a refusing registry succeeded")
	}
	st, _ := store.Load("s1")
	if st.Phase != snapshot.PhaseFailed || st.LayerDigest == "" || st.DiffID != sha256Hash(layerTar).String() || st.LayerSize == 0 {
		t.Fatalf("state after the failed run: %s %q layer %s diff_id %s size %d", st.Phase, st.Error, st.LayerDigest, st.DiffID, st.LayerSize)
	}
	first := st.LayerDigest
	reg.setIntercept(nil)

	// Second run: the layer writer must not be called.
	built := false
	err := Upload(context.Background(), store, "s1", Options{
		Layer: func(ctx context.Context, w io.Writer) error { built = true; return bytesLayer(layerTar)(ctx, w) },
		Base:  fixedBase(base, &trackingCloser{}),
	})
	if err != nil {
		t.Fatal(err)
	}
	st, _ = store.Load("s1")
	if built || !st.Upload.SpoolReused || st.Phase != snapshot.PhaseDone || st.LayerDigest != first || st.Upload.Runs != 2 {
		t.Fatalf("rebuilt %v, state %s reused %v layer %s (want %s), runs %d", built, st.Phase, st.Upload.SpoolReused, st.LayerDigest, first, st.Upload.Runs)
	}

	// An altered spool is not trusted.
	newSnapshot(t, store, "s2", reg.host+"/test/resume:2")
	reg.setIntercept(refuse)
	Upload(context.Background(), store, "s2", Options{Layer: bytesLayer(layerTar), Base: fixedBase(base, &trackingCloser{}), Retry: fastRetry})
	reg.setIntercept(nil)
	spool := filepath.Join(store.Dir("s2"), snapshot.LayerFile)
	b, err := os.ReadFile(spool)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0xff
	os.WriteFile(spool, b, 0o600)
	built = false
	if err := Upload(context.Background(), store, "s2", Options{
		Layer: func(ctx context.Context, w io.Writer) error { built = true; return bytesLayer(layerTar)(ctx, w) },
		Base:  fixedBase(base, &trackingCloser{}),
	}); err != nil {
		t.Fatal(err)
	}
	st, _ = store.Load("s2")
	if !built || st.Upload.SpoolReused || st.LayerDigest != first {
		t.Fatalf("altered spool: rebuilt %v, reused %v, layer %s (want %s)", built, st.Upload.SpoolReused, st.LayerDigest, first)
	}
}
