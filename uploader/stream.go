package uploader

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/stream"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/seamless-snapshot/seamless/snapshot"
)

// streamMin is the estimated layer tar size from which the compressed layer
// is also uploaded while it is being built, so that the push of its blob
// overlaps the build. Smaller layers are pushed from the spool only.
const streamMin = 32 << 20

// streamStallTimeout is how long one write to the streaming upload may
// block (a registry that stops reading) before the stream is given up.
const streamStallTimeout = 15 * time.Second

// errStreamStalled ends a streaming upload that stopped taking data.
var errStreamStalled = errors.New("streaming upload stalled")

// layerStream uploads the compressed layer to the target repository as the
// build produces it (one blob upload: POST, one streamed PATCH, PUT with
// the digest once known). It never fails the build: when the upload fails,
// writes are dropped and the blob is pushed from the spool as usual.
type layerStream struct {
	pw      *io.PipeWriter
	pr      *io.PipeReader
	layer   *streamLayer
	counter *sendCounter
	done    chan error
	broken  atomic.Bool
}

// startStream starts the streaming upload of the layer to ref's repository.
func (u *upload) startStream(ctx context.Context, ref name.Reference, req snapshot.Request) *layerStream {
	pr, pw := io.Pipe()
	s := &layerStream{pw: pw, pr: pr, layer: &streamLayer{rc: pr}, counter: &sendCounter{rt: u.transport(req)}, done: make(chan error, 1)}
	go func() {
		err := remote.WriteLayer(ref.Context(), s.layer,
			remote.WithContext(ctx),
			remote.WithAuthFromKeychain(u.opts.Keychain),
			remote.WithTransport(s.counter),
			remote.WithRetryPredicate(func(error) bool { return false }),
		)
		if err == nil {
			err = errors.New("upload ended early")
			if s.layer.computed() {
				err = nil
			}
		}
		pr.CloseWithError(err) // a writer still writing gets it
		s.done <- err
	}()
	return s
}

// Write passes p on to the upload while it works; it never fails.
func (s *layerStream) Write(p []byte) (int, error) {
	if s.broken.Load() {
		return len(p), nil
	}
	stalled := time.AfterFunc(streamStallTimeout, func() { s.pr.CloseWithError(errStreamStalled) })
	_, err := s.pw.Write(p)
	stalled.Stop()
	if err != nil {
		s.broken.Store(true)
	}
	return len(p), nil
}

// finish ends the upload: committed under l's digest when the build
// succeeded (l not nil), abandoned otherwise. It returns nil when the
// registry now has the blob.
func (s *layerStream) finish(l *spoolLayer) error {
	if l == nil {
		s.pw.CloseWithError(errors.New("build failed"))
		<-s.done
		return errors.New("build failed")
	}
	s.layer.set(l)
	s.pw.Close()
	if err := <-s.done; err != nil {
		return err
	}
	if s.broken.Load() {
		return errors.New("writes were dropped") // cannot commit: defensive
	}
	return nil
}

// endStream finishes s for the build's result l (nil: the build failed)
// and accounts for what it sent.
func (u *upload) endStream(s *layerStream, l *spoolLayer) {
	err := s.finish(l)
	switch {
	case l == nil:
	case err != nil:
		u.logf("the upload during the build failed (%v): the spool is pushed instead", err)
	default:
		u.logf("layer blob %s uploaded during the build", l.digest)
	}
	sent := s.counter.sent.Load()
	if serr := u.state.update(func(st *snapshot.State) { st.Upload.PushedBytes += sent }); serr != nil {
		u.logf("%v", serr)
	}
}

// streamLayer is the layer as remote.WriteLayer sees it while streaming:
// its bytes come from the build, its digests exist once the build ends.
type streamLayer struct {
	mu     sync.Mutex
	rc     io.ReadCloser
	opened bool
	l      *spoolLayer
}

var _ v1.Layer = (*streamLayer)(nil)

func (l *streamLayer) set(sl *spoolLayer) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.l = sl
}

func (l *streamLayer) computed() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.l != nil
}

func (l *streamLayer) built() (*spoolLayer, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.l == nil {
		return nil, stream.ErrNotComputed
	}
	return l.l, nil
}

// Digest is the compressed digest, once built.
func (l *streamLayer) Digest() (v1.Hash, error) {
	b, err := l.built()
	if err != nil {
		return v1.Hash{}, err
	}
	return b.digest, nil
}

// DiffID is the uncompressed digest, once built.
func (l *streamLayer) DiffID() (v1.Hash, error) {
	b, err := l.built()
	if err != nil {
		return v1.Hash{}, err
	}
	return b.diffID, nil
}

// Size is the compressed size, once built.
func (l *streamLayer) Size() (int64, error) {
	b, err := l.built()
	if err != nil {
		return 0, err
	}
	return b.size, nil
}

// MediaType is a placeholder: a blob upload does not use it.
func (l *streamLayer) MediaType() (types.MediaType, error) { return types.OCILayer, nil }

// Compressed returns the stream, once: it cannot be replayed.
func (l *streamLayer) Compressed() (io.ReadCloser, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.opened {
		return nil, fmt.Errorf("streamed layer: %w", stream.ErrConsumed)
	}
	l.opened = true
	return l.rc, nil
}

// Uncompressed is not available while streaming.
func (l *streamLayer) Uncompressed() (io.ReadCloser, error) {
	return nil, errors.New("streamed layer: no uncompressed view")
}
