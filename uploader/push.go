package uploader

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/seamless-snapshot/seamless/snapshot"
)

// Retry says how patiently transient push errors (connection refused or
// reset, timeouts, 408, 429, 5xx) are retried. Every push attempt starts
// over with remote.Write, which skips the blobs the registry already has.
type Retry struct {
	// For is how long transient errors are retried, counted from the first
	// failure after the last attempt that sent data (default 10 minutes).
	For time.Duration
	// Initial is the first wait (default 1s); each wait doubles up to Max
	// (default 30s). Every wait is jittered to 50–150 %.
	Initial, Max time.Duration
}

// DefaultRetryFor is Retry.For when neither the request nor the
// environment (EnvRetryTimeout) sets it.
const DefaultRetryFor = 10 * time.Minute

func (r Retry) withDefaults() Retry {
	if r.For <= 0 {
		r.For = DefaultRetryFor
	}
	if r.Initial <= 0 {
		r.Initial = time.Second
	}
	if r.Max <= 0 {
		r.Max = 30 * time.Second
	}
	return r
}

// push writes img to ref, retrying transient failures, and returns the
// pushed manifest's digest. Blobs the registry already has are not sent.
func (u *upload) push(ctx context.Context, ref name.Reference, img v1.Image, req snapshot.Request) (v1.Hash, error) {
	start := time.Now()
	digest, err := img.Digest()
	if err != nil {
		return v1.Hash{}, fmt.Errorf("compute manifest: %w", err)
	}
	if err := u.state.phase(snapshot.PhasePushing, 0); err != nil {
		return v1.Hash{}, err
	}
	counter := &sendCounter{rt: &headProbe{rt: u.transport(req), logf: u.logf}}
	if u.opts.stall.point == stallPush {
		counter.onSend = func(n int64) { u.stall(stallPush, n) }
	}
	defer func() {
		sent := counter.sent.Load()
		if err := u.state.update(func(st *snapshot.State) {
			st.Upload.PushedBytes += sent
			st.Upload.PushMS = time.Since(start).Milliseconds()
		}); err != nil {
			u.logf("%v", err)
		}
	}()
	r := u.retry(req)
	wait := r.Initial
	var streak time.Time // first failure since data last moved
	for attempt := 1; ; attempt++ {
		before := counter.sent.Load()
		err := u.pushOnce(ctx, ref, img, counter)
		if err == nil {
			u.stall(stallPushed, 0)
			return digest, nil
		}
		err = fmt.Errorf("push %s: %w", ref, withHint(err, req))
		if ctx.Err() != nil || !transient(err) {
			return v1.Hash{}, err
		}
		now := time.Now()
		if streak.IsZero() || counter.sent.Load() > before {
			streak, wait = now, r.Initial
		}
		d := jitter(wait)
		if now.Add(d).Sub(streak) > r.For {
			return v1.Hash{}, fmt.Errorf("%w (gave up after retrying for %v)", err, now.Sub(streak).Round(time.Second))
		}
		u.logf("attempt %d: %v; retrying in %v", attempt, err, d.Round(time.Millisecond))
		if err := u.state.update(func(st *snapshot.State) { st.Upload.Retries++ }); err != nil {
			u.logf("%v", err)
		}
		if err := sleep(ctx, d); err != nil {
			return v1.Hash{}, err
		}
		wait = min(2*wait, r.Max)
	}
}

// retry returns the retry policy: the request's timeout, else the
// environment's, else the default.
func (u *upload) retry(req snapshot.Request) Retry {
	r := u.opts.Retry
	if req.RetryTimeout > 0 {
		r.For = time.Duration(req.RetryTimeout)
	}
	return r.withDefaults()
}

// jitter spreads d over 50–150 % of its value.
func jitter(d time.Duration) time.Duration {
	return d/2 + rand.N(d+1)
}

// pushOnce is one remote.Write with progress reported to the state. Its own
// retries are off: push decides.
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
		remote.WithRetryPredicate(func(error) bool { return false }),
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

// headProbe treats a server error in answer to a blob existence check
// (HEAD /v2/<repo>/blobs/<digest>) as "not there": the blob is uploaded and
// the registry's answer to the upload decides. A registry killed while it
// linked a blob into a repository (distribution's filesystem driver writes
// link files in place) answers 500 to that HEAD for ever, while an upload
// of the same blob rewrites the link; containerd's pusher proceeds the same
// way on an unexpected HEAD status. Any other answer is passed on as is.
type headProbe struct {
	rt   http.RoundTripper
	logf func(format string, args ...any)
}

// RoundTrip sends req and rewrites a 5xx answer to a blob HEAD as a 404.
func (h *headProbe) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := h.rt.RoundTrip(req)
	if err != nil || req.Method != http.MethodHead || resp.StatusCode < 500 || !isBlobPath(req.URL.Path) {
		return resp, err
	}
	h.logf("registry answered %s to HEAD %s: uploading the blob", resp.Status, req.URL.Path)
	resp.Body.Close()
	return &http.Response{
		Status:     "404 Not Found",
		StatusCode: http.StatusNotFound,
		Proto:      resp.Proto,
		ProtoMajor: resp.ProtoMajor,
		ProtoMinor: resp.ProtoMinor,
		Header:     http.Header{},
		Body:       http.NoBody,
		Request:    req,
	}, nil
}

// isBlobPath reports whether path names a blob: /v2/<repo>/blobs/<digest>.
func isBlobPath(path string) bool {
	rest, ok := strings.CutPrefix(path, "/v2/")
	if !ok {
		return false
	}
	i := strings.LastIndex(rest, "/blobs/")
	if i <= 0 {
		return false
	}
	digest := rest[i+len("/blobs/"):]
	return strings.Contains(digest, ":") && !strings.Contains(digest, "/")
}

// sendCounter counts the request body bytes sent to the registry's API.
type sendCounter struct {
	rt   http.RoundTripper
	sent atomic.Int64
	// onSend, when set, sees the running total after each read of a body.
	onSend func(total int64)
}

// RoundTrip sends req, counting its body.
func (c *sendCounter) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.Body != nil && req.Body != http.NoBody && strings.HasPrefix(req.URL.Path, "/v2/") {
		req = req.Clone(req.Context())
		req.Body = &countingBody{ReadCloser: req.Body, c: c}
	}
	return c.rt.RoundTrip(req)
}

// countingBody adds what is read from it to its counter.
type countingBody struct {
	io.ReadCloser
	c *sendCounter
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	total := b.c.sent.Add(int64(n))
	if b.c.onSend != nil {
		b.c.onSend(total)
	}
	return n, err
}

// withHint adds what to do to a certificate error.
func withHint(err error, req snapshot.Request) error {
	if certError(err) && !req.Insecure {
		return fmt.Errorf("%w (the registry's certificate is not trusted: install its CA, or use --target-insecure)", err)
	}
	return err
}

// certError reports a TLS certificate or protocol mismatch: retrying
// cannot fix it.
func certError(err error) bool {
	var verr *tls.CertificateVerificationError
	var uerr x509.UnknownAuthorityError
	var herr x509.HostnameError
	var cerr x509.CertificateInvalidError
	var rerr tls.RecordHeaderError
	return errors.As(err, &verr) || errors.As(err, &uerr) || errors.As(err, &herr) ||
		errors.As(err, &cerr) || errors.As(err, &rerr)
}

// transient reports whether err may go away by itself: a registry that
// cannot be reached for now, a connection cut, a timeout, or a registry
// answer 408, 429 or 5xx.
func transient(err error) bool {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) || certError(err) {
		return false
	}
	var terr *transport.Error
	if errors.As(err, &terr) {
		switch terr.StatusCode {
		case http.StatusRequestTimeout, http.StatusTooManyRequests:
			return true
		}
		return terr.StatusCode >= 500 && terr.StatusCode <= 599
	}
	for _, e := range []error{
		syscall.ECONNREFUSED, syscall.ECONNRESET, syscall.ECONNABORTED, syscall.EPIPE,
		syscall.ETIMEDOUT, syscall.EHOSTUNREACH, syscall.ENETUNREACH, syscall.ENETDOWN,
		io.ErrUnexpectedEOF, io.EOF, net.ErrClosed,
	} {
		if errors.Is(err, e) {
			return true
		}
	}
	// Any other failure to dial, read or write, but a TLS alert from the
	// registry (e.g. it wants a client certificate).
	var oerr *net.OpError
	if errors.As(err, &oerr) && oerr.Op != "remote error" {
		return true
	}
	var nerr net.Error
	return errors.As(err, &nerr) && nerr.Timeout()
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
