package baseimage

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	containersapi "github.com/containerd/containerd/api/services/containers/v1"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/google/go-containerregistry/pkg/v1/validate"
	"github.com/seamless-snapshot/seamless/integration/testenv"
	"google.golang.org/protobuf/types/known/anypb"
)

const testNS = "seamless-test"

func TestContainerdUnreachable(t *testing.T) {
	ctx := context.Background()
	sock := filepath.Join(t.TempDir(), "none.sock")
	_, err := ContainerdImageName(ctx, sock, "default", "c1")
	t.Log(err)
	if err == nil || !strings.Contains(err.Error(), "unreachable") || !strings.Contains(err.Error(), sock) {
		t.Fatalf("ContainerdImageName on a missing socket: %v; want an 'unreachable' error naming %s", err, sock)
	}
	_, _, err = FromContainerd(ctx, sock, "default", "x:1")
	if err == nil || !strings.Contains(err.Error(), "unreachable") {
		t.Fatalf("FromContainerd on a missing socket: %v; want an 'unreachable' error", err)
	}
	if _, err := ContainerdImageName(ctx, "relative.sock", "default", "c1"); err == nil {
		t.Fatal("relative address accepted")
	}
	if _, err := ContainerdImageName(ctx, sock, "", "c1"); err == nil {
		t.Fatal("empty namespace accepted")
	}
}

// TestFromContainerd imports images into a real, isolated containerd and
// reads them back through the content store.
func TestFromContainerd(t *testing.T) {
	cd := startContainerd(t)
	sock := cd.Address
	ctx := context.Background()
	dir := t.TempDir()

	// 1. A Docker schema2 image, imported as a single manifest.
	dockerImg := testImage(t, types.DockerManifestSchema2, types.DockerConfigJSON, types.DockerLayer, runtime.GOARCH, "docker")
	importImage(t, cd, writeArchive(t, dir, "docker.tar", "localhost/test/docker:1", dockerImg))

	// 2. An OCI index whose host-platform manifest is not the first one.
	ociHost := testImage(t, types.OCIManifestSchema1, types.OCIConfigJSON, types.OCILayer, runtime.GOARCH, "oci-host")
	ociOther := testImage(t, types.OCIManifestSchema1, types.OCIConfigJSON, types.OCILayer, "s390x", "oci-other")
	idx := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: ociOther, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "s390x"}}},
		mutate.IndexAddendum{Add: ociHost, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: runtime.GOARCH}}},
	)
	importImage(t, cd, writeArchive(t, dir, "index.tar", "localhost/test/multi:1", idx))

	// 3. An index without a manifest for this platform (not unpacked).
	foreign := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: ociOther, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "s390x"}}})
	importImage(t, cd, writeArchive(t, dir, "foreign.tar", "localhost/test/foreign:1", foreign), "--all-platforms", "--no-unpack")

	// 4. An image one of whose layer blobs was deleted from the content store.
	gcImg := testImage(t, types.OCIManifestSchema1, types.OCIConfigJSON, types.OCILayer, runtime.GOARCH, "gc")
	importImage(t, cd, writeArchive(t, dir, "gc.tar", "localhost/test/gc:1", gcImg), "--no-unpack")
	gcLayers, _ := gcImg.Layers()
	gcLost, _ := gcLayers[1].Digest()
	ctr(t, cd, "content", "rm", gcLost.String())

	ctr(t, cd, "containers", "create", "--snapshotter", "native", "localhost/test/docker:1", "c-docker")
	ctr(t, cd, "containers", "create", "--snapshotter", "native", "localhost/test/multi:1", "c-multi")
	createImagelessContainer(t, sock, "c-noimage")

	t.Run("ContainerdImageName", func(t *testing.T) {
		for id, want := range map[string]string{"c-docker": "localhost/test/docker:1", "c-multi": "localhost/test/multi:1"} {
			got, err := ContainerdImageName(ctx, sock, testNS, id)
			if err != nil || got != want {
				t.Errorf("ContainerdImageName(%s) = %q, %v; want %q", id, got, err, want)
			}
		}
		if _, err := ContainerdImageName(ctx, sock, testNS, "nope"); err == nil || !strings.Contains(err.Error(), "no such container") {
			t.Errorf("unknown container: %v", err)
		}
		if _, err := ContainerdImageName(ctx, sock, "other-ns", "c-docker"); err == nil || !strings.Contains(err.Error(), "no such container") {
			t.Errorf("container in another namespace: %v", err)
		}
		_, err := ContainerdImageName(ctx, sock, testNS, "nope")
		t.Log(err)
		if _, err := ContainerdImageName(ctx, sock, testNS, "c-noimage"); err == nil || !strings.Contains(err.Error(), "has no image") {
			t.Errorf("container without image: %v", err)
		}
	})

	t.Run("docker manifest", func(t *testing.T) {
		checkSameImage(t, sock, "localhost/test/docker:1", dockerImg)
	})
	t.Run("index picks host platform", func(t *testing.T) {
		checkSameImage(t, sock, "localhost/test/multi:1", ociHost)
	})
	t.Run("index without host platform", func(t *testing.T) {
		_, _, err := FromContainerd(ctx, sock, testNS, "localhost/test/foreign:1")
		t.Log(err)
		if err == nil || !strings.Contains(err.Error(), "no manifest for linux/"+runtime.GOARCH) || !strings.Contains(err.Error(), "linux/s390x") {
			t.Fatalf("FromContainerd(foreign) = %v; want a clear no-platform error", err)
		}
	})
	t.Run("missing layer blob", func(t *testing.T) {
		img, closer, err := FromContainerd(ctx, sock, testNS, "localhost/test/gc:1")
		if err != nil {
			t.Fatalf("FromContainerd must not read layers eagerly: %v", err)
		}
		defer closer.Close()
		if d, _ := img.Digest(); d != mustDigest(t, gcImg) {
			t.Fatalf("digest %v", d)
		}
		l, err := img.LayerByDigest(gcLost)
		if err != nil {
			t.Fatal(err)
		}
		_, err = l.Compressed()
		t.Log(err)
		if err == nil || !strings.Contains(err.Error(), "not in containerd's content store") {
			t.Fatalf("Compressed() of a deleted blob = %v", err)
		}
	})
	t.Run("unknown image", func(t *testing.T) {
		_, _, err := FromContainerd(ctx, sock, testNS, "localhost/nope:1")
		if err == nil || !strings.Contains(err.Error(), "not found") {
			t.Fatalf("FromContainerd(unknown) = %v; want not found", err)
		}
	})
}

func mustDigest(t *testing.T, img v1.Image) v1.Hash {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// checkSameImage asserts that containerd's copy of name is byte-identical to want.
func checkSameImage(t *testing.T, sock, name string, want v1.Image) {
	t.Helper()
	img, closer, err := FromContainerd(context.Background(), sock, testNS, name)
	if err != nil {
		t.Fatalf("FromContainerd(%s): %v", name, err)
	}
	defer closer.Close()
	wantDigest, _ := want.Digest()
	gotDigest, err := img.Digest()
	if err != nil || gotDigest != wantDigest {
		t.Fatalf("digest = %v, %v; want %v", gotDigest, err, wantDigest)
	}
	wantMT, _ := want.MediaType()
	if mt, _ := img.MediaType(); mt != wantMT {
		t.Errorf("media type = %s, want %s", mt, wantMT)
	}
	wantCfg, _ := want.ConfigName()
	if cfg, err := img.ConfigName(); err != nil || cfg != wantCfg {
		t.Errorf("config = %v, %v; want %v", cfg, err, wantCfg)
	}
	// validate.Image reads every blob, compressed and uncompressed, and
	// checks digests, diff_ids and sizes against manifest and config.
	if err := validate.Image(img); err != nil {
		t.Fatalf("validate %s: %v", name, err)
	}
	layers, err := img.Layers()
	if err != nil || len(layers) != 2 {
		t.Fatalf("layers = %d, %v; want 2", len(layers), err)
	}
}

// testImage builds a two-layer image with the given media types and architecture.
func testImage(t *testing.T, mt, cfgMT, layerMT types.MediaType, arch, tag string) v1.Image {
	t.Helper()
	img := mutate.MediaType(empty.Image, mt)
	img = mutate.ConfigMediaType(img, cfgMT)
	for i := 0; i < 2; i++ {
		data := tarOf(t, map[string]string{fmt.Sprintf("etc/%s-%d", tag, i): strings.Repeat(tag, 1000+i)})
		l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
			return io.NopCloser(bytes.NewReader(data)), nil
		}, tarball.WithMediaType(layerMT))
		if err != nil {
			t.Fatal(err)
		}
		if img, err = mutate.AppendLayers(img, l); err != nil {
			t.Fatal(err)
		}
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", arch
	cf.Config.Cmd = []string{"/bin/sh"}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// tarOf returns a tar holding files (name → content), with their parent dirs.
func tarOf(t *testing.T, files map[string]string) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dirs := map[string]bool{}
	for name, content := range files {
		if d := filepath.Dir(name); d != "." && !dirs[d] {
			dirs[d] = true
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755, ModTime: time.Unix(1, 0)}); err != nil {
				t.Fatal(err)
			}
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(len(content)), ModTime: time.Unix(1, 0)}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write([]byte(content)); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// writeArchive writes an OCI archive holding x (image or index) named name.
func writeArchive(t *testing.T, dir, file, name string, x any) string {
	t.Helper()
	ldir := filepath.Join(dir, file+".d")
	p, err := layout.Write(ldir, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	ann := layout.WithAnnotations(map[string]string{"io.containerd.image.name": name})
	switch v := x.(type) {
	case v1.Image:
		err = p.AppendImage(v, ann)
	case v1.ImageIndex:
		err = p.AppendIndex(v, ann)
	default:
		t.Fatalf("writeArchive: %T", x)
	}
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, file)
	tarDir(t, ldir, out)
	return out
}

// tarDir writes the regular files and dirs of src into a tar at out.
func tarDir(t *testing.T, src, out string) {
	t.Helper()
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	err = filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil || path == src {
			return err
		}
		rel, _ := filepath.Rel(src, path)
		info, err := d.Info()
		if err != nil {
			return err
		}
		hdr, err := tar.FileInfoHeader(info, "")
		if err != nil {
			return err
		}
		hdr.Name = filepath.ToSlash(rel)
		if d.IsDir() {
			hdr.Name += "/"
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if d.IsDir() {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		_, err = tw.Write(b)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
}

func importImage(t *testing.T, c *testenv.Containerd, archive string, extra ...string) {
	t.Helper()
	args := append([]string{"images", "import", "--snapshotter", "native"}, extra...)
	ctr(t, c, append(args, archive)...)
}

// createImagelessContainer creates a container record with no image, which
// ctr cannot do.
func createImagelessContainer(t *testing.T, sock, id string) {
	t.Helper()
	c, err := dial(context.Background(), sock, testNS)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = containersapi.NewContainersClient(c.conn).Create(c.withNS(ctx), &containersapi.CreateContainerRequest{
		Container: &containersapi.Container{
			ID:      id,
			Runtime: &containersapi.Container_Runtime{Name: "io.containerd.runc.v2"},
			Spec:    &anypb.Any{TypeUrl: "types.containerd.io/opencontainers/runtime-spec/1/Spec", Value: []byte("{}")},
		},
	})
	if err != nil {
		t.Fatalf("create container %s: %v", id, err)
	}
}

func ctr(t *testing.T, c *testenv.Containerd, args ...string) {
	t.Helper()
	if _, err := c.Ctr(t.Context(), args...); err != nil {
		t.Fatal(err)
	}
}

// startContainerd runs an isolated containerd (integration/testenv), torn
// down at cleanup. It skips unless root with containerd and ctr installed.
func startContainerd(t *testing.T) *testenv.Containerd {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	for _, bin := range []string{"containerd", "ctr"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("%s not installed", bin)
		}
	}
	return testenv.StartContainerdT(t, testenv.ContainerdOptions{Namespace: testNS})
}
