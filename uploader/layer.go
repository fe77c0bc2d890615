package uploader

import (
	"fmt"
	"io"
	"os"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/partial"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/seamless-snapshot/seamless/snapshot"
)

// spoolLayer is a v1.Layer over a compressed spool file whose digests and
// sizes are already known. Compressed opens the file anew on each call, so
// a push can be retried.
type spoolLayer struct {
	path      string
	codec     codec
	digest    v1.Hash
	diffID    v1.Hash
	size      int64
	usize     int64
	mediaType types.MediaType
}

var _ v1.Layer = (*spoolLayer)(nil)

// Digest is the sha256 of the compressed spool.
func (l *spoolLayer) Digest() (v1.Hash, error) { return l.digest, nil }

// DiffID is the sha256 of the uncompressed tar.
func (l *spoolLayer) DiffID() (v1.Hash, error) { return l.diffID, nil }

// Size is the compressed size.
func (l *spoolLayer) Size() (int64, error) { return l.size, nil }

// MediaType is the layer media type chosen to match the image.
func (l *spoolLayer) MediaType() (types.MediaType, error) { return l.mediaType, nil }

// Compressed opens the spool file.
func (l *spoolLayer) Compressed() (io.ReadCloser, error) {
	f, err := os.Open(l.path)
	if err != nil {
		return nil, fmt.Errorf("open layer spool: %w", err)
	}
	return f, nil
}

// Uncompressed opens the spool file and decompresses it.
func (l *spoolLayer) Uncompressed() (io.ReadCloser, error) {
	f, err := l.Compressed()
	if err != nil {
		return nil, err
	}
	r, err := l.codec.newReader(f)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("decompress layer spool: %w", err)
	}
	return &stackedCloser{Reader: r, closers: []io.Closer{r, f}}, nil
}

// stackedCloser reads from Reader and closes every closer in order.
type stackedCloser struct {
	io.Reader
	closers []io.Closer
}

func (s *stackedCloser) Close() error {
	var first error
	for _, c := range s.closers {
		if err := c.Close(); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// imageOptions say how the new image is assembled.
type imageOptions struct {
	// oci converts a Docker schema2 base to OCI media types.
	oci bool
	// mountFrom, when set, is a repository on the target registry that may
	// hold the base layers: the registry is asked to mount them from there
	// instead of receiving them again.
	mountFrom name.Reference
}

// appendLayer returns base plus layer, with a history entry and the
// config's creation time set to the capture instant. The manifest keeps the
// base's media types, except that a zstd layer or opts.oci turn a Docker
// schema2 base into OCI (same blobs, OCI descriptors).
func appendLayer(base v1.Image, layer *spoolLayer, st snapshot.State, opts imageOptions) (v1.Image, error) {
	baseMT, err := base.MediaType()
	if err != nil {
		return nil, fmt.Errorf("base image media type: %w", err)
	}
	view := &baseView{Image: base, mountFrom: opts.mountFrom}
	switch baseMT {
	case types.OCIManifestSchema1:
	case types.DockerManifestSchema2:
		view.toOCI = opts.oci || layer.codec.name == "zstd"
	default:
		return nil, fmt.Errorf("unsupported base manifest media type %q", baseMT)
	}
	mt := baseMT
	if view.toOCI {
		mt = types.OCIManifestSchema1
	}
	if layer.mediaType, err = layer.codec.layerMediaType(mt); err != nil {
		return nil, err
	}
	created := st.CapturedAt
	if created.IsZero() {
		created = time.Now()
	}
	created = created.UTC()
	img, err := mutate.Append(view, mutate.Addendum{
		Layer: layer,
		History: v1.History{
			Created:   v1.Time{Time: created},
			CreatedBy: "seamless snapshot " + st.ID,
			Comment:   historyComment(st),
		},
	})
	if err != nil {
		return nil, fmt.Errorf("append layer: %w", err)
	}
	img, err = mutate.CreatedAt(img, v1.Time{Time: created})
	if err != nil {
		return nil, fmt.Errorf("set creation time: %w", err)
	}
	return img, nil
}

// baseView shows a base image as the new image needs it: optionally with
// OCI media types, and with layers the registry may mount from mountFrom.
type baseView struct {
	v1.Image
	toOCI     bool
	mountFrom name.Reference
}

// ociTypes maps Docker schema2 media types to their OCI equivalents (the
// blobs are the same).
var ociTypes = map[types.MediaType]types.MediaType{
	types.DockerManifestSchema2:   types.OCIManifestSchema1,
	types.DockerConfigJSON:        types.OCIConfigJSON,
	types.DockerLayer:             types.OCILayer,
	types.DockerUncompressedLayer: types.OCIUncompressedLayer,
	types.DockerForeignLayer:      types.OCIRestrictedLayer,
}

func (b *baseView) convert(mt types.MediaType) types.MediaType {
	if b.toOCI {
		if o, ok := ociTypes[mt]; ok {
			return o
		}
	}
	return mt
}

// MediaType is the base's manifest media type, converted.
func (b *baseView) MediaType() (types.MediaType, error) {
	mt, err := b.Image.MediaType()
	return b.convert(mt), err
}

// Manifest is the base's manifest with converted media types. (mutate
// builds the new manifest from it.)
func (b *baseView) Manifest() (*v1.Manifest, error) {
	m, err := b.Image.Manifest()
	if err != nil || !b.toOCI {
		return m, err
	}
	m = m.DeepCopy()
	m.MediaType = b.convert(m.MediaType)
	m.Config.MediaType = b.convert(m.Config.MediaType)
	for i := range m.Layers {
		m.Layers[i].MediaType = b.convert(m.Layers[i].MediaType)
	}
	return m, nil
}

// RawManifest is the base's raw manifest, or the converted Manifest's JSON.
func (b *baseView) RawManifest() ([]byte, error) {
	if !b.toOCI {
		return b.Image.RawManifest()
	}
	return partial.RawManifest(b)
}

// Digest is the sha256 of RawManifest.
func (b *baseView) Digest() (v1.Hash, error) { return partial.Digest(b) }

// Size is the size of RawManifest.
func (b *baseView) Size() (int64, error) { return partial.Size(b) }

// Layers are the base's layers, wrapped.
func (b *baseView) Layers() ([]v1.Layer, error) {
	ls, err := b.Image.Layers()
	if err != nil {
		return nil, err
	}
	for i, l := range ls {
		if ls[i], err = b.wrap(l); err != nil {
			return nil, err
		}
	}
	return ls, nil
}

// LayerByDigest is the base's layer, wrapped.
func (b *baseView) LayerByDigest(h v1.Hash) (v1.Layer, error) {
	l, err := b.Image.LayerByDigest(h)
	if err != nil {
		return nil, err
	}
	return b.wrap(l)
}

// LayerByDiffID is the base's layer, wrapped.
func (b *baseView) LayerByDiffID(h v1.Hash) (v1.Layer, error) {
	l, err := b.Image.LayerByDiffID(h)
	if err != nil {
		return nil, err
	}
	return b.wrap(l)
}

// wrap gives l its converted media type and makes it mountable.
func (b *baseView) wrap(l v1.Layer) (v1.Layer, error) {
	if b.toOCI {
		mt, err := l.MediaType()
		if err != nil {
			return nil, err
		}
		l = &typedLayer{Layer: l, mediaType: b.convert(mt)}
	}
	if b.mountFrom != nil {
		l = &remote.MountableLayer{Layer: l, Reference: b.mountFrom}
	}
	return l, nil
}

// typedLayer is a layer shown with another media type.
type typedLayer struct {
	v1.Layer
	mediaType types.MediaType
}

// MediaType is the overriding media type.
func (l *typedLayer) MediaType() (types.MediaType, error) { return l.mediaType, nil }

// Descriptor is the layer's descriptor with the overriding media type.
func (l *typedLayer) Descriptor() (*v1.Descriptor, error) {
	d, err := partial.Descriptor(l.Layer)
	if err != nil {
		return nil, err
	}
	c := *d
	c.MediaType = l.mediaType
	return &c, nil
}

// historyComment describes the capture in the image history.
func historyComment(st snapshot.State) string {
	c := fmt.Sprintf("snapshot of container %s: %d entries, %d bytes, paused %d us", st.Container, st.Entries, st.Bytes, st.PauseUS)
	if st.Base.Ref != "" {
		c += ", base " + st.Base.Ref
	}
	return c
}
