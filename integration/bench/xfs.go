package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seamless-snapshot/seamless/integration/testenv"
)

// xfsMount is an XFS filesystem with reflink on a sparse loop image.
type xfsMount struct {
	img string // image file
	dir string // mount point
}

// mountXFS creates img (sparse, size bytes), formats it with reflink and
// mounts it on dir through a loop device that frees itself on unmount.
func mountXFS(ctx context.Context, img, dir string, size int64) (*xfsMount, error) {
	if _, err := exec.LookPath("mkfs.xfs"); err != nil {
		return nil, fmt.Errorf("--xfs needs mkfs.xfs (apt-get install xfsprogs, or make deps): %w", err)
	}
	m := &xfsMount{img: img, dir: dir}
	f, err := os.Create(img)
	if err != nil {
		return nil, fmt.Errorf("xfs image: %w", err)
	}
	err = f.Truncate(size)
	f.Close()
	if err != nil {
		return nil, errors.Join(fmt.Errorf("xfs image: %w", err), os.Remove(img))
	}
	steps := [][]string{
		{"mkfs.xfs", "-q", "-f", "-m", "reflink=1", img},
		{"mount", "-o", "loop", img, dir},
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, errors.Join(fmt.Errorf("xfs mount point: %w", err), os.Remove(img))
	}
	for _, argv := range steps {
		if out, err := exec.CommandContext(ctx, argv[0], argv[1:]...).CombinedOutput(); err != nil {
			return nil, errors.Join(fmt.Errorf("%s: %w: %s", strings.Join(argv, " "), err, bytes.TrimSpace(out)), m.unmount())
		}
	}
	logf("[xfs] %s mounted on %s (loop, reflink=1)", img, dir)
	return m, nil
}

// unmount unmounts the filesystem (if mounted), detaches any loop device
// still backed by the image and removes the image. Safe to call on a mount
// that was never made.
func (m *xfsMount) unmount() error {
	var errs []error
	if mounted, err := testenv.MountsUnder(m.dir); err == nil && len(mounted) > 0 {
		errs = append(errs, unmountRetry(m.dir))
	}
	if _, err := os.Stat(m.img); err == nil {
		errs = append(errs, detachLoops(m.img))
		if err := os.Remove(m.img); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// unmountRetry unmounts dir, retrying while it is busy, lazily at last.
func unmountRetry(dir string) error {
	var err error
	for range 20 {
		if err = unix.Unmount(dir, 0); err == nil || errors.Is(err, unix.EINVAL) {
			return nil
		}
		time.Sleep(250 * time.Millisecond)
	}
	if lerr := unix.Unmount(dir, unix.MNT_DETACH); lerr != nil {
		return fmt.Errorf("unmount %s: %w (lazy: %v)", dir, err, lerr)
	}
	return nil
}

// detachLoops detaches the loop devices backed by img (losetup -j).
func detachLoops(img string) error {
	out, err := exec.Command("losetup", "-j", img).Output()
	if err != nil {
		return nil // no losetup, or nothing attached
	}
	var errs []error
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		dev, _, ok := strings.Cut(line, ":")
		if !ok || !strings.HasPrefix(dev, "/dev/loop") {
			continue
		}
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("losetup -d %s: %w: %s", dev, err, bytes.TrimSpace(out)))
		}
	}
	return errors.Join(errs...)
}
