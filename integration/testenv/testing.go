package testenv

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"testing"
	"time"
)

// Prereqs reports why the harness cannot run here (not root, a missing
// binary), or nil.
func Prereqs() error {
	var errs []error
	if os.Geteuid() != 0 {
		errs = append(errs, errors.New("not running as root"))
	}
	for _, b := range []string{"containerd", "ctr", "containerd-shim-runc-v2", "runc", "docker-registry"} {
		if _, err := exec.LookPath(b); err != nil {
			errs = append(errs, fmt.Errorf("%s not in PATH", b))
		}
	}
	if _, err := os.Stat(BusyboxPath); err != nil {
		errs = append(errs, fmt.Errorf("%s missing (busybox-static)", BusyboxPath))
	}
	return errors.Join(errs...)
}

// SkipIfUnavailable skips the test when Prereqs fails.
func SkipIfUnavailable(t testing.TB) {
	t.Helper()
	if err := Prereqs(); err != nil {
		t.Skipf("testenv unavailable: %v", err)
	}
}

// StartContainerdT starts containerd for a test, closing it at cleanup (and
// logging containerd's log tail if the test failed). It fails the test on
// error.
func StartContainerdT(t testing.TB, opts ContainerdOptions) *Containerd {
	t.Helper()
	c, err := StartContainerd(t.Context(), opts)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("containerd log tail (%s):\n%s", c.LogPath, logTail(c.LogPath, 40))
		}
		if err := c.Close(); err != nil {
			t.Errorf("testenv: close containerd: %v", err)
		}
	})
	return c
}

// StartRegistryT starts a registry for a test, closing it at cleanup. It
// fails the test on error.
func StartRegistryT(t testing.TB, opts RegistryOptions) *Registry {
	t.Helper()
	r, err := StartRegistry(t.Context(), opts)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("registry log tail (%s):\n%s", r.LogPath, logTail(r.LogPath, 40))
		}
		if err := r.Close(); err != nil {
			t.Errorf("testenv: close registry: %v", err)
		}
	})
	return r
}

// ImportImageT builds an image (the base image plus extraFiles) in a test
// temp dir and imports it into c. It fails the test on error.
func ImportImageT(t testing.TB, c *Containerd, name string, extraFiles map[string]FileSpec) *BuiltImage {
	t.Helper()
	ctx := t.Context()
	img, err := BuildImage(ctx, t.TempDir(), name, extraFiles)
	if err != nil {
		t.Fatalf("testenv: build image: %v", err)
	}
	if err := c.ImportImage(ctx, img.Archive); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	return img
}

// RunT runs a detached container for a test and removes it at cleanup
// (before the containerd's own Close). It fails the test on error.
func RunT(t testing.TB, c *Containerd, opts RunOptions) {
	t.Helper()
	if err := c.Run(t.Context(), opts); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	t.Cleanup(func() {
		if c.closed.Load() {
			return // Close already removed it
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := c.Remove(ctx, opts.ID); err != nil {
			t.Errorf("testenv: remove %s: %v", opts.ID, err)
		}
	})
}
