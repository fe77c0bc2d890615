package uploader

import (
	"archive/tar"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/seamless-snapshot/seamless/config"
	"github.com/seamless-snapshot/seamless/integration/testenv"
	"github.com/seamless-snapshot/seamless/overlay"
	"github.com/seamless-snapshot/seamless/snapshot"
)

// TestMainEndToEnd runs the production path in a spawned uploader: base image
// from a real containerd, layer from package overlay, push to a real
// registry; then containerd pulls (and unpacks) the result.
func TestMainEndToEnd(t *testing.T) {
	if err := testenv.Prereqs(); err != nil {
		t.Skipf("needs the integration environment: %v", err)
	}
	ctd := testenv.StartContainerdT(t, testenv.ContainerdOptions{})
	base := testenv.ImportImageT(t, ctd, testenv.DefaultImageName, nil)
	reg := testenv.StartRegistryT(t, testenv.RegistryOptions{})

	stateDir := t.TempDir()
	store := snapshot.Store{Root: config.Dirs{State: stateDir}.SnapshotsDir()}
	target := reg.Host + "/seamless/e2e:1"
	st := newSnapshot(t, store, "e2e", target)
	writeCapture(t, store.Dir("e2e"))
	st.Base = snapshot.Base{Source: "containerd", Ref: base.Name, ContainerdAddress: ctd.Address, ContainerdNamespace: ctd.Namespace}
	if err := store.Save(st); err != nil {
		t.Fatal(err)
	}

	exe, _ := os.Executable()
	p, err := Start(exe, stateDir, "e2e")
	if err != nil {
		t.Fatal(err)
	}
	ps, err := p.Wait()
	logb, _ := os.ReadFile(filepath.Join(store.Dir("e2e"), snapshot.LogFile))
	if err != nil || !ps.Success() {
		t.Fatalf("uploader: %v %v; upload.log:\n%s", ps, err, logb)
	}
	st, _ = store.Load("e2e")
	if st.Phase != snapshot.PhaseDone {
		t.Fatalf("phase %s %q; upload.log:\n%s", st.Phase, st.Error, logb)
	}
	t.Logf("upload.log:\n%s", logb)

	ref, _ := name.ParseReference(target, name.Insecure)
	pushed, err := remote.Image(ref)
	if err != nil {
		t.Fatal(err)
	}
	m, _ := pushed.Manifest()
	var got []string
	for _, l := range m.Layers {
		got = append(got, l.Digest.String())
	}
	if len(got) != len(base.LayerDigests)+1 || !slices.Equal(got[:len(base.LayerDigests)], base.LayerDigests) {
		t.Fatalf("pushed layers %v, want base %v + 1", got, base.LayerDigests)
	}
	layers, _ := pushed.Layers()
	names := tarNames(t, layers[len(layers)-1])
	want := []string{"bin/", "bin/.wh.ls", "etc/", "etc/seamless", "hello"}
	if !slices.Equal(names, want) {
		t.Errorf("new layer has %v, want %v", names, want)
	}
	if exists(filepath.Join(store.Dir("e2e"), snapshot.DataDir)) {
		t.Error("data dir left after success")
	}
	if err := ctd.Pull(t.Context(), st.PushedRef, true); err != nil {
		t.Fatalf("containerd cannot pull the snapshot image: %v", err)
	}
}

// writeCapture replaces the snapshot's capture with a dir, a new file, a
// whiteout of a base file and the helper's "hello".
func writeCapture(t *testing.T, dir string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, snapshot.DataDir, "2"), []byte("captured\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	mt := capturedAt.UnixNano()
	m := overlay.Manifest{Version: overlay.ManifestVersion, Entries: []overlay.Entry{
		{Path: "bin", Type: overlay.TypeDir, Mode: 0o755, MtimeNS: mt},
		{Path: "bin/ls", Type: overlay.TypeChar, MtimeNS: mt},
		{Path: "etc", Type: overlay.TypeDir, Mode: 0o755, MtimeNS: mt},
		{Path: "etc/seamless", Type: overlay.TypeFile, Mode: 0o644, Size: 9, Data: "2", MtimeNS: mt},
		{Path: "hello", Type: overlay.TypeFile, Mode: 0o644, Size: 6, Data: "1", MtimeNS: mt},
	}}
	b, _ := json.Marshal(m)
	if err := os.WriteFile(filepath.Join(dir, snapshot.ManifestFile), b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// tarNames lists the entries of a layer.
func tarNames(t *testing.T, l interface{ Uncompressed() (io.ReadCloser, error) }) []string {
	t.Helper()
	rc, err := l.Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	tr := tar.NewReader(rc)
	var names []string
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return names
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
	}
}
