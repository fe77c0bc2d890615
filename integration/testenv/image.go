package testenv

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// DefaultImageName is the name tests give the base image.
const DefaultImageName = "localhost/seamless-busybox:1.0"

// BusyboxPath is the static busybox copied into the image.
const BusyboxPath = "/bin/busybox"

// FileSpec is one entry of an image's rootfs. The type comes from Mode:
// fs.ModeDir for a directory, fs.ModeSymlink for a symlink to Linkname,
// otherwise a regular file with Content, or the contents of host file Source
// when Content is nil. Permission bits default to 0644 (files) or 0755
// (dirs); owners are numeric.
type FileSpec struct {
	Mode     fs.FileMode
	Content  []byte
	Source   string
	Linkname string
	UID, GID int
}

// BuiltImage describes an image written by BuildImage.
type BuiltImage struct {
	// Archive is the OCI archive (a tarred OCI layout).
	Archive string
	// Name is the image name recorded for ctr import, e.g. localhost/x:1.0.
	Name string
	// Tag is the org.opencontainers.image.ref.name (for skopeo oci-archive:F:tag).
	Tag string
	// ManifestDigest, ConfigDigest and LayerDigests are "sha256:..." digests.
	ManifestDigest string
	ConfigDigest   string
	LayerDigests   []string
}

// BuildBaseImage writes the busybox base image named name (e.g.
// DefaultImageName) as an OCI archive in dir, without network access. The
// result is deterministic for a given busybox binary.
func BuildBaseImage(ctx context.Context, dir, name string) (archivePath, manifestDigest string, err error) {
	img, err := BuildImage(ctx, dir, name, nil)
	if err != nil {
		return "", "", err
	}
	return img.Archive, img.ManifestDigest, nil
}

// BuildImage is BuildBaseImage with extra rootfs entries, keyed by absolute
// path inside the image; they replace base entries of the same path and
// missing parent dirs are created.
func BuildImage(ctx context.Context, dir, name string, extraFiles map[string]FileSpec) (*BuiltImage, error) {
	return BuildImageWithCmd(ctx, dir, name, extraFiles, nil)
}

// BuildImageWithCmd is BuildImage with the image's default command set to
// cmd (e.g. a long sleep for a pause image); nil keeps the default shell.
func BuildImageWithCmd(ctx context.Context, dir, imageName string, extraFiles map[string]FileSpec, cmd []string) (*BuiltImage, error) {
	tag, err := parseImageName(imageName)
	if err != nil {
		return nil, err
	}
	files, err := baseFiles(ctx)
	if err != nil {
		return nil, err
	}
	for p, spec := range extraFiles {
		files[cleanImagePath(p)] = spec
	}
	addParentDirs(files)
	layerTar, err := tarRootfs(files)
	if err != nil {
		return nil, err
	}
	img, err := imageFromLayer(layerTar)
	if err != nil {
		return nil, err
	}
	if cmd != nil {
		if img, err = withCmd(img, cmd); err != nil {
			return nil, err
		}
	}
	out := &BuiltImage{Archive: filepath.Join(dir, archiveName(imageName)), Name: imageName, Tag: tag.TagStr()}
	if err := describeImage(img, out); err != nil {
		return nil, err
	}
	if err := writeOCIArchive(out.Archive, img, out.Name, out.Tag); err != nil {
		return nil, err
	}
	return out, nil
}

// withCmd returns img with its config's Cmd replaced.
func withCmd(img v1.Image, cmd []string) (v1.Image, error) {
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	cfg = cfg.DeepCopy()
	cfg.Config.Cmd = cmd
	img, err = mutate.ConfigFile(img, cfg)
	if err != nil {
		return nil, fmt.Errorf("set config: %w", err)
	}
	return img, nil
}

// parseImageName validates name and requires an explicit tag.
func parseImageName(s string) (name.Tag, error) {
	tag, err := name.NewTag(s, name.StrictValidation)
	if err != nil {
		return name.Tag{}, fmt.Errorf("image name %q (needs an explicit tag): %w", s, err)
	}
	return tag, nil
}

func archiveName(image string) string {
	r := strings.NewReplacer("/", "_", ":", "_", "@", "_")
	return r.Replace(image) + "-oci.tar"
}

func cleanImagePath(p string) string {
	return strings.TrimPrefix(path.Clean("/"+p), "/")
}

// baseFiles returns the busybox rootfs plus the test data, keyed by path
// without the leading slash.
func baseFiles(ctx context.Context) (map[string]FileSpec, error) {
	applets, err := busyboxApplets(ctx)
	if err != nil {
		return nil, err
	}
	dir := FileSpec{Mode: fs.ModeDir | 0o755}
	files := map[string]FileSpec{
		"bin":                   dir,
		"bin/busybox":           {Mode: 0o755, Source: BusyboxPath},
		"proc":                  dir,
		"sys":                   dir,
		"dev":                   dir,
		"run":                   dir,
		"var":                   dir,
		"etc":                   dir,
		"tmp":                   {Mode: fs.ModeDir | fs.ModeSticky | 0o777},
		"root":                  {Mode: fs.ModeDir | 0o700},
		"etc/passwd":            {Content: []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")},
		"etc/group":             {Content: []byte("root:x:0:\nnobody:x:65534:\n")},
		"etc/motd":              {Content: []byte("seamless test image\n")},
		"data/imgfile.txt":      {Content: []byte("image file\n")},
		"data/keep.txt":         {Content: []byte("keep\n")},
		"data/imgdir/a.txt":     {Content: []byte("a\n")},
		"data/imgdir/sub/b.txt": {Content: []byte("b\n")},
	}
	for _, a := range applets {
		if a == "busybox" {
			continue
		}
		files["bin/"+a] = FileSpec{Mode: fs.ModeSymlink | 0o777, Linkname: "busybox"}
	}
	return files, nil
}

// busyboxApplets lists the applet names of BusyboxPath.
func busyboxApplets(ctx context.Context) ([]string, error) {
	out, err := exec.CommandContext(ctx, BusyboxPath, "--list").Output()
	if err != nil {
		return nil, fmt.Errorf("%s --list: %w", BusyboxPath, err)
	}
	var applets []string
	for _, a := range strings.Fields(string(out)) {
		if a != "" && !strings.Contains(a, "/") && a != "." && a != ".." {
			applets = append(applets, a)
		}
	}
	if len(applets) == 0 {
		return nil, fmt.Errorf("%s --list printed no applets", BusyboxPath)
	}
	return applets, nil
}

// addParentDirs adds a 0755 dir entry for every missing parent.
func addParentDirs(files map[string]FileSpec) {
	for p := range files {
		for d := path.Dir(p); d != "." && d != "/"; d = path.Dir(d) {
			if _, ok := files[d]; !ok {
				files[d] = FileSpec{Mode: fs.ModeDir | 0o755}
			}
		}
	}
}

// tarRootfs writes files as an uncompressed tar, sorted, with mtime 0 and
// numeric owners.
func tarRootfs(files map[string]FileSpec) ([]byte, error) {
	paths := make([]string, 0, len(files))
	for p := range files {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, p := range paths {
		if err := writeTarEntry(tw, p, files[p]); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("close tar: %w", err)
	}
	return buf.Bytes(), nil
}

func writeTarEntry(tw *tar.Writer, p string, spec FileSpec) error {
	hdr := &tar.Header{
		Name:    p,
		ModTime: time.Unix(0, 0),
		Uid:     spec.UID,
		Gid:     spec.GID,
		Format:  tar.FormatPAX,
	}
	perm := int64(spec.Mode.Perm())
	if spec.Mode&fs.ModeSticky != 0 {
		perm |= 0o1000
	}
	if spec.Mode&fs.ModeSetuid != 0 {
		perm |= 0o4000
	}
	if spec.Mode&fs.ModeSetgid != 0 {
		perm |= 0o2000
	}
	var body []byte
	switch {
	case spec.Mode.IsDir():
		hdr.Typeflag, hdr.Name = tar.TypeDir, p+"/"
		hdr.Mode = orDefault(perm, 0o755)
	case spec.Mode&fs.ModeSymlink != 0:
		hdr.Typeflag, hdr.Linkname = tar.TypeSymlink, spec.Linkname
		hdr.Mode = orDefault(perm, 0o777)
	default:
		data, err := fileContent(spec)
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		body = data
		hdr.Typeflag, hdr.Size = tar.TypeReg, int64(len(data))
		hdr.Mode = orDefault(perm, 0o644)
	}
	if err := tw.WriteHeader(hdr); err != nil {
		return fmt.Errorf("tar header %s: %w", p, err)
	}
	if _, err := tw.Write(body); err != nil {
		return fmt.Errorf("tar write %s: %w", p, err)
	}
	return nil
}

func orDefault(v, def int64) int64 {
	if v == 0 {
		return def
	}
	return v
}

func fileContent(spec FileSpec) ([]byte, error) {
	if spec.Content != nil || spec.Source == "" {
		return spec.Content, nil
	}
	data, err := os.ReadFile(spec.Source)
	if err != nil {
		return nil, fmt.Errorf("read source: %w", err)
	}
	return data, nil
}

// imageFromLayer builds a single-layer OCI image for linux/GOARCH.
func imageFromLayer(layerTar []byte) (v1.Image, error) {
	opener := func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(layerTar)), nil }
	layer, err := tarball.LayerFromOpener(opener, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, fmt.Errorf("layer: %w", err)
	}
	base := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	base = mutate.ConfigMediaType(base, types.OCIConfigJSON)
	img, err := mutate.AppendLayers(base, layer)
	if err != nil {
		return nil, fmt.Errorf("append layer: %w", err)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	cfg = cfg.DeepCopy()
	cfg.Architecture, cfg.OS = runtime.GOARCH, "linux"
	cfg.Config.Cmd = []string{"/bin/sh"}
	cfg.Config.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	img, err = mutate.ConfigFile(img, cfg)
	if err != nil {
		return nil, fmt.Errorf("set config: %w", err)
	}
	return img, nil
}

// describeImage fills the digests of out from img.
func describeImage(img v1.Image, out *BuiltImage) error {
	md, err := img.Digest()
	if err != nil {
		return fmt.Errorf("manifest digest: %w", err)
	}
	cd, err := img.ConfigName()
	if err != nil {
		return fmt.Errorf("config digest: %w", err)
	}
	layers, err := img.Layers()
	if err != nil {
		return fmt.Errorf("layers: %w", err)
	}
	out.ManifestDigest, out.ConfigDigest = md.String(), cd.String()
	for _, l := range layers {
		d, err := l.Digest()
		if err != nil {
			return fmt.Errorf("layer digest: %w", err)
		}
		out.LayerDigests = append(out.LayerDigests, d.String())
	}
	return nil
}

// writeOCIArchive writes img as a tarred OCI image layout whose index names
// it for ctr (io.containerd.image.name) and skopeo (ref.name).
func writeOCIArchive(archive string, img v1.Image, imageName, tag string) (err error) {
	blobs, err := imageBlobs(img)
	if err != nil {
		return err
	}
	index, err := indexJSON(img, imageName, tag)
	if err != nil {
		return err
	}
	f, err := os.Create(archive)
	if err != nil {
		return fmt.Errorf("create archive: %w", err)
	}
	defer func() {
		if cerr := f.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("close archive: %w", cerr)
		}
	}()
	tw := tar.NewWriter(f)
	entries := append([]blob{
		{"oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)},
		{"index.json", index},
	}, blobs...)
	for _, dir := range []string{"blobs/", "blobs/sha256/"} {
		if err := tw.WriteHeader(&tar.Header{Name: dir, Typeflag: tar.TypeDir, Mode: 0o755, ModTime: time.Unix(0, 0)}); err != nil {
			return fmt.Errorf("write archive: %w", err)
		}
	}
	for _, e := range entries {
		hdr := &tar.Header{Name: e.name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(e.data)), ModTime: time.Unix(0, 0)}
		if err := tw.WriteHeader(hdr); err != nil {
			return fmt.Errorf("write archive: %w", err)
		}
		if _, err := tw.Write(e.data); err != nil {
			return fmt.Errorf("write archive: %w", err)
		}
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("write archive: %w", err)
	}
	return nil
}

type blob struct {
	name string
	data []byte
}

// imageBlobs returns the manifest, config and compressed layers as
// blobs/sha256/<hex> entries, sorted by name.
func imageBlobs(img v1.Image) ([]blob, error) {
	manifest, err := img.RawManifest()
	if err != nil {
		return nil, fmt.Errorf("manifest: %w", err)
	}
	config, err := img.RawConfigFile()
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	out := []blob{blobOf(manifest), blobOf(config)}
	layers, err := img.Layers()
	if err != nil {
		return nil, fmt.Errorf("layers: %w", err)
	}
	for _, l := range layers {
		data, err := readLayer(l)
		if err != nil {
			return nil, err
		}
		out = append(out, blobOf(data))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out, nil
}

func blobOf(data []byte) blob {
	h, _, _ := v1.SHA256(bytes.NewReader(data))
	return blob{name: "blobs/sha256/" + h.Hex, data: data}
}

func readLayer(l v1.Layer) ([]byte, error) {
	rc, err := l.Compressed()
	if err != nil {
		return nil, fmt.Errorf("layer: %w", err)
	}
	defer rc.Close()
	data, err := io.ReadAll(rc)
	if err != nil {
		return nil, fmt.Errorf("read layer: %w", err)
	}
	return data, nil
}

// indexJSON renders the layout's index.json with one annotated manifest.
func indexJSON(img v1.Image, imageName, tag string) ([]byte, error) {
	desc, err := imageDescriptor(img)
	if err != nil {
		return nil, err
	}
	desc.Annotations = map[string]string{
		"io.containerd.image.name":          imageName,
		"org.opencontainers.image.ref.name": tag,
	}
	index := v1.IndexManifest{
		SchemaVersion: 2,
		MediaType:     types.OCIImageIndex,
		Manifests:     []v1.Descriptor{*desc},
	}
	data, err := json.Marshal(index)
	if err != nil {
		return nil, fmt.Errorf("index.json: %w", err)
	}
	return data, nil
}

func imageDescriptor(img v1.Image) (*v1.Descriptor, error) {
	mt, err := img.MediaType()
	if err != nil {
		return nil, fmt.Errorf("media type: %w", err)
	}
	size, err := img.Size()
	if err != nil {
		return nil, fmt.Errorf("manifest size: %w", err)
	}
	d, err := img.Digest()
	if err != nil {
		return nil, fmt.Errorf("manifest digest: %w", err)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	return &v1.Descriptor{
		MediaType: mt,
		Size:      size,
		Digest:    d,
		Platform:  &v1.Platform{Architecture: cfg.Architecture, OS: cfg.OS},
	}, nil
}
