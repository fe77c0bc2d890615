package uploader

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/seamless-snapshot/seamless/integration/testenv"
	"github.com/seamless-snapshot/seamless/snapshot"
)

// These tests push to Debian's docker-registry (distribution 2.8), as a
// real target would behave.

func needRegistry(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("starts a registry")
	}
	if err := testenv.Prereqs(); err != nil {
		t.Skipf("needs the integration environment: %v", err)
	}
}

// dockerConfig writes a Docker config.json with auths for host and
// returns its directory.
func dockerConfig(t *testing.T, cfg map[string]any) string {
	t.Helper()
	dir := t.TempDir()
	b, _ := json.Marshal(cfg)
	if err := os.WriteFile(filepath.Join(dir, "config.json"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	return dir
}

// assertNoSecret fails if secret (plain or base64 in a basic auth pair)
// appears in the snapshot's files.
func assertNoSecret(t *testing.T, dir, user, secret string, log string) {
	t.Helper()
	needles := []string{secret, base64.StdEncoding.EncodeToString([]byte(user + ":" + secret))}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		b, _ := os.ReadFile(filepath.Join(dir, e.Name()))
		for _, n := range needles {
			if bytes.Contains(b, []byte(n)) {
				t.Errorf("%s holds the credentials", e.Name())
			}
		}
	}
	for _, n := range needles {
		if strings.Contains(log, n) {
			t.Errorf("the log holds the credentials")
		}
	}
}

// TestRegistryBasicAuth: a registry with htpasswd auth refuses an
// anonymous push (at once, not retried) and takes one with credentials
// from DOCKER_CONFIG, a static auth or a credential helper; no credential
// lands in state.json or the log.
func TestRegistryBasicAuth(t *testing.T) {
	needRegistry(t)
	const user, password = "pusher", "s3cret-Pa55"
	reg := testenv.StartRegistryT(t, testenv.RegistryOptions{Htpasswd: map[string]string{user: password}})
	base := baseImage(t, false)
	store := snapshot.Store{Root: t.TempDir()}
	upload := func(id string) (string, error) {
		var logBuf bytes.Buffer
		newSnapshot(t, store, id, reg.Host+"/auth/app:"+id)
		err := Upload(context.Background(), store, id, Options{
			Layer: bytesLayer(tarOf(t, "f", id)),
			Base:  fixedBase(base, &trackingCloser{}),
			Log:   &logBuf,
			Retry: Retry{For: time.Minute, Initial: time.Minute},
		})
		assertNoSecret(t, store.Dir(id), user, password, logBuf.String())
		return logBuf.String(), err
	}

	t.Setenv("DOCKER_CONFIG", dockerConfig(t, map[string]any{}))
	start := time.Now()
	if log, err := upload("anon"); err == nil || !strings.Contains(err.Error(), "401") || strings.Contains(log, "retrying") {
		t.Fatalf("anonymous push: %v\n%s", err, log)
	}
	if d := time.Since(start); d > 30*time.Second {
		t.Errorf("the refusal took %v: retried?", d)
	}

	auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + password))
	t.Setenv("DOCKER_CONFIG", dockerConfig(t, map[string]any{"auths": map[string]any{reg.Host: map[string]string{"auth": auth}}}))
	if log, err := upload("static"); err != nil {
		t.Fatalf("push with config.json auths: %v\n%s", err, log)
	}

	// A credential helper: docker-credential-<name> in PATH answers "get".
	bin := t.TempDir()
	helper := fmt.Sprintf("#!/bin/sh\ncat >/dev/null\necho '{\"ServerURL\":\"%s\",\"Username\":\"%s\",\"Secret\":\"%s\"}'\n", reg.Host, user, password)
	if err := os.WriteFile(filepath.Join(bin, "docker-credential-seamlesstest"), []byte(helper), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", bin+":"+os.Getenv("PATH"))
	t.Setenv("DOCKER_CONFIG", dockerConfig(t, map[string]any{"credHelpers": map[string]string{reg.Host: "seamlesstest"}}))
	if log, err := upload("helper"); err != nil {
		t.Fatalf("push with a credential helper: %v\n%s", err, log)
	}
}

// TestRegistryTLS: a registry with a self-signed certificate is refused
// (at once, with a hint) unless the request says insecure.
func TestRegistryTLS(t *testing.T) {
	needRegistry(t)
	reg := testenv.StartRegistryT(t, testenv.RegistryOptions{TLS: true})
	base := baseImage(t, false)
	store := snapshot.Store{Root: t.TempDir()}
	for _, insecure := range []bool{false, true} {
		id := fmt.Sprintf("insecure-%v", insecure)
		st := newSnapshot(t, store, id, reg.Host+"/tls/app:1")
		st.Request = snapshot.Request{Target: st.Target, Insecure: insecure}
		store.Save(st)
		var logBuf bytes.Buffer
		err := Upload(context.Background(), store, id, Options{
			Layer: bytesLayer(tarOf(t, "f", "tls")),
			Base:  fixedBase(base, &trackingCloser{}),
			Log:   &logBuf,
			Retry: Retry{For: time.Minute, Initial: time.Minute},
		})
		switch {
		case !insecure && (err == nil || !strings.Contains(err.Error(), "certificate") || !strings.Contains(err.Error(), "--target-insecure")):
			t.Errorf("verified TLS to a self-signed registry: %v", err)
		case !insecure && strings.Contains(logBuf.String(), "retrying"):
			t.Errorf("a certificate error was retried:\n%s", logBuf.String())
		case insecure && err != nil:
			t.Errorf("--target-insecure: %v\n%s", err, logBuf.String())
		}
	}
}

// TestRegistryDownMidPush: the registry dies while the layer is being
// uploaded and comes back later on the same port; the push retries through
// the outage and completes. Pushed from the spool, the outage lasts 30 s;
// uploaded while built (a big layer), the stream is given up and the spool
// pushed after a shorter outage.
func TestRegistryDownMidPush(t *testing.T) {
	needRegistry(t)
	for _, tc := range []struct {
		name     string
		streamed bool
		downFor  time.Duration
	}{
		{"from the spool", false, 30 * time.Second},
		{"while built", true, 5 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reg := testenv.StartRegistryT(t, testenv.RegistryOptions{})
			store := snapshot.Store{Root: t.TempDir()}
			target := reg.Host + "/outage/app:1"
			newSnapshot(t, store, "s1", target)
			layerTar := tarOf(t, "big", string(mixedData(4, 64<<20)))

			var stopped, restarted time.Time
			var stopOnce sync.Once
			restartErr := make(chan error, 1)
			stop := func() {
				stopped = time.Now()
				if err := reg.Stop(); err != nil {
					restartErr <- err
					return
				}
				go func() {
					time.Sleep(tc.downFor)
					restarted = time.Now()
					restartErr <- reg.Restart(context.Background())
				}()
			}
			opts := Options{
				Layer: bytesLayer(layerTar),
				Base:  fixedBase(baseImage(t, false), &trackingCloser{}),
				// Ample for the outage, short enough that a push which can
				// never succeed fails the test in minutes, not ten.
				Retry: Retry{For: 3 * time.Minute},
				// The registry stops once 8 MiB went up (the layer: the
				// base layers and the config are small).
				Transport: &sendCounter{rt: http.DefaultTransport.(*http.Transport).Clone(), onSend: func(sent int64) {
					if sent > 8<<20 {
						stopOnce.Do(stop)
					}
				}},
			}
			if tc.streamed {
				opts.LayerSize = int64(len(layerTar))
			}
			var logBuf bytes.Buffer
			opts.Log = &logBuf
			err := Upload(context.Background(), store, "s1", opts)
			if rerr := <-restartErr; rerr != nil {
				t.Fatalf("registry restart: %v", rerr)
			}
			if err != nil {
				t.Fatalf("Upload through a %v outage: %v\n%s", tc.downFor, err, logBuf.String())
			}
			st, _ := store.Load("s1")
			t.Logf("outage %v, %d retries, pushed %d bytes, upload.log:\n%s", restarted.Sub(stopped).Round(time.Second), st.Upload.Retries, st.Upload.PushedBytes, logBuf.String())
			if st.Phase != snapshot.PhaseDone || st.Upload.Retries < 2 || st.Upload.FinishedAt.Before(restarted) {
				t.Fatalf("phase %s, %d retries, finished %v (restart %v)", st.Phase, st.Upload.Retries, st.Upload.FinishedAt, restarted)
			}
			if tc.streamed != strings.Contains(logBuf.String(), "the spool is pushed instead") {
				t.Errorf("streamed %v, but the log says:\n%s", tc.streamed, logBuf.String())
			}
			if n, _ := reg.BlobUploads(st.LayerDigest); n != 1 {
				t.Errorf("layer uploaded %d times in the registry log, want 1", n)
			}
		})
	}
}

// TestBaseLayersMountedAcrossRepos: base layers already in the target
// registry are never sent again: not to the same repository (HEAD), nor
// to another one (cross-repository mount from an earlier snapshot's
// repository).
func TestBaseLayersMountedAcrossRepos(t *testing.T) {
	needRegistry(t)
	reg := testenv.StartRegistryT(t, testenv.RegistryOptions{})
	base := baseImage(t, false)
	baseLayers, _ := base.Layers()
	var baseBytes int64
	for _, l := range baseLayers {
		n, _ := l.Size()
		baseBytes += n
	}
	store := snapshot.Store{Root: t.TempDir()}
	for i, repo := range []string{"first/app:1", "first/app:2", "second/app:1", "third/other:1"} {
		id := fmt.Sprintf("s%d", i)
		st := newSnapshot(t, store, id, reg.Host+"/"+repo)
		st.Base = snapshot.Base{Ref: "example.com/base:1"} // same base for all (for the mount source)
		store.Save(st)
		var logBuf bytes.Buffer
		err := Upload(context.Background(), store, id, Options{
			Layer: bytesLayer(tarOf(t, "f", "change "+id)),
			Base:  fixedBase(base, &trackingCloser{}),
			Log:   &logBuf,
		})
		if err != nil {
			t.Fatalf("%s: %v", repo, err)
		}
		st, _ = store.Load(id)
		if i > 0 && st.Upload.PushedBytes >= baseBytes {
			t.Errorf("%s: sent %d bytes, base layers are %d: re-sent", repo, st.Upload.PushedBytes, baseBytes)
		}
		// The newest earlier snapshot of the base in another repository.
		if want := map[int]string{2: "first/app", 3: "second/app"}[i]; want != "" && !strings.Contains(logBuf.String(), "mounted from "+reg.Host+"/"+want+" ") {
			t.Errorf("%s: no mount source in the log:\n%s", repo, logBuf.String())
		}
		t.Logf("%s: %d bytes sent", repo, st.Upload.PushedBytes)
	}
	for _, l := range baseLayers {
		d, _ := l.Digest()
		if n, err := reg.BlobUploads(d.String()); err != nil || n != 1 {
			t.Errorf("base layer %s uploaded %d times (%v), want 1", d, n, err)
		}
	}
}

// TestBrokenBlobLinkReuploaded: a registry killed while it linked a blob
// into a repository leaves an empty link file, and then answers 500 to
// HEAD for that blob however long one waits. The push uploads the blob
// again (which rewrites the link) instead of retrying the HEAD until the
// retry window ends.
func TestBrokenBlobLinkReuploaded(t *testing.T) {
	needRegistry(t)
	reg := testenv.StartRegistryT(t, testenv.RegistryOptions{})
	base := baseImage(t, false)
	store := snapshot.Store{Root: t.TempDir()}
	push := func(id string) (string, error) {
		newSnapshot(t, store, id, reg.Host+"/broken/app:"+id)
		var logBuf bytes.Buffer
		err := Upload(context.Background(), store, id, Options{
			Layer: bytesLayer(tarOf(t, "f", "change "+id)),
			Base:  fixedBase(base, &trackingCloser{}),
			Log:   &logBuf,
			Retry: Retry{For: 20 * time.Second},
		})
		return logBuf.String(), err
	}
	if log, err := push("1"); err != nil {
		t.Fatalf("first push: %v\n%s", err, log)
	}
	layers, _ := base.Layers()
	d, _ := layers[0].Digest()
	link := filepath.Join(reg.StorageDir, "docker/registry/v2/repositories/broken/app/_layers", d.Algorithm, d.Hex, "link")
	if err := os.Truncate(link, 0); err != nil {
		t.Fatalf("break the link of %s: %v", d, err)
	}
	headURL := fmt.Sprintf("http://%s/v2/broken/app/blobs/%s", reg.Host, d)
	if resp, err := http.Head(headURL); err != nil {
		t.Fatal(err)
	} else if resp.StatusCode != http.StatusInternalServerError {
		t.Fatalf("HEAD with an empty link file: %s, want 500 (the registry no longer fails this way: the test is moot)", resp.Status)
	}
	log, err := push("2")
	if err != nil {
		t.Fatalf("push over a broken link: %v\n%s", err, log)
	}
	if !strings.Contains(log, "uploading the blob") || strings.Contains(log, "retrying") {
		t.Errorf("want one re-upload, no retries; log:\n%s", log)
	}
	if resp, err := http.Head(headURL); err != nil {
		t.Error(err)
	} else if resp.StatusCode != http.StatusOK {
		t.Errorf("HEAD after the push: %s, want 200", resp.Status)
	}
}
