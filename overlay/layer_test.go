package overlay

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// synthetic writes data files and returns a dataDir for hand-made manifests.
func synthetic(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, content := range files {
		mustNil(t, os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600))
	}
	return dir
}

func TestWriteLayerTranslation(t *testing.T) {
	data := synthetic(t, map[string]string{"1": "hello"})
	m := &Manifest{Version: ManifestVersion, UserXattr: true, Entries: []Entry{
		{Path: "z-link2", Type: TypeFile, Mode: 0o644, Size: 5, Data: "1", Nlink: 2, Inode: 7},
		{Path: "opq", Type: TypeDir, Mode: 0o755, Xattrs: map[string][]byte{"user.overlay.opaque": []byte("y")}},
		{Path: "trusted-opq", Type: TypeDir, Mode: 0o755, Xattrs: map[string][]byte{"trusted.overlay.opaque": []byte("y"), "trusted.other": []byte("v")}},
		{Path: "xdir", Type: TypeDir, Mode: 0o755, Xattrs: map[string][]byte{"user.overlay.opaque": []byte("x")}},
		{Path: "xdir/gone", Type: TypeFile, Mode: 0o644, Xattrs: map[string][]byte{"user.overlay.whiteout": {}}},
		{Path: "a-link1", Type: TypeFile, Mode: 0o644, Size: 5, Data: "1", Nlink: 2, Inode: 7},
		{Path: "wh1", Type: TypeChar, Nlink: 3, Inode: 9},
		{Path: "wh2", Type: TypeChar, Nlink: 3, Inode: 9},
		{Path: "sock", Type: TypeSocket, Mode: 0o755},
		{Path: "blk", Type: TypeBlock, Mode: 0o600, RdevMajor: 7, RdevMinor: 1},
	}}
	orig := append([]Entry(nil), m.Entries...)
	var buf bytes.Buffer
	st, err := WriteLayer(context.Background(), &buf, m, data)
	mustNil(t, err)
	if !reflect.DeepEqual(orig, m.Entries) {
		t.Error("WriteLayer modified the manifest")
	}
	got := readTar(t, buf.Bytes())
	var names []string
	for _, e := range got {
		names = append(names, e.name())
	}
	want := []string{"a-link1", "blk", "opq", "opq/.wh..wh..opq", "trusted-opq", ".wh.wh1", ".wh.wh2", "xdir", "xdir/.wh.gone", "z-link2"}
	if !reflect.DeepEqual(names, want) {
		t.Fatalf("names:\n got %q\nwant %q", names, want)
	}
	if st.Entries != len(want) || st.Bytes != 5 {
		t.Errorf("stats = %+v", st)
	}
	idx := tarIndex(got)
	if h := idx["z-link2"].hdr; h.Typeflag != tar.TypeLink || h.Linkname != "a-link1" {
		t.Errorf("z-link2 = %+v", h)
	}
	if e := idx["a-link1"]; e.hdr.Typeflag != tar.TypeReg || string(e.data) != "hello" {
		t.Errorf("a-link1 = %+v", e.hdr)
	}
	if keys := xattrKeys(idx["trusted-opq"].hdr); !reflect.DeepEqual(keys, []string{"SCHILY.xattr.trusted.other"}) {
		t.Errorf("trusted-opq xattrs = %q", keys)
	}
	if h := idx["blk"].hdr; h.Typeflag != tar.TypeBlock || h.Devmajor != 7 || h.Devminor != 1 {
		t.Errorf("blk = %+v", h)
	}
}

func TestWriteLayerErrors(t *testing.T) {
	data := synthetic(t, map[string]string{"1": "hello"})
	for name, e := range map[string]Entry{
		"size mismatch":  {Path: "f", Type: TypeFile, Size: 4, Data: "1"},
		"no data":        {Path: "f", Type: TypeFile, Size: 5},
		"missing data":   {Path: "f", Type: TypeFile, Size: 5, Data: "2"},
		"data traversal": {Path: "f", Type: TypeFile, Size: 5, Data: "../1"},
		"dotdot path":    {Path: "../etc/passwd", Type: TypeFile},
		"absolute path":  {Path: "/etc/passwd", Type: TypeFile},
		"unclean path":   {Path: "a//b", Type: TypeFile},
		"reserved name":  {Path: "d/.wh.x", Type: TypeFile},
		"unknown type":   {Path: "f", Type: "door"},
		"bad xattr name": {Path: "f", Type: TypeDir, Xattrs: map[string][]byte{"user.a=b": nil}},
	} {
		m := &Manifest{Version: ManifestVersion, Entries: []Entry{e}}
		if _, err := WriteLayer(context.Background(), io.Discard, m, data); err == nil {
			t.Errorf("%s: WriteLayer accepted %+v", name, e)
		}
	}
	dup := &Manifest{Entries: []Entry{{Path: "a", Type: TypeDir}, {Path: "a", Type: TypeDir}}}
	if _, err := WriteLayer(context.Background(), io.Discard, dup, data); err == nil || !strings.Contains(err.Error(), "duplicate") {
		t.Errorf("duplicate: err = %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	ok := &Manifest{Entries: []Entry{{Path: "a", Type: TypeDir}}}
	if _, err := WriteLayer(ctx, io.Discard, ok, data); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled: err = %v", err)
	}
}

func TestLoadManifestErrors(t *testing.T) {
	dir := t.TempDir()
	if _, err := LoadManifest(dir); err == nil {
		t.Error("missing manifest accepted")
	}
	mustNil(t, os.WriteFile(filepath.Join(dir, "manifest.json"), []byte(`{"version":99,"entries":[]}`), 0o600))
	if _, err := LoadManifest(dir); err == nil || !strings.Contains(err.Error(), "version") {
		t.Errorf("wrong version: err = %v", err)
	}
}
