package baseimage

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"runtime"
	"sort"
	"strings"

	"github.com/containerd/platforms"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/partial"
	"github.com/google/go-containerregistry/pkg/v1/types"
	specs "github.com/opencontainers/image-spec/specs-go/v1"
)

// descriptor is the part of an OCI descriptor needed to fetch a blob.
type descriptor struct {
	MediaType string
	Digest    string
	Size      int64
}

// maxIndexDepth bounds nested indexes (an index pointing to an index).
const maxIndexDepth = 4

// FromContainerd returns image imageName of containerd's namespace as a
// v1.Image whose manifest, config and compressed layers are read from
// containerd's content store (layers lazily, when a caller reads them). An
// index resolves to its linux/<GOARCH> manifest. The Closer releases the
// connection to containerd; close it after the last use of the image. ctx
// governs the connection and every later blob read.
func FromContainerd(ctx context.Context, address, namespace, imageName string) (v1.Image, io.Closer, error) {
	c, err := dial(ctx, address, namespace)
	if err != nil {
		return nil, nil, err
	}
	img, err := loadImage(ctx, c, imageName)
	if err != nil {
		c.Close()
		return nil, nil, fmt.Errorf("base image %q from containerd: %w", imageName, err)
	}
	v1img, err := partial.CompressedToImage(img)
	if err != nil {
		c.Close()
		return nil, nil, fmt.Errorf("base image %q from containerd: %w", imageName, err)
	}
	return v1img, c, nil
}

// loadImage resolves imageName to a single-platform manifest and reads its
// manifest and config.
func loadImage(ctx context.Context, c *client, imageName string) (*containerdImage, error) {
	target, err := c.imageTarget(ctx, imageName)
	if err != nil {
		return nil, err
	}
	desc, raw, err := resolveManifest(ctx, c, target)
	if err != nil {
		return nil, err
	}
	m, err := v1.ParseManifest(bytes.NewReader(raw))
	if err != nil {
		return nil, fmt.Errorf("parse manifest %s: %w", desc.Digest, err)
	}
	mt := types.MediaType(desc.MediaType)
	if m.MediaType != "" {
		mt = m.MediaType
	}
	cfgDesc := descriptor{MediaType: string(m.Config.MediaType), Digest: m.Config.Digest.String(), Size: m.Config.Size}
	rawCfg, err := c.readAll(ctx, cfgDesc)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	cfg, err := v1.ParseConfigFile(bytes.NewReader(rawCfg))
	if err != nil {
		return nil, fmt.Errorf("parse config %s: %w", cfgDesc.Digest, err)
	}
	if len(cfg.RootFS.DiffIDs) != len(m.Layers) {
		return nil, fmt.Errorf("manifest %s has %d layers but its config %d diff_ids", desc.Digest, len(m.Layers), len(cfg.RootFS.DiffIDs))
	}
	return &containerdImage{ctx: ctx, client: c, rawManifest: raw, manifest: m, mediaType: mt, rawConfig: rawCfg, config: cfg}, nil
}

// resolveManifest follows desc through indexes down to an image manifest,
// returning the manifest's descriptor and raw bytes.
func resolveManifest(ctx context.Context, c *client, desc descriptor) (descriptor, []byte, error) {
	for depth := 0; ; depth++ {
		raw, err := c.readAll(ctx, desc)
		if err != nil {
			return descriptor{}, nil, err
		}
		mt := types.MediaType(desc.MediaType)
		if mt == "" {
			mt = sniffMediaType(raw)
		}
		switch {
		case mt == types.DockerManifestSchema2 || mt == types.OCIManifestSchema1:
			desc.MediaType = string(mt)
			return desc, raw, nil
		case mt.IsIndex():
			if depth >= maxIndexDepth {
				return descriptor{}, nil, fmt.Errorf("index %s: nested deeper than %d", desc.Digest, maxIndexDepth)
			}
			desc, err = pickPlatform(ctx, c, desc.Digest, raw)
			if err != nil {
				return descriptor{}, nil, err
			}
		default:
			return descriptor{}, nil, fmt.Errorf("%s: unsupported media type %q", desc.Digest, mt)
		}
	}
}

// sniffMediaType reads the mediaType field of a manifest or index, guessing
// from its shape when the field is absent.
func sniffMediaType(raw []byte) types.MediaType {
	var probe struct {
		MediaType types.MediaType `json:"mediaType"`
		Manifests json.RawMessage `json:"manifests"`
	}
	if json.Unmarshal(raw, &probe) != nil {
		return ""
	}
	switch {
	case probe.MediaType != "":
		return probe.MediaType
	case probe.Manifests != nil:
		return types.OCIImageIndex
	}
	return types.OCIManifestSchema1
}

// hostPlatform is linux on this machine's architecture (and CPU variant).
func hostPlatform() specs.Platform {
	p := platforms.DefaultSpec()
	p.OS = "linux"
	p.Architecture = runtime.GOARCH
	return p
}

// pickPlatform chooses, among an index's manifests present in the content
// store, the best match for hostPlatform.
func pickPlatform(ctx context.Context, c *client, indexDigest string, raw []byte) (descriptor, error) {
	idx, err := v1.ParseIndexManifest(bytes.NewReader(raw))
	if err != nil {
		return descriptor{}, fmt.Errorf("parse index %s: %w", indexDigest, err)
	}
	want := hostPlatform()
	matcher := platforms.Only(want)
	var cands []v1.Descriptor
	var seen []string
	for _, d := range idx.Manifests {
		if d.Platform == nil {
			continue
		}
		p := specs.Platform{OS: d.Platform.OS, Architecture: d.Platform.Architecture, Variant: d.Platform.Variant, OSVersion: d.Platform.OSVersion}
		seen = append(seen, platforms.Format(p))
		if matcher.Match(p) {
			cands = append(cands, d)
		}
	}
	sort.SliceStable(cands, func(i, j int) bool {
		return matcher.Less(toSpec(cands[i].Platform), toSpec(cands[j].Platform))
	})
	for _, d := range cands {
		ok, err := c.hasBlob(ctx, d.Digest.String())
		if err != nil {
			return descriptor{}, err
		}
		if ok {
			return descriptor{MediaType: string(d.MediaType), Digest: d.Digest.String(), Size: d.Size}, nil
		}
	}
	if len(cands) > 0 {
		return descriptor{}, fmt.Errorf("index %s: no manifest for %s in containerd's content store", indexDigest, platforms.Format(want))
	}
	return descriptor{}, fmt.Errorf("index %s: no manifest for %s (has: %s)", indexDigest, platforms.Format(want), strings.Join(seen, ", "))
}

func toSpec(p *v1.Platform) specs.Platform {
	return specs.Platform{OS: p.OS, Architecture: p.Architecture, Variant: p.Variant, OSVersion: p.OSVersion}
}

// containerdImage implements partial.CompressedImageCore over containerd's
// content store.
type containerdImage struct {
	ctx         context.Context
	client      *client
	rawManifest []byte
	manifest    *v1.Manifest
	mediaType   types.MediaType
	rawConfig   []byte
	config      *v1.ConfigFile
}

var _ partial.CompressedImageCore = (*containerdImage)(nil)

// RawManifest returns the manifest bytes exactly as stored.
func (i *containerdImage) RawManifest() ([]byte, error) { return i.rawManifest, nil }

// RawConfigFile returns the config bytes exactly as stored.
func (i *containerdImage) RawConfigFile() ([]byte, error) { return i.rawConfig, nil }

// MediaType is the manifest's media type (Docker schema2 or OCI).
func (i *containerdImage) MediaType() (types.MediaType, error) { return i.mediaType, nil }

// LayerByDigest returns the layer (or config) blob h, read lazily.
func (i *containerdImage) LayerByDigest(h v1.Hash) (partial.CompressedLayer, error) {
	if h == i.manifest.Config.Digest {
		return &blobLayer{img: i, desc: i.manifest.Config, diffID: h}, nil
	}
	for n, d := range i.manifest.Layers {
		if d.Digest == h {
			return &blobLayer{img: i, desc: d, diffID: i.config.RootFS.DiffIDs[n]}, nil
		}
	}
	return nil, fmt.Errorf("blob %s is not part of manifest", h)
}

// blobLayer is one compressed blob of a containerd image.
type blobLayer struct {
	img    *containerdImage
	desc   v1.Descriptor
	diffID v1.Hash
}

// Digest is the compressed blob's digest.
func (l *blobLayer) Digest() (v1.Hash, error) { return l.desc.Digest, nil }

// DiffID is the uncompressed digest, from the image config.
func (l *blobLayer) DiffID() (v1.Hash, error) { return l.diffID, nil }

// Size is the compressed size.
func (l *blobLayer) Size() (int64, error) { return l.desc.Size, nil }

// MediaType is the layer's media type as the manifest says.
func (l *blobLayer) MediaType() (types.MediaType, error) { return l.desc.MediaType, nil }

// Descriptor returns the manifest's descriptor (keeping annotations and URLs).
func (l *blobLayer) Descriptor() (*v1.Descriptor, error) {
	d := l.desc
	return &d, nil
}

// Compressed streams the blob from containerd's content store.
func (l *blobLayer) Compressed() (io.ReadCloser, error) {
	return l.img.client.open(l.img.ctx, l.desc.Digest.String(), l.desc.Size)
}
