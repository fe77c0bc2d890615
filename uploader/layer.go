package uploader

import (
	"fmt"
	"io"
	"os"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/seamless-snapshot/seamless/snapshot"
)

// spoolLayer is a v1.Layer over a compressed spool file whose digests and
// sizes are already known.
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

// MediaType is the layer media type chosen to match the base image.
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

// appendLayer returns base plus layer, with a history entry and the config's
// creation time set to the capture instant.
func appendLayer(base v1.Image, layer *spoolLayer, st snapshot.State) (v1.Image, error) {
	baseMT, err := base.MediaType()
	if err != nil {
		return nil, fmt.Errorf("base image media type: %w", err)
	}
	if layer.mediaType, err = layer.codec.layerMediaType(baseMT); err != nil {
		return nil, err
	}
	created := st.CapturedAt
	if created.IsZero() {
		created = time.Now()
	}
	created = created.UTC()
	img, err := mutate.Append(base, mutate.Addendum{
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

// historyComment describes the capture in the image history.
func historyComment(st snapshot.State) string {
	c := fmt.Sprintf("snapshot of container %s: %d entries, %d bytes, paused %d us", st.Container, st.Entries, st.Bytes, st.PauseUS)
	if st.Base.Ref != "" {
		c += ", base " + st.Base.Ref
	}
	return c
}
