// Package uploader turns a sealed capture into an image and pushes it: the
// capture's layer tar is compressed in parallel into a spool file while
// both hashes are computed, appended to the container's base image, and
// written to the target registry with retries. It runs as a detached
// process (see Start and Main), reports through the snapshot's state.json,
// and can be resumed after it died (see Resume): a complete spool is
// reused, otherwise the same layer is rebuilt from the capture.
package uploader

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/seamless-snapshot/seamless/baseimage"
	"github.com/seamless-snapshot/seamless/internal/proc"
	"github.com/seamless-snapshot/seamless/snapshot"
)

// LayerWriter writes the uncompressed layer tar of a capture to w. It must
// be deterministic: a resumed upload rebuilds the layer and expects the
// same digest.
type LayerWriter func(ctx context.Context, w io.Writer) error

// BaseFunc opens the base image the new layer is appended to. The Closer is
// closed once the push is over.
type BaseFunc func(ctx context.Context) (v1.Image, io.Closer, error)

// Options configure Upload.
type Options struct {
	// Layer produces the uncompressed layer tar. Required unless a spool
	// of an earlier run is reused.
	Layer LayerWriter
	// LayerSize estimates the size of Layer's tar, for progress (default:
	// the captured bytes).
	LayerSize int64
	// Base opens the base image; nil reads the state's Base from containerd.
	Base BaseFunc
	// Keychain resolves registry credentials (default NewKeychain).
	Keychain authn.Keychain
	// Log receives progress and error lines (default io.Discard). Never
	// gets credentials.
	Log io.Writer
	// Transport is the HTTP transport to the registry (default: a clone of
	// remote.DefaultTransport, with TLS verification off for Request.Insecure).
	Transport http.RoundTripper
	// Retry governs retries of transient push errors; the request's
	// RetryTimeout overrides Retry.For.
	Retry Retry
	// ProgressInterval is the minimum time between progress writes of
	// state.json (default 250ms).
	ProgressInterval time.Duration

	// stall stops the upload for good at a point (tests, see envTestStall).
	stall stallPoint
}

func (o Options) withDefaults() Options {
	if o.Log == nil {
		o.Log = io.Discard
	}
	if o.Keychain == nil {
		o.Keychain = NewKeychain(o.Log)
	}
	if o.ProgressInterval <= 0 {
		o.ProgressInterval = 250 * time.Millisecond
	}
	return o
}

// ErrInterrupted is the state error of an upload whose context was cancelled
// (e.g. the uploader got SIGTERM).
var ErrInterrupted = errors.New("interrupted")

// Upload builds and pushes snapshot id of store: phases building → pushing →
// done, or failed with a message in state.json (and the returned error). A
// spool recorded by an earlier run is reused when intact. On success the
// capture data and the spool are removed; manifest.json and state.json
// stay. An already done snapshot is left alone.
func Upload(ctx context.Context, store snapshot.Store, id string, opts Options) error {
	st, err := store.Load(id)
	if err != nil {
		return err
	}
	if st.Phase == snapshot.PhaseDone {
		return nil
	}
	o := opts.withDefaults()
	sw := newStateWriter(store, st, o.ProgressInterval, o.Log)
	defer sw.close()
	u := &upload{opts: o, state: sw, store: store, dir: store.Dir(id)}
	err = u.run(ctx)
	if err == nil {
		return nil
	}
	msg := err.Error()
	if ctx.Err() != nil {
		msg = ErrInterrupted.Error()
		err = fmt.Errorf("%w: %w", ErrInterrupted, err)
	}
	u.logf("failed: %v", err)
	if serr := sw.update(func(st *snapshot.State) {
		st.Phase = snapshot.PhaseFailed
		st.Error = msg
		st.Upload.FinishedAt = time.Now().UTC()
	}); serr != nil {
		u.logf("%v", serr)
	}
	return err
}

// upload is one run of Upload.
type upload struct {
	opts  Options
	state *stateWriter
	store snapshot.Store
	dir   string
}

func (u *upload) logf(format string, args ...any) {
	fmt.Fprintf(u.opts.Log, "%s uploader: %s\n", time.Now().UTC().Format(time.RFC3339Nano), fmt.Sprintf(format, args...))
}

// run does the work of Upload; any error leaves the state to the caller.
func (u *upload) run(ctx context.Context) error {
	st := u.state.snapshot()
	ref, err := parseTarget(st.Target, st.Request)
	if err != nil {
		return err
	}
	codec, err := codecFor(st.Request.Compression)
	if err != nil {
		return err
	}
	pid := os.Getpid()
	start, _ := proc.StartTime(pid)
	if err := u.state.update(func(st *snapshot.State) {
		st.UploaderPID, st.UploaderStart = pid, start
		st.Error = ""
		st.Upload.Runs++
		st.Upload.FinishedAt = time.Time{}
		if st.Upload.StartedAt.IsZero() {
			st.Upload.StartedAt = time.Now().UTC()
		}
	}); err != nil {
		return err
	}
	u.logf("snapshot %s of container %s (%d entries, %d bytes) to %s, pid %d, run %d", st.ID, st.Container, st.Entries, st.Bytes, ref, pid, st.Upload.Runs+1)
	base, closer, err := u.openBase(ctx, st)
	if err != nil {
		return err
	}
	defer closer.Close()
	if d, err := base.Digest(); err == nil {
		u.logf("base image %s %s", st.Base.Ref, d)
	}
	layer, err := u.build(ctx, codec, ref)
	if err != nil {
		return err
	}
	mountFrom := u.mountSource(st, ref)
	if mountFrom != nil {
		u.logf("base layers the target lacks are mounted from %s when it has them", mountFrom.Context())
	}
	img, err := appendLayer(base, layer, st, imageOptions{oci: st.Request.OCI, mountFrom: mountFrom})
	if err != nil {
		return err
	}
	digest, err := u.push(ctx, ref, img, st.Request)
	if err != nil {
		return err
	}
	return u.finish(ref, digest, layer)
}

// parseTarget parses the target reference, allowing plain HTTP when asked.
func parseTarget(target string, req snapshot.Request) (name.Reference, error) {
	if target == "" {
		target = req.Target
	}
	if target == "" {
		return nil, errors.New("no target reference")
	}
	var opts []name.Option
	if req.PlainHTTP || req.Insecure {
		opts = append(opts, name.Insecure)
	}
	ref, err := name.ParseReference(target, opts...)
	if err != nil {
		return nil, fmt.Errorf("invalid target %q: %w", target, err)
	}
	return ref, nil
}

// openBase opens the base image through opts.Base or, by default, from
// containerd as recorded in the state.
func (u *upload) openBase(ctx context.Context, st snapshot.State) (v1.Image, io.Closer, error) {
	open := u.opts.Base
	if open == nil {
		open = func(ctx context.Context) (v1.Image, io.Closer, error) { return baseFromState(ctx, st.Base) }
	}
	img, closer, err := open(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("open base image: %w", err)
	}
	if closer == nil {
		closer = io.NopCloser(nil)
	}
	return img, closer, nil
}

// baseFromState opens the base image the state records.
func baseFromState(ctx context.Context, b snapshot.Base) (v1.Image, io.Closer, error) {
	switch b.Source {
	case "containerd":
		if b.Ref == "" {
			return nil, nil, errors.New("state has no base image name")
		}
		return baseimage.FromContainerd(ctx, b.ContainerdAddress, b.ContainerdNamespace, b.Ref)
	case "registry":
		return baseimage.FromRegistry(ctx, b.Ref, baseimage.RegistryOptions{PlainHTTP: b.PlainHTTP, Insecure: b.Insecure, DiffIDs: b.DiffIDs})
	case "":
		return nil, nil, errors.New("state has no base image source")
	}
	return nil, nil, fmt.Errorf("unsupported base image source %q", b.Source)
}

// mountSource names a repository of the target's registry that may already
// hold the base layers, for cross-repository mounts: the base image's own
// repository when it lives there, else the newest earlier snapshot of the
// same base pushed to another repository of that registry. A wrong guess
// costs one request per layer: the registry then asks for the upload.
func (u *upload) mountSource(st snapshot.State, target name.Reference) name.Reference {
	registry := target.Context().RegistryStr()
	repo := target.Context().Name()
	usable := func(ref name.Reference) bool {
		return ref.Context().RegistryStr() == registry && ref.Context().Name() != repo
	}
	if ref, err := name.ParseReference(st.Base.Ref); err == nil && usable(ref) {
		return ref
	}
	if st.Base.Ref == "" {
		return nil
	}
	all, err := u.store.List()
	if err != nil {
		return nil
	}
	for i := len(all) - 1; i >= 0; i-- {
		o := all[i]
		if o.ID == st.ID || o.Phase != snapshot.PhaseDone || o.Base.Ref != st.Base.Ref || o.PushedRef == "" {
			continue
		}
		ref, err := parseTarget(o.PushedRef, o.Request)
		if err == nil && usable(ref) {
			return ref
		}
	}
	return nil
}

// finish records success and removes what is no longer needed.
func (u *upload) finish(ref name.Reference, digest v1.Hash, layer *spoolLayer) error {
	pushed := ref.Context().Digest(digest.String()).String()
	err := u.state.update(func(st *snapshot.State) {
		st.Phase = snapshot.PhaseDone
		st.Digest = digest.String()
		st.LayerDigest = layer.digest.String()
		st.PushedRef = pushed
		st.Error = ""
		st.Progress.Done = st.Progress.Total
		st.Upload.FinishedAt = time.Now().UTC()
	})
	if err != nil {
		return err
	}
	u.logf("done: pushed %s", pushed)
	for _, p := range []string{filepath.Join(u.dir, snapshot.DataDir), layer.path, layer.path + ".partial"} {
		if err := os.RemoveAll(p); err != nil {
			u.logf("clean up: %v", err)
		}
	}
	return nil
}
