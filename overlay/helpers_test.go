package overlay

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// testOverlay is an overlay mounted for one test.
type testOverlay struct {
	lower, upper, work, merged string
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (overlay mounts, trusted xattrs, mknod)")
	}
}

// newOverlay creates lower/upper/work/merged under base, lets fill populate
// the lower dir and mounts the overlay (unmounted in t.Cleanup).
func newOverlay(t *testing.T, base string, fill func(lower string)) *testOverlay {
	t.Helper()
	o := &testOverlay{
		lower:  filepath.Join(base, "lower"),
		upper:  filepath.Join(base, "upper"),
		work:   filepath.Join(base, "work"),
		merged: filepath.Join(base, "merged"),
	}
	for _, d := range []string{o.lower, o.upper, o.work, o.merged} {
		mustNil(t, os.MkdirAll(d, 0o755))
	}
	if fill != nil {
		fill(o.lower)
	}
	mountOverlay(t, o.merged, "lowerdir="+o.lower+",upperdir="+o.upper+",workdir="+o.work)
	return o
}

// mountOverlay mounts an overlay with the given data at dir and registers its unmount.
func mountOverlay(t *testing.T, dir, data string) {
	t.Helper()
	if err := unix.Mount("overlay", dir, "overlay", 0, data); err != nil {
		t.Fatalf("mount overlay at %s (%s): %v", dir, data, err)
	}
	t.Cleanup(func() { unmount(t, dir) })
}

// unmount unmounts dir, retrying while busy, detaching as a last resort.
func unmount(t *testing.T, dir string) {
	t.Helper()
	for i := 0; i < 50; i++ {
		err := unix.Unmount(dir, 0)
		if err == nil || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
			return
		}
		if !errors.Is(err, unix.EBUSY) {
			t.Errorf("unmount %s: %v", dir, err)
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
		t.Errorf("lazy unmount %s: %v", dir, err)
	}
}

func mustNil(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func writeFile(t *testing.T, p, content string) {
	t.Helper()
	mustNil(t, os.MkdirAll(filepath.Dir(p), 0o755))
	mustNil(t, os.WriteFile(p, []byte(content), 0o644))
}

// pseudoRandom returns n deterministic bytes.
func pseudoRandom(n int) []byte {
	b := make([]byte, n)
	x := uint32(2463534242)
	for i := range b {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		b[i] = byte(x)
	}
	return b
}

// captureTo runs Capture into a fresh snapshot dir under base.
func captureTo(t *testing.T, upper, snapDir string, opts CaptureOptions) (*Manifest, CaptureStats) {
	t.Helper()
	mustNil(t, os.MkdirAll(snapDir, 0o700))
	m, st, err := Capture(context.Background(), upper, snapDir, opts)
	if err != nil {
		t.Fatalf("Capture: %v", err)
	}
	return m, st
}

// layerBytes runs WriteLayer and returns the tar.
func layerBytes(t *testing.T, m *Manifest, snapDir string) []byte {
	t.Helper()
	var buf bytes.Buffer
	if _, err := WriteLayer(context.Background(), &buf, m, filepath.Join(snapDir, "data")); err != nil {
		t.Fatalf("WriteLayer: %v", err)
	}
	return buf.Bytes()
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// tarEntry is one entry read back from a layer.
type tarEntry struct {
	hdr  *tar.Header
	data []byte
}

// name is the entry name without a directory's trailing slash.
func (e tarEntry) name() string { return strings.TrimSuffix(e.hdr.Name, "/") }

func readTar(t *testing.T, b []byte) []tarEntry {
	t.Helper()
	var out []tarEntry
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return out
		}
		mustNil(t, err)
		data, err := io.ReadAll(tr)
		mustNil(t, err)
		out = append(out, tarEntry{hdr: hdr, data: data})
	}
}

func tarIndex(entries []tarEntry) map[string]tarEntry {
	idx := map[string]tarEntry{}
	for _, e := range entries {
		idx[e.name()] = e
	}
	return idx
}

func manifestIndex(m *Manifest) map[string]Entry {
	idx := map[string]Entry{}
	for _, e := range m.Entries {
		idx[e.Path] = e
	}
	return idx
}
