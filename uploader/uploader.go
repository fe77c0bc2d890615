// Package uploader turns a sealed capture into an image and pushes it: the
// capture's layer tar is compressed into a spool file while hashing, appended
// to the container's base image, and written to the target registry. It runs
// as a detached process (see Spawn and Main) and reports through the
// snapshot's state.json.
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
	"github.com/seamless-snapshot/seamless/snapshot"
)

// LayerWriter writes the uncompressed layer tar of a capture to w.
type LayerWriter func(ctx context.Context, w io.Writer) error

// BaseFunc opens the base image the new layer is appended to. The Closer is
// closed once the push is over.
type BaseFunc func(ctx context.Context) (v1.Image, io.Closer, error)

// Retry says how often and how patiently a push is retried after a
// transient error (network failure, 408/429/5xx).
type Retry struct {
	// Attempts is the total number of push attempts (default 4).
	Attempts int
	// Backoff is the wait before the first retry, doubled each time (default 2s).
	Backoff time.Duration
	// MaxBackoff caps the wait (default 30s).
	MaxBackoff time.Duration
}

// Options configure Upload.
type Options struct {
	// Layer produces the uncompressed layer tar. Required.
	Layer LayerWriter
	// Base opens the base image; nil reads the state's Base from containerd.
	Base BaseFunc
	// Keychain resolves registry credentials (default authn.DefaultKeychain).
	Keychain authn.Keychain
	// Log receives progress and error lines (default io.Discard). Never
	// gets credentials.
	Log io.Writer
	// Transport is the HTTP transport to the registry (default: a clone of
	// remote.DefaultTransport, with TLS verification off for Request.Insecure).
	Transport http.RoundTripper
	// Retry governs retries of transient push errors.
	Retry Retry
	// ProgressInterval is the minimum time between progress writes of
	// state.json (default 250ms).
	ProgressInterval time.Duration
}

func (o Options) withDefaults() Options {
	if o.Keychain == nil {
		o.Keychain = authn.DefaultKeychain
	}
	if o.Log == nil {
		o.Log = io.Discard
	}
	if o.Retry.Attempts <= 0 {
		o.Retry.Attempts = 4
	}
	if o.Retry.Backoff <= 0 {
		o.Retry.Backoff = 2 * time.Second
	}
	if o.Retry.MaxBackoff <= 0 {
		o.Retry.MaxBackoff = 30 * time.Second
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
// done, or failed with a message in state.json (and the returned error). On
// success the capture data and the spool are removed; manifest.json and
// state.json stay. An already done snapshot is left alone.
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
	u := &upload{opts: o, state: sw, dir: store.Dir(id)}
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
	}); serr != nil {
		u.logf("%v", serr)
	}
	return err
}

// upload is one run of Upload.
type upload struct {
	opts  Options
	state *stateWriter
	dir   string
}

func (u *upload) logf(format string, args ...any) {
	fmt.Fprintf(u.opts.Log, "%s uploader: %s\n", time.Now().UTC().Format(time.RFC3339Nano), fmt.Sprintf(format, args...))
}

// run does the work of Upload; any error leaves the state to the caller.
func (u *upload) run(ctx context.Context) error {
	st := u.state.snapshot()
	if u.opts.Layer == nil {
		return errors.New("no layer writer")
	}
	ref, err := parseTarget(st.Target, st.Request)
	if err != nil {
		return err
	}
	codec, err := codecFor(st.Request.Compression)
	if err != nil {
		return err
	}
	if err := u.state.update(func(st *snapshot.State) {
		st.UploaderPID = os.Getpid()
		st.Error = ""
	}); err != nil {
		return err
	}
	u.logf("snapshot %s of container %s (%d entries, %d bytes) to %s, pid %d", st.ID, st.Container, st.Entries, st.Bytes, ref, os.Getpid())
	base, closer, err := u.openBase(ctx, st)
	if err != nil {
		return err
	}
	defer closer.Close()
	if d, err := base.Digest(); err == nil {
		u.logf("base image %s %s", st.Base.Ref, d)
	}
	layer, err := u.build(ctx, codec, st.Bytes)
	if err != nil {
		return err
	}
	img, err := appendLayer(base, layer, st)
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
	case "":
		return nil, nil, errors.New("state has no base image source")
	}
	return nil, nil, fmt.Errorf("unsupported base image source %q", b.Source)
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
	})
	if err != nil {
		return err
	}
	u.logf("done: pushed %s", pushed)
	for _, p := range []string{filepath.Join(u.dir, snapshot.DataDir), layer.path} {
		if err := os.RemoveAll(p); err != nil {
			u.logf("clean up: %v", err)
		}
	}
	return nil
}
