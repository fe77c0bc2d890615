package uploader

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/seamless-snapshot/seamless/config"
	"github.com/seamless-snapshot/seamless/overlay"
	"github.com/seamless-snapshot/seamless/snapshot"
)

// EnvRetryTimeout sets how long an uploader retries transient registry
// errors when the request does not say (a Go duration, e.g. "10m").
const EnvRetryTimeout = "SEAMLESS_RETRY_TIMEOUT"

// Main is the uploader role's entry point (a binary's main calls it when
// EnvRole is RoleUploader): args are [exe, snapshot-id], directories come
// from the environment. It holds the snapshot's upload lock while it runs.
// SIGTERM or SIGINT cancel the upload (state "failed", error
// "interrupted"). It returns the exit code: 0 done, 1 failed, 2 bad usage.
func Main(args []string) int {
	if len(args) != 2 || !snapshot.ValidID(args[1]) {
		fmt.Fprintf(os.Stderr, "usage: %s=%s %s SNAPSHOT-ID\n", EnvRole, RoleUploader, filepath.Base(firstOr(args, "seamless")))
		return 2
	}
	if err := waitForSpawner(); err != nil {
		fmt.Fprintf(os.Stderr, "uploader: %v\n", err)
		return 2
	}
	id := args[1]
	store := snapshot.Store{Root: config.FromEnv().SnapshotsDir()}
	unlock, err := inheritLock(store.Dir(id))
	if err != nil {
		fmt.Fprintf(os.Stderr, "uploader: snapshot %s: %v\n", id, err)
		return 1
	}
	defer unlock()
	opts, err := optionsFromEnv()
	if err != nil {
		fmt.Fprintf(os.Stderr, "uploader: %v\n", err)
		return 2
	}
	signal.Ignore(syscall.SIGHUP, syscall.SIGPIPE)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	capture := &overlayCapture{dir: store.Dir(id)}
	opts.Layer, opts.LayerSize, opts.Log = capture.write, capture.tarSize(), os.Stderr
	if err := Upload(ctx, store, id, opts); err != nil {
		fmt.Fprintf(os.Stderr, "uploader: snapshot %s: %v\n", id, err)
		return 1
	}
	return 0
}

// optionsFromEnv reads the retry timeout and the test stall point.
func optionsFromEnv() (Options, error) {
	var o Options
	if v := os.Getenv(EnvRetryTimeout); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 {
			return o, fmt.Errorf("%s=%q: want a duration such as 10m", EnvRetryTimeout, v)
		}
		o.Retry.For = d
	}
	s, err := parseStall(os.Getenv(envTestStall))
	if err != nil {
		return o, err
	}
	o.stall = s
	return o, nil
}

// OverlayLayer is the production LayerWriter: the OCI layer tar of the
// capture in snapDir (manifest.json + data/), written by package overlay.
func OverlayLayer(snapDir string) LayerWriter {
	return (&overlayCapture{dir: snapDir}).write
}

// overlayCapture is the capture in a snapshot dir, its manifest read once.
type overlayCapture struct {
	dir  string
	once sync.Once
	m    *overlay.Manifest
	err  error
}

func (c *overlayCapture) manifest() (*overlay.Manifest, error) {
	c.once.Do(func() { c.m, c.err = overlay.LoadManifest(c.dir) })
	return c.m, c.err
}

// write writes the layer tar.
func (c *overlayCapture) write(ctx context.Context, w io.Writer) error {
	m, err := c.manifest()
	if err != nil {
		return err
	}
	_, err = overlay.WriteLayer(ctx, w, m, filepath.Join(c.dir, snapshot.DataDir))
	return err
}

// tarSize estimates the size of the layer tar (0 when the manifest cannot
// be read: Upload then reports the error). Each entry costs a PAX header
// (nanosecond mtimes), a header and its data rounded up to 512 bytes.
func (c *overlayCapture) tarSize() int64 {
	m, err := c.manifest()
	if err != nil {
		return 0
	}
	const block = 512
	n := int64(2 * block) // end-of-archive
	for _, e := range m.Entries {
		n += 3*block + (e.Size+block-1)/block*block
	}
	return n
}

func firstOr(args []string, def string) string {
	if len(args) > 0 && args[0] != "" {
		return args[0]
	}
	return def
}
