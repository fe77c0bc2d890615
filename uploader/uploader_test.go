package uploader

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/google/go-containerregistry/pkg/v1/validate"
	"github.com/seamless-snapshot/seamless/snapshot"
)

// fastRetry keeps failing tests quick.
var fastRetry = Retry{For: 50 * time.Millisecond, Initial: 10 * time.Millisecond}

func TestUploadPushesBasePlusLayer(t *testing.T) {
	for _, tc := range []struct {
		name    string
		oci     bool
		wantMT  types.MediaType
		layerMT types.MediaType
	}{
		{"docker base", false, types.DockerManifestSchema2, types.DockerLayer},
		{"oci base", true, types.OCIManifestSchema1, types.OCILayer},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reg := newTestRegistry(t)
			store := snapshot.Store{Root: t.TempDir()}
			target := reg.host + "/test/app:snap"
			id := "s1"
			newSnapshot(t, store, id, target)
			base := baseImage(t, tc.oci)
			closer := &trackingCloser{}
			layerTar := tarOf(t, "hello", "hello\n", "etc/motd", strings.Repeat("seamless ", 1000))

			// Observe the phase on disk while each step runs.
			var mu sync.Mutex
			var phases []snapshot.Phase
			seen := func() {
				p := phaseOnDisk(t, store, id)
				mu.Lock()
				defer mu.Unlock()
				if len(phases) == 0 || phases[len(phases)-1] != p {
					phases = append(phases, p)
				}
			}
			reg.onRequest = func(r *http.Request) {
				if r.Method == http.MethodPut {
					seen()
				}
			}
			var logBuf bytes.Buffer
			err := Upload(context.Background(), store, id, Options{
				Layer: func(ctx context.Context, w io.Writer) error {
					seen()
					_, err := w.Write(layerTar)
					return err
				},
				Base: fixedBase(base, closer),
				Log:  &logBuf,
			})
			if err != nil {
				t.Fatalf("Upload: %v\nlog:\n%s", err, logBuf.String())
			}
			if !slices.Equal(phases, []snapshot.Phase{snapshot.PhaseBuilding, snapshot.PhasePushing}) {
				t.Errorf("phases seen during upload = %v, want [building pushing]", phases)
			}
			if !closer.closed {
				t.Error("base image closer not closed")
			}

			st, err := store.Load(id)
			if err != nil {
				t.Fatal(err)
			}
			if st.Phase != snapshot.PhaseDone || st.Error != "" {
				t.Fatalf("final state %s %q, want done", st.Phase, st.Error)
			}
			ref, _ := name.ParseReference(target, name.Insecure)
			pushed, err := remote.Image(ref)
			if err != nil {
				t.Fatal(err)
			}
			checkPushed(t, pushed, base, st, layerTar, tc.wantMT, tc.layerMT)
			if want := ref.Context().Digest(st.Digest).String(); st.PushedRef != want {
				t.Errorf("pushed_ref = %q, want %q", st.PushedRef, want)
			}
			if st.UploaderPID == 0 || st.Progress.Done != st.Progress.Total {
				t.Errorf("uploader_pid %d, progress %+v", st.UploaderPID, st.Progress)
			}

			dir := store.Dir(id)
			for _, gone := range []string{snapshot.DataDir, snapshot.LayerFile, snapshot.LayerFile + ".partial"} {
				if exists(filepath.Join(dir, gone)) {
					t.Errorf("%s left after success", gone)
				}
			}
			for _, kept := range []string{snapshot.ManifestFile, snapshot.StateFile} {
				if !exists(filepath.Join(dir, kept)) {
					t.Errorf("%s removed", kept)
				}
			}
			if !strings.Contains(logBuf.String(), "done: pushed") {
				t.Errorf("log lacks the result:\n%s", logBuf.String())
			}
		})
	}
}

// checkPushed asserts that pushed = base + one layer holding layerTar, as
// recorded in st.
func checkPushed(t *testing.T, pushed, base v1.Image, st *snapshot.State, layerTar []byte, wantMT, layerMT types.MediaType) {
	t.Helper()
	var vopts []validate.Option
	if layerMT == types.OCILayerZStd {
		vopts = append(vopts, validate.Fast) // validate's deep check is gzip-only
	}
	if err := validate.Image(pushed, vopts...); err != nil {
		t.Fatalf("pushed image invalid: %v", err)
	}
	d, _ := pushed.Digest()
	if st.Digest != d.String() {
		t.Errorf("state digest %s, registry has %s", st.Digest, d)
	}
	if mt, _ := pushed.MediaType(); mt != wantMT {
		t.Errorf("manifest media type %s, want %s", mt, wantMT)
	}
	m, _ := pushed.Manifest()
	bm, _ := base.Manifest()
	if len(m.Layers) != len(bm.Layers)+1 {
		t.Fatalf("pushed has %d layers, want %d", len(m.Layers), len(bm.Layers)+1)
	}
	// Media types stay the base's unless the image was converted to OCI.
	sameTypes := wantMT == bm.MediaType
	for i, l := range bm.Layers {
		if m.Layers[i].Digest != l.Digest || m.Layers[i].Size != l.Size || sameTypes && m.Layers[i].MediaType != l.MediaType {
			t.Errorf("base layer %d changed: %v", i, m.Layers[i])
		}
	}
	if sameTypes && m.Config.MediaType != bm.Config.MediaType {
		t.Errorf("config media type %s, want %s", m.Config.MediaType, bm.Config.MediaType)
	}
	newDesc := m.Layers[len(m.Layers)-1]
	if newDesc.MediaType != layerMT {
		t.Errorf("new layer media type %s, want %s", newDesc.MediaType, layerMT)
	}
	if newDesc.Digest.String() != st.LayerDigest {
		t.Errorf("new layer digest %s, state says %s", newDesc.Digest, st.LayerDigest)
	}
	cf, _ := pushed.ConfigFile()
	bcf, _ := base.ConfigFile()
	if got, want := cf.RootFS.DiffIDs[len(cf.RootFS.DiffIDs)-1], sha256Hash(layerTar); got != want {
		t.Errorf("new diff_id %s, want sha256 of the tar %s", got, want)
	}
	if len(cf.History) != len(bcf.History)+1 {
		t.Fatalf("history has %d entries, want %d", len(cf.History), len(bcf.History)+1)
	}
	h := cf.History[len(cf.History)-1]
	if h.CreatedBy != "seamless snapshot "+st.ID || !h.Created.Time.Equal(capturedAt) || !strings.Contains(h.Comment, "container c1") {
		t.Errorf("history entry %+v", h)
	}
	if !cf.Created.Time.Equal(capturedAt) {
		t.Errorf("config created %v, want %v", cf.Created, capturedAt)
	}
	layers, _ := pushed.Layers()
	rc, err := layers[len(layers)-1].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	var got bytes.Buffer
	got.ReadFrom(rc)
	if !bytes.Equal(got.Bytes(), layerTar) {
		t.Error("pushed layer content differs from the tar")
	}
	crc, err := layers[len(layers)-1].Compressed()
	if err != nil {
		t.Fatal(err)
	}
	defer crc.Close()
	if h, _, err := v1.SHA256(crc); err != nil || h != newDesc.Digest {
		t.Errorf("pushed layer blob hashes to %s (%v), manifest says %s", h, err, newDesc.Digest)
	}
}

func TestUploadDoesNotResendBaseLayers(t *testing.T) {
	reg := newTestRegistry(t)
	store := snapshot.Store{Root: t.TempDir()}
	base := baseImage(t, false)
	baseLayers, _ := base.Layers()

	for i, tag := range []string{"one", "two"} {
		id := fmt.Sprintf("s%d", i)
		target := reg.host + "/test/app:" + tag
		newSnapshot(t, store, id, target)
		mark := reg.mark()
		err := Upload(context.Background(), store, id, Options{
			Layer: bytesLayer(tarOf(t, "file", "content of "+tag)),
			Base:  fixedBase(base, &trackingCloser{}),
		})
		if err != nil {
			t.Fatalf("upload %s: %v", tag, err)
		}
		digests, posts := blobUploads(reg.since(mark))
		var baseSent []string
		for _, l := range baseLayers {
			d, _ := l.Digest()
			if slices.Contains(digests, d.String()) {
				baseSent = append(baseSent, d.String())
			}
		}
		switch i {
		case 0:
			if len(baseSent) != len(baseLayers) || len(digests) != len(baseLayers)+2 {
				t.Errorf("first push uploaded %v; want the %d base layers + layer + config", digests, len(baseLayers))
			}
		case 1:
			if len(baseSent) != 0 || len(digests) != 2 || posts != 2 {
				t.Errorf("second push uploaded %v (%d upload sessions); want only the new layer and config", digests, posts)
			}
		}
	}
}

func TestUploadUnreachableRegistry(t *testing.T) {
	store := snapshot.Store{Root: t.TempDir()}
	target := "127.0.0.1:1/x:1"
	newSnapshot(t, store, "s1", target)
	var logBuf bytes.Buffer
	err := Upload(context.Background(), store, "s1", Options{
		Layer: bytesLayer(tarOf(t, "a", "b")),
		Base:  fixedBase(baseImage(t, false), &trackingCloser{}),
		Log:   &logBuf,
		Retry: fastRetry,
	})
	if err == nil {
		t.Fatal("Upload to 127.0.0.1:1 succeeded")
	}
	st, _ := store.Load("s1")
	if st.Phase != snapshot.PhaseFailed || !strings.HasPrefix(st.Error, "push "+target+": ") || !strings.Contains(st.Error, "connection refused") {
		t.Fatalf("state %s %q; want failed with 'push %s: ... connection refused'", st.Phase, st.Error, target)
	}
	t.Logf("state error: %s", st.Error)
	if !strings.Contains(logBuf.String(), "retrying") {
		t.Errorf("no retry logged:\n%s", logBuf.String())
	}
	if !exists(filepath.Join(store.Dir("s1"), snapshot.DataDir)) {
		t.Error("data removed after a failure")
	}
}

func TestUploadRetriesUntilRegistryComesUp(t *testing.T) {
	// Reserve a port, free it: the first attempt is refused.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()

	reg := &testRegistry{}
	srv := httptest.NewUnstartedServer(reg.handler())
	t.Cleanup(srv.Close)
	started := make(chan struct{})
	startOnRetry := writerFunc(func(p []byte) (int, error) {
		if strings.Contains(string(p), "retrying") {
			select {
			case <-started:
			default:
				ln, err := net.Listen("tcp", addr)
				if err != nil {
					return 0, err
				}
				srv.Listener = ln
				srv.Start()
				close(started)
			}
		}
		return len(p), nil
	})

	store := snapshot.Store{Root: t.TempDir()}
	newSnapshot(t, store, "s1", addr+"/late/app:1")
	err = Upload(context.Background(), store, "s1", Options{
		Layer: bytesLayer(tarOf(t, "a", "b")),
		Base:  fixedBase(baseImage(t, true), &trackingCloser{}),
		Log:   startOnRetry,
		Retry: Retry{For: 10 * time.Second, Initial: 50 * time.Millisecond},
	})
	if err != nil {
		t.Fatalf("Upload: %v", err)
	}
	if st, _ := store.Load("s1"); st.Phase != snapshot.PhaseDone {
		t.Fatalf("phase %s (%s), want done", st.Phase, st.Error)
	}
}

// timeoutError is a net.Error that timed out.
type timeoutError struct{}

func (timeoutError) Error() string   { return "i/o timeout" }
func (timeoutError) Timeout() bool   { return true }
func (timeoutError) Temporary() bool { return true }

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

func TestUploadBadRequests(t *testing.T) {
	for _, tc := range []struct {
		name, target, compression, want string
	}{
		{"malformed target", "Bad Ref::x", "", `invalid target "Bad Ref::x"`},
		{"empty target", "", "", "no target reference"},
		{"unknown compression", "127.0.0.1:5000/a:1", "lz4", `unsupported compression "lz4"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			store := snapshot.Store{Root: t.TempDir()}
			st := newSnapshot(t, store, "s1", tc.target)
			st.Request.Compression = tc.compression
			if err := store.Save(st); err != nil {
				t.Fatal(err)
			}
			called := false
			err := Upload(context.Background(), store, "s1", Options{
				Layer: func(context.Context, io.Writer) error { called = true; return nil },
				Base:  fixedBase(baseImage(t, false), &trackingCloser{}),
			})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Upload = %v; want %q", err, tc.want)
			}
			st, _ = store.Load("s1")
			if st.Phase != snapshot.PhaseFailed || !strings.Contains(st.Error, tc.want) {
				t.Fatalf("state %s %q; want failed with %q", st.Phase, st.Error, tc.want)
			}
			if called {
				t.Error("layer built despite a bad request")
			}
		})
	}
}

func TestUploadLayerWriterFails(t *testing.T) {
	store := snapshot.Store{Root: t.TempDir()}
	newSnapshot(t, store, "s1", "127.0.0.1:1/x:1")
	closer := &trackingCloser{}
	err := Upload(context.Background(), store, "s1", Options{
		Layer: func(_ context.Context, w io.Writer) error {
			w.Write([]byte("partial"))
			return errors.New("boom")
		},
		Base: fixedBase(baseImage(t, false), closer),
	})
	if err == nil {
		t.Fatal("no error")
	}
	st, _ := store.Load("s1")
	if st.Phase != snapshot.PhaseFailed || st.Error != "build layer: boom" {
		t.Fatalf("state %s %q", st.Phase, st.Error)
	}
	for _, f := range []string{snapshot.LayerFile, snapshot.LayerFile + ".partial"} {
		if exists(filepath.Join(store.Dir("s1"), f)) {
			t.Errorf("%s left behind", f)
		}
	}
	if !closer.closed {
		t.Error("base not closed")
	}
}

func TestUploadBaseFails(t *testing.T) {
	store := snapshot.Store{Root: t.TempDir()}
	newSnapshot(t, store, "s1", "127.0.0.1:1/x:1") // Base.Source unset
	err := Upload(context.Background(), store, "s1", Options{Layer: bytesLayer(nil)})
	if err == nil || !strings.Contains(err.Error(), "open base image: state has no base image source") {
		t.Fatalf("Upload = %v", err)
	}
	if st, _ := store.Load("s1"); st.Phase != snapshot.PhaseFailed {
		t.Fatalf("phase %s", st.Phase)
	}
}

func TestUploadInterrupted(t *testing.T) {
	store := snapshot.Store{Root: t.TempDir()}
	newSnapshot(t, store, "s1", "127.0.0.1:1/x:1")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	err := Upload(ctx, store, "s1", Options{
		Layer: func(ctx context.Context, w io.Writer) error {
			if _, err := w.Write(make([]byte, 4096)); err != nil {
				return err
			}
			cancel()
			// A writer ignoring ctx is stopped by the next write.
			_, err := w.Write(make([]byte, 4096))
			return err
		},
		Base: fixedBase(baseImage(t, false), &trackingCloser{}),
	})
	if !errors.Is(err, ErrInterrupted) {
		t.Fatalf("Upload = %v, want ErrInterrupted", err)
	}
	st, _ := store.Load("s1")
	if st.Phase != snapshot.PhaseFailed || st.Error != "interrupted" {
		t.Fatalf("state %s %q, want failed/interrupted", st.Phase, st.Error)
	}
	if exists(filepath.Join(store.Dir("s1"), snapshot.LayerFile+".partial")) {
		t.Error("partial spool left behind")
	}
}

func TestUploadZstd(t *testing.T) {
	reg := newTestRegistry(t)
	store := snapshot.Store{Root: t.TempDir()}
	target := reg.host + "/test/zstd:1"
	st := newSnapshot(t, store, "s1", target)
	st.Request.Compression = "zstd"
	if err := store.Save(st); err != nil {
		t.Fatal(err)
	}
	layerTar := tarOf(t, "z", strings.Repeat("z", 10000))
	base := baseImage(t, true)
	if err := Upload(context.Background(), store, "s1", Options{Layer: bytesLayer(layerTar), Base: fixedBase(base, &trackingCloser{})}); err != nil {
		t.Fatal(err)
	}
	st, _ = store.Load("s1")
	ref, _ := name.ParseReference(target, name.Insecure)
	pushed, err := remote.Image(ref)
	if err != nil {
		t.Fatal(err)
	}
	checkPushed(t, pushed, base, st, layerTar, types.OCIManifestSchema1, types.OCILayerZStd)
	if exists(filepath.Join(store.Dir("s1"), "layer.tar.zst")) {
		t.Error("zstd spool left after success")
	}
}

func TestUploadDoneIsLeftAlone(t *testing.T) {
	store := snapshot.Store{Root: t.TempDir()}
	st := newSnapshot(t, store, "s1", "127.0.0.1:1/x:1")
	st.Phase = snapshot.PhaseDone
	st.Digest = "sha256:abc"
	store.Save(st)
	if err := Upload(context.Background(), store, "s1", Options{}); err != nil {
		t.Fatal(err)
	}
	if st2, _ := store.Load("s1"); st2.Phase != snapshot.PhaseDone || st2.Digest != "sha256:abc" {
		t.Fatalf("done snapshot changed: %+v", st2)
	}
}

func TestTransient(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{&net.OpError{Op: "dial", Err: errors.New("connection refused")}, true},
		{fmt.Errorf("push: %w", io.ErrUnexpectedEOF), true},
		{context.Canceled, false},
		{errors.New("unauthorized"), false},
		{&url.Error{Op: "Get", URL: "http://r/v2/", Err: &net.OpError{Op: "dial", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}}, true},
		{&url.Error{Op: "Put", URL: "http://r/v2/", Err: syscall.ECONNRESET}, true},
		{&transport.Error{StatusCode: http.StatusTooManyRequests}, true},
		{&transport.Error{StatusCode: http.StatusServiceUnavailable}, true},
		{&transport.Error{StatusCode: http.StatusInternalServerError}, true},
		{&transport.Error{StatusCode: http.StatusUnauthorized}, false},
		{&transport.Error{StatusCode: http.StatusNotFound}, false},
		{&url.Error{Op: "Get", URL: "https://r/v2/", Err: &tls.CertificateVerificationError{Err: x509.UnknownAuthorityError{}}}, false},
		{&url.Error{Op: "Get", URL: "https://r/v2/", Err: &net.OpError{Op: "remote error", Err: errors.New("tls: bad certificate")}}, false},
		{&url.Error{Op: "Get", URL: "https://r/v2/", Err: timeoutError{}}, true},
	} {
		if got := transient(tc.err); got != tc.want {
			t.Errorf("transient(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}
