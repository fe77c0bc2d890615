package uploader

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/seamless-snapshot/seamless/config"
	"github.com/seamless-snapshot/seamless/overlay"
	"github.com/seamless-snapshot/seamless/snapshot"
)

// Main is the uploader role's entry point (a binary's main calls it when
// EnvRole is RoleUploader): args are [exe, snapshot-id], directories come
// from the environment. SIGTERM or SIGINT cancel the upload (state "failed",
// error "interrupted"). It returns the exit code: 0 done, 1 failed, 2 bad usage.
func Main(args []string) int {
	if len(args) != 2 || !snapshot.ValidID(args[1]) {
		fmt.Fprintf(os.Stderr, "usage: %s=%s %s SNAPSHOT-ID\n", EnvRole, RoleUploader, filepath.Base(firstOr(args, "seamless")))
		return 2
	}
	if err := waitForSpawner(); err != nil {
		fmt.Fprintf(os.Stderr, "uploader: %v\n", err)
		return 2
	}
	signal.Ignore(syscall.SIGHUP, syscall.SIGPIPE)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	id := args[1]
	store := snapshot.Store{Root: config.FromEnv().SnapshotsDir()}
	opts := Options{Layer: OverlayLayer(store.Dir(id)), Log: os.Stderr}
	if err := Upload(ctx, store, id, opts); err != nil {
		fmt.Fprintf(os.Stderr, "uploader: snapshot %s: %v\n", id, err)
		return 1
	}
	return 0
}

// OverlayLayer is the production LayerWriter: the OCI layer tar of the
// capture in snapDir (manifest.json + data/), written by package overlay.
func OverlayLayer(snapDir string) LayerWriter {
	return func(ctx context.Context, w io.Writer) error {
		m, err := overlay.LoadManifest(snapDir)
		if err != nil {
			return err
		}
		_, err = overlay.WriteLayer(ctx, w, m, filepath.Join(snapDir, snapshot.DataDir))
		return err
	}
}

func firstOr(args []string, def string) string {
	if len(args) > 0 && args[0] != "" {
		return args[0]
	}
	return def
}
