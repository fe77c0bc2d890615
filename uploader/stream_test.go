package uploader

import (
	"bytes"
	"context"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/seamless-snapshot/seamless/snapshot"
)

// TestStreamedUpload: a big layer is uploaded while it is built, once; the
// push then only sends the config and the manifest. When the streamed
// upload fails, the spool is pushed instead.
func TestStreamedUpload(t *testing.T) {
	layerTar := tarOf(t, "big", string(mixedData(7, streamMin+(8<<20))))
	for _, failStream := range []bool{false, true} {
		t.Run(map[bool]string{false: "streamed", true: "stream fails"}[failStream], func(t *testing.T) {
			reg := newTestRegistry(t)
			var patches atomic.Int32
			if failStream {
				reg.setIntercept(func(w http.ResponseWriter, r *http.Request) bool {
					if r.Method == http.MethodPatch && patches.Add(1) == 1 {
						http.Error(w, "disk trouble", http.StatusInternalServerError)
						return true
					}
					return false
				})
			}
			store := snapshot.Store{Root: t.TempDir()}
			target := reg.host + "/stream/app:1"
			newSnapshot(t, store, "s1", target)
			base := baseImage(t, false)
			var logBuf bytes.Buffer
			err := Upload(context.Background(), store, "s1", Options{
				Layer: bytesLayer(layerTar), LayerSize: int64(len(layerTar)),
				Base: fixedBase(base, &trackingCloser{}), Log: &logBuf,
				Retry: Retry{Initial: 10 * time.Millisecond},
			})
			if err != nil {
				t.Fatalf("Upload: %v\n%s", err, logBuf.String())
			}
			st, _ := store.Load("s1")
			digests, _ := blobUploads(reg.since(0))
			n := 0
			for _, d := range digests {
				if d == st.LayerDigest {
					n++
				}
			}
			if n != 1 {
				t.Errorf("layer blob committed %d times, want 1 (uploads %v)", n, digests)
			}
			wantLog := "uploaded during the build"
			if failStream {
				wantLog = "the spool is pushed instead"
			}
			if !strings.Contains(logBuf.String(), wantLog) {
				t.Errorf("log lacks %q:\n%s", wantLog, logBuf.String())
			}
			if !failStream && (st.Upload.PushedBytes < st.LayerSize || st.Upload.PushedBytes > st.LayerSize+64<<10) {
				t.Errorf("sent %d bytes for a %d-byte layer (and small blobs): sent twice?", st.Upload.PushedBytes, st.LayerSize)
			}
			ref, _ := name.ParseReference(target, name.Insecure)
			pushed, err := remote.Image(ref)
			if err != nil {
				t.Fatal(err)
			}
			checkPushed(t, pushed, base, st, layerTar, types.DockerManifestSchema2, types.DockerLayer)
		})
	}
}
