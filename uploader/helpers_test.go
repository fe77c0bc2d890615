package uploader

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/seamless-snapshot/seamless/overlay"
	"github.com/seamless-snapshot/seamless/snapshot"
)

// capturedAt is the capture instant of every test snapshot.
var capturedAt = time.Date(2024, 5, 6, 7, 8, 9, 0, time.UTC)

// testRegistry is an in-process registry on 127.0.0.1 that logs requests.
type testRegistry struct {
	host string
	srv  *httptest.Server

	mu   sync.Mutex
	reqs []string // "METHOD path?query"
	// onRequest, when set, runs before each request is served.
	onRequest func(r *http.Request)
	// intercept, when set, may answer a request itself (returning true)
	// instead of the registry.
	intercept func(w http.ResponseWriter, r *http.Request) bool
}

func newTestRegistry(t *testing.T) *testRegistry {
	t.Helper()
	tr := &testRegistry{}
	tr.srv = httptest.NewServer(tr.handler())
	t.Cleanup(tr.srv.Close)
	tr.host = strings.TrimPrefix(tr.srv.URL, "http://")
	return tr
}

func (tr *testRegistry) handler() http.Handler {
	reg := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tr.mu.Lock()
		tr.reqs = append(tr.reqs, r.Method+" "+r.URL.RequestURI())
		hook, intercept := tr.onRequest, tr.intercept
		tr.mu.Unlock()
		if hook != nil {
			hook(r)
		}
		if intercept != nil && intercept(w, r) {
			return
		}
		reg.ServeHTTP(w, r)
	})
}

// setIntercept sets (or, with nil, clears) intercept.
func (tr *testRegistry) setIntercept(f func(w http.ResponseWriter, r *http.Request) bool) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	tr.intercept = f
}

// mark returns the number of requests so far, for since.
func (tr *testRegistry) mark() int {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return len(tr.reqs)
}

// since returns the requests logged after mark.
func (tr *testRegistry) since(mark int) []string {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return append([]string(nil), tr.reqs[mark:]...)
}

// blobUploads returns the digests of blobs whose upload completed (PUT, or a
// monolithic POST, with ?digest=) and the number of upload sessions started
// (POSTs), among reqs.
func blobUploads(reqs []string) (digests []string, posts int) {
	for _, r := range reqs {
		method, uri, _ := strings.Cut(r, " ")
		u, err := url.Parse(uri)
		if err != nil || !strings.Contains(u.Path, "/blobs/uploads/") {
			continue
		}
		if method == http.MethodPost {
			posts++
		}
		if d := u.Query().Get("digest"); d != "" && (method == http.MethodPut || method == http.MethodPost) {
			digests = append(digests, d)
		}
	}
	return digests, posts
}

// tarOf returns a tar holding files (name → content) in name order.
func tarOf(t *testing.T, files ...string) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for i := 0; i+1 < len(files); i += 2 {
		hdr := &tar.Header{Typeflag: tar.TypeReg, Name: files[i], Mode: 0o644, Size: int64(len(files[i+1])), ModTime: capturedAt}
		if err := tw.WriteHeader(hdr); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write([]byte(files[i+1])); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// bytesLayer is a LayerWriter producing b.
func bytesLayer(b []byte) LayerWriter {
	return func(ctx context.Context, w io.Writer) error {
		_, err := w.Write(b)
		return err
	}
}

func sha256Hash(b []byte) v1.Hash {
	return v1.Hash{Algorithm: "sha256", Hex: fmt.Sprintf("%x", sha256.Sum256(b))}
}

// baseImage returns a random 2-layer image with Docker or OCI media types.
func baseImage(t *testing.T, oci bool) v1.Image {
	t.Helper()
	if !oci {
		img, err := random.Image(2048, 2)
		if err != nil {
			t.Fatal(err)
		}
		return img
	}
	img := mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON)
	for i := 0; i < 2; i++ {
		l, err := random.Layer(2048, types.OCILayer)
		if err != nil {
			t.Fatal(err)
		}
		if img, err = mutate.Append(img, mutate.Addendum{Layer: l, History: v1.History{CreatedBy: fmt.Sprintf("base layer %d", i)}}); err != nil {
			t.Fatal(err)
		}
	}
	return img
}

// trackingCloser records whether the base was closed.
type trackingCloser struct{ closed bool }

func (c *trackingCloser) Close() error { c.closed = true; return nil }

// fixedBase opens img.
func fixedBase(img v1.Image, c *trackingCloser) BaseFunc {
	return func(context.Context) (v1.Image, io.Closer, error) { return img, c, nil }
}

// newSnapshot creates a captured snapshot in store with a data dir and a
// manifest, ready to upload to target.
func newSnapshot(t *testing.T, store snapshot.Store, id, target string) *snapshot.State {
	t.Helper()
	dir, err := store.Create(id)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(dir, snapshot.DataDir), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, snapshot.DataDir, "1"), []byte("hello\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	m := overlay.Manifest{Version: overlay.ManifestVersion, Entries: []overlay.Entry{
		{Path: "hello", Type: overlay.TypeFile, Mode: 0o644, Size: 6, Data: "1", MtimeNS: capturedAt.UnixNano()},
	}}
	b, _ := json.Marshal(m)
	if err := os.WriteFile(filepath.Join(dir, snapshot.ManifestFile), b, 0o600); err != nil {
		t.Fatal(err)
	}
	st := &snapshot.State{
		ID:         id,
		Container:  "c1",
		Target:     target,
		Request:    snapshot.Request{Target: target, PlainHTTP: true},
		Phase:      snapshot.PhaseCaptured,
		CapturedAt: capturedAt,
		Entries:    1,
		Bytes:      6,
		PauseUS:    123,
	}
	if err := store.Save(st); err != nil {
		t.Fatal(err)
	}
	return st
}

// phaseOnDisk reads the phase currently in state.json.
func phaseOnDisk(t *testing.T, store snapshot.Store, id string) snapshot.Phase {
	t.Helper()
	st, err := store.Load(id)
	if err != nil {
		t.Error(err)
		return ""
	}
	return st.Phase
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}
