package uploader

import (
	"bytes"
	"context"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/seamless-snapshot/seamless/snapshot"
)

// failFirst answers the first n requests with status code, then lets the
// registry serve.
func failFirst(n int32, code int) (func(http.ResponseWriter, *http.Request) bool, *atomic.Int32) {
	var count atomic.Int32
	return func(w http.ResponseWriter, r *http.Request) bool {
		if count.Add(1) > n {
			return false
		}
		if code == http.StatusTooManyRequests {
			w.Header().Set("Retry-After", "1")
		}
		http.Error(w, http.StatusText(code), code)
		return true
	}, &count
}

// TestPushRetriesTransientAnswers: 5xx and 429 answers are retried with
// growing waits until the push goes through.
func TestPushRetriesTransientAnswers(t *testing.T) {
	for _, code := range []int{http.StatusServiceUnavailable, http.StatusTooManyRequests, http.StatusBadGateway} {
		t.Run(http.StatusText(code), func(t *testing.T) {
			reg := newTestRegistry(t)
			f, _ := failFirst(4, code)
			reg.setIntercept(f)
			store := snapshot.Store{Root: t.TempDir()}
			newSnapshot(t, store, "s1", reg.host+"/retry/app:1")
			var logBuf bytes.Buffer
			start := time.Now()
			err := Upload(context.Background(), store, "s1", Options{
				Layer: bytesLayer(tarOf(t, "a", "b")),
				Base:  fixedBase(baseImage(t, false), &trackingCloser{}),
				Log:   &logBuf,
				Retry: Retry{For: time.Minute, Initial: 20 * time.Millisecond, Max: 100 * time.Millisecond},
			})
			if err != nil {
				t.Fatalf("Upload: %v\n%s", err, logBuf.String())
			}
			st, _ := store.Load("s1")
			if st.Phase != snapshot.PhaseDone || st.Upload.Retries != 4 {
				t.Fatalf("phase %s, retries %d; want done after 4 retries\n%s", st.Phase, st.Upload.Retries, logBuf.String())
			}
			// Waits of 20, 40, 80, 100 ms, each jittered to 50–150 %.
			if d := time.Since(start); d < 120*time.Millisecond {
				t.Errorf("4 retries took %v: no backoff", d)
			}
			if n := strings.Count(logBuf.String(), "retrying in"); n != 4 {
				t.Errorf("%d retries logged, want 4:\n%s", n, logBuf.String())
			}
		})
	}
}

// TestPushGivesUpAfterRetryTimeout: the request's retry timeout bounds the
// retries of a registry that stays unavailable.
func TestPushGivesUpAfterRetryTimeout(t *testing.T) {
	reg := newTestRegistry(t)
	f, count := failFirst(1<<30, http.StatusServiceUnavailable)
	reg.setIntercept(f)
	store := snapshot.Store{Root: t.TempDir()}
	st := newSnapshot(t, store, "s1", reg.host+"/retry/app:1")
	st.Request.RetryTimeout = snapshot.Duration(300 * time.Millisecond)
	store.Save(st)
	start := time.Now()
	err := Upload(context.Background(), store, "s1", Options{
		Layer: bytesLayer(tarOf(t, "a", "b")),
		Base:  fixedBase(baseImage(t, false), &trackingCloser{}),
		Retry: Retry{For: time.Hour, Initial: 20 * time.Millisecond, Max: 40 * time.Millisecond},
	})
	d := time.Since(start)
	if err == nil || !strings.Contains(err.Error(), "503") || !strings.Contains(err.Error(), "gave up after retrying for") {
		t.Fatalf("Upload = %v", err)
	}
	// It gives up when the next wait would end past the timeout.
	if d < 150*time.Millisecond || d > 5*time.Second || count.Load() < 5 {
		t.Errorf("gave up after %v and %d requests; want up to 300ms of retries", d, count.Load())
	}
	if st, _ := store.Load("s1"); st.Phase != snapshot.PhaseFailed {
		t.Errorf("phase %s", st.Phase)
	}
}

// TestPushDoesNotRetryPermanentErrors: a 401 fails at once.
func TestPushDoesNotRetryPermanentErrors(t *testing.T) {
	reg := newTestRegistry(t)
	f, count := failFirst(1<<30, http.StatusUnauthorized)
	reg.setIntercept(f)
	store := snapshot.Store{Root: t.TempDir()}
	newSnapshot(t, store, "s1", reg.host+"/retry/app:1")
	err := Upload(context.Background(), store, "s1", Options{
		Layer: bytesLayer(tarOf(t, "a", "b")),
		Base:  fixedBase(baseImage(t, false), &trackingCloser{}),
		Retry: Retry{For: time.Hour, Initial: time.Hour},
	})
	if err == nil || count.Load() > 3 {
		t.Fatalf("Upload = %v after %d requests; want a failure without retries", err, count.Load())
	}
}

// TestMediaTypes: the new image keeps the base's media types unless zstd
// or OCI are asked for, in which case a Docker base turns OCI.
func TestMediaTypes(t *testing.T) {
	for _, tc := range []struct {
		name        string
		ociBase     bool
		compression string
		oci         bool
		manifest    types.MediaType
		config      types.MediaType
		baseLayer   types.MediaType
		newLayer    types.MediaType
	}{
		{"docker gzip", false, "gzip", false, types.DockerManifestSchema2, types.DockerConfigJSON, types.DockerLayer, types.DockerLayer},
		{"docker gzip oci", false, "gzip", true, types.OCIManifestSchema1, types.OCIConfigJSON, types.OCILayer, types.OCILayer},
		{"docker zstd", false, "zstd", false, types.OCIManifestSchema1, types.OCIConfigJSON, types.OCILayer, types.OCILayerZStd},
		{"oci gzip", true, "gzip", false, types.OCIManifestSchema1, types.OCIConfigJSON, types.OCILayer, types.OCILayer},
		{"oci zstd", true, "zstd", false, types.OCIManifestSchema1, types.OCIConfigJSON, types.OCILayer, types.OCILayerZStd},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reg := newTestRegistry(t)
			store := snapshot.Store{Root: t.TempDir()}
			target := reg.host + "/mt/app:1"
			st := newSnapshot(t, store, "s1", target)
			st.Request.Compression, st.Request.OCI = tc.compression, tc.oci
			store.Save(st)
			base := baseImage(t, tc.ociBase)
			layerTar := tarOf(t, "f", "content")
			if err := Upload(context.Background(), store, "s1", Options{Layer: bytesLayer(layerTar), Base: fixedBase(base, &trackingCloser{})}); err != nil {
				t.Fatal(err)
			}
			ref, _ := name.ParseReference(target, name.Insecure)
			desc, err := remote.Get(ref)
			if err != nil {
				t.Fatal(err)
			}
			img, _ := desc.Image()
			m, _ := img.Manifest()
			if desc.MediaType != tc.manifest || m.Config.MediaType != tc.config {
				t.Errorf("manifest %s config %s; want %s %s", desc.MediaType, m.Config.MediaType, tc.manifest, tc.config)
			}
			bm, _ := base.Manifest()
			for i := range bm.Layers {
				if m.Layers[i].MediaType != tc.baseLayer || m.Layers[i].Digest != bm.Layers[i].Digest {
					t.Errorf("base layer %d: %s %s; want %s %s", i, m.Layers[i].MediaType, m.Layers[i].Digest, tc.baseLayer, bm.Layers[i].Digest)
				}
			}
			if got := m.Layers[len(m.Layers)-1].MediaType; got != tc.newLayer {
				t.Errorf("new layer %s, want %s", got, tc.newLayer)
			}
			st, _ = store.Load("s1")
			checkPushed(t, img, base, st, layerTar, tc.manifest, tc.newLayer)
		})
	}
}

// fakeKeychain records the registries it was asked about.
type fakeKeychain struct {
	name  string
	auth  authn.Authenticator
	asked []string
}

func (k *fakeKeychain) Resolve(r authn.Resource) (authn.Authenticator, error) {
	k.asked = append(k.asked, r.RegistryStr())
	return k.auth, nil
}

// TestKeychainSelection: ECR hosts ask the ECR helper first, then Docker's
// config; other hosts ask Docker's config only (never AWS).
func TestKeychainSelection(t *testing.T) {
	ecrAuth := authn.FromConfig(authn.AuthConfig{Username: "AWS", Password: "ecr-token"})
	dockerAuth := authn.FromConfig(authn.AuthConfig{Username: "u", Password: "docker-secret"})
	for _, tc := range []struct {
		host      string
		ecrHasIt  bool
		want      authn.Authenticator
		askECR    bool
		askDocker bool
	}{
		{"123456789012.dkr.ecr.eu-west-1.amazonaws.com", true, ecrAuth, true, false},
		{"123456789012.dkr.ecr.eu-west-1.amazonaws.com", false, dockerAuth, true, true},
		{"123456789012.dkr.ecr-fips.us-gov-west-1.amazonaws.com", true, ecrAuth, true, false},
		{"123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn", true, ecrAuth, true, false},
		{"public.ecr.aws", true, ecrAuth, true, false},
		{"registry.example.com", true, dockerAuth, false, true},
		{"127.0.0.1:5000", true, dockerAuth, false, true},
		{"dkr.ecr.eu-west-1.amazonaws.com.evil.example", true, dockerAuth, false, true},
		{"index.docker.io", true, dockerAuth, false, true},
	} {
		ecrKC := &fakeKeychain{name: "ecr", auth: authn.Anonymous}
		if tc.ecrHasIt {
			ecrKC.auth = ecrAuth
		}
		dockerKC := &fakeKeychain{name: "docker", auth: dockerAuth}
		kc := &hostKeychain{docker: dockerKC, ecr: ecrKC}
		reg, err := name.NewRegistry(tc.host)
		if err != nil {
			t.Fatal(err)
		}
		got, err := kc.Resolve(reg)
		if err != nil || got != tc.want {
			t.Errorf("%s: got %v, %v; want %v", tc.host, got, err, tc.want)
		}
		if (len(ecrKC.asked) > 0) != tc.askECR || (len(dockerKC.asked) > 0) != tc.askDocker {
			t.Errorf("%s: asked ECR %v, Docker %v; want %v, %v", tc.host, ecrKC.asked, dockerKC.asked, tc.askECR, tc.askDocker)
		}
	}
	if _, ok := NewKeychain(nil).(*hostKeychain); !ok {
		t.Error("NewKeychain is not the host-selecting keychain")
	}
}

func TestIsBlobPath(t *testing.T) {
	for path, want := range map[string]bool{
		"/v2/app/blobs/sha256:abc":            true,
		"/v2/org/team/app/blobs/sha256:abc":   true,
		"/v2/app/blobs/uploads/":              false,
		"/v2/app/blobs/uploads/1f2e-33":       false,
		"/v2/app/manifests/sha256:abc":        false,
		"/v2/blobs/blobs/sha256:abc":          true,
		"/v2/":                                false,
		"/token/app/blobs/sha256:abc":         false,
		"/v2/app/blobs/sha256:abc/extra:path": false,
	} {
		if got := isBlobPath(path); got != want {
			t.Errorf("isBlobPath(%q) = %v, want %v", path, got, want)
		}
	}
}
