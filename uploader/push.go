package uploader

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/seamless-snapshot/seamless/snapshot"
)

// push writes img to ref, retrying transient failures, and returns the
// pushed manifest's digest. Blobs the registry already has are not sent.
func (u *upload) push(ctx context.Context, ref name.Reference, img v1.Image, req snapshot.Request) (v1.Hash, error) {
	digest, err := img.Digest()
	if err != nil {
		return v1.Hash{}, fmt.Errorf("compute manifest: %w", err)
	}
	if err := u.state.phase(snapshot.PhasePushing, 0); err != nil {
		return v1.Hash{}, err
	}
	rt := u.transport(req)
	r := u.opts.Retry
	wait := r.Backoff
	for attempt := 1; ; attempt++ {
		err = u.pushOnce(ctx, ref, img, rt)
		if err == nil {
			return digest, nil
		}
		err = fmt.Errorf("push %s: %w", ref, err)
		if attempt >= r.Attempts || ctx.Err() != nil || !transient(err) {
			return v1.Hash{}, err
		}
		u.logf("attempt %d/%d: %v; retrying in %v", attempt, r.Attempts, err, wait)
		if err := sleep(ctx, wait); err != nil {
			return v1.Hash{}, err
		}
		wait = min(2*wait, r.MaxBackoff)
	}
}

// pushOnce is one remote.Write with progress reported to the state.
func (u *upload) pushOnce(ctx context.Context, ref name.Reference, img v1.Image, rt http.RoundTripper) error {
	updates := make(chan v1.Update, 16)
	drained := make(chan struct{})
	go func() {
		defer close(drained)
		for up := range updates {
			if up.Error == nil {
				u.state.progress(up.Complete, up.Total)
			}
		}
	}()
	err := remote.Write(ref, img,
		remote.WithContext(ctx),
		remote.WithAuthFromKeychain(u.opts.Keychain),
		remote.WithTransport(rt),
		remote.WithProgress(updates),
	)
	// remote closes updates when it returns; don't hang if it ever does not.
	select {
	case <-drained:
	case <-time.After(5 * time.Second):
	}
	return err
}

// transport returns the configured transport, or the default one with TLS
// verification disabled when the request says insecure.
func (u *upload) transport(req snapshot.Request) http.RoundTripper {
	if u.opts.Transport != nil {
		return u.opts.Transport
	}
	t := remote.DefaultTransport.(*http.Transport).Clone()
	if req.Insecure {
		if t.TLSClientConfig == nil {
			t.TLSClientConfig = &tls.Config{}
		}
		t.TLSClientConfig.InsecureSkipVerify = true //nolint:gosec // asked for by --target-insecure
	}
	return t
}

// transient reports whether err may go away by itself: network failures and
// registry answers 408, 429 and 5xx.
func transient(err error) bool {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return false
	}
	var terr *transport.Error
	if errors.As(err, &terr) {
		switch terr.StatusCode {
		case http.StatusRequestTimeout, http.StatusTooManyRequests, http.StatusInternalServerError,
			http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
			return true
		}
		return false
	}
	var nerr net.Error
	return errors.As(err, &nerr) ||
		errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, syscall.EPIPE) || errors.Is(err, io.ErrUnexpectedEOF)
}

// sleep waits d or until ctx is done.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
