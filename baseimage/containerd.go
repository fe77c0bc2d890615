// Package baseimage finds the image a container was started from (from
// containerd, the Docker API or podman's storage) and reads it, as a
// go-containerregistry v1.Image, from containerd's content store or from a
// registry.
package baseimage

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"time"

	containersapi "github.com/containerd/containerd/api/services/containers/v1"
	contentapi "github.com/containerd/containerd/api/services/content/v1"
	imagesapi "github.com/containerd/containerd/api/services/images/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// DefaultTimeout bounds each metadata call to containerd (not blob reads).
const DefaultTimeout = 10 * time.Second

// namespaceHeader is the gRPC metadata key containerd reads the namespace from.
const namespaceHeader = "containerd-namespace"

// client is a gRPC connection to containerd bound to one namespace.
type client struct {
	address   string
	namespace string
	conn      *grpc.ClientConn
}

// dial connects to containerd's gRPC socket. The connection is established
// lazily; errors show on the first call.
func dial(ctx context.Context, address, namespace string) (*client, error) {
	if address == "" {
		return nil, errors.New("containerd address is empty")
	}
	if namespace == "" {
		return nil, errors.New("containerd namespace is empty")
	}
	path := strings.TrimPrefix(address, "unix://")
	if !filepath.IsAbs(path) {
		return nil, fmt.Errorf("containerd address %q: want an absolute unix socket path", address)
	}
	conn, err := grpc.DialContext(ctx, "unix://"+path,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(16<<20)),
	)
	if err != nil {
		return nil, fmt.Errorf("connect to containerd at %s: %w", path, err)
	}
	return &client{address: path, namespace: namespace, conn: conn}, nil
}

// Close closes the connection.
func (c *client) Close() error { return c.conn.Close() }

// withNS returns ctx carrying the client's namespace for containerd.
func (c *client) withNS(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, namespaceHeader, c.namespace)
}

// wrap turns a gRPC error into a message saying what failed and why.
func (c *client) wrap(err error, what string) error {
	if err == nil {
		return nil
	}
	switch status.Code(err) {
	case codes.Unavailable:
		return fmt.Errorf("%s: containerd at %s unreachable: %w", what, c.address, err)
	case codes.DeadlineExceeded:
		return fmt.Errorf("%s: containerd at %s did not answer in time: %w", what, c.address, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// ContainerdImageName returns the image name containerd recorded for
// container containerID in namespace.
func ContainerdImageName(ctx context.Context, address, namespace, containerID string) (string, error) {
	c, err := dial(ctx, address, namespace)
	if err != nil {
		return "", err
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(ctx, DefaultTimeout)
	defer cancel()
	what := fmt.Sprintf("containerd container %q (namespace %q)", containerID, namespace)
	resp, err := containersapi.NewContainersClient(c.conn).Get(c.withNS(ctx), &containersapi.GetContainerRequest{ID: containerID})
	if status.Code(err) == codes.NotFound {
		return "", fmt.Errorf("%s: no such container", what)
	}
	if err != nil {
		return "", c.wrap(err, "get "+what)
	}
	if resp.GetContainer().GetImage() == "" {
		return "", fmt.Errorf("%s has no image", what)
	}
	return resp.GetContainer().GetImage(), nil
}

// imageTarget returns the descriptor containerd's image imageName points to.
func (c *client) imageTarget(ctx context.Context, imageName string) (descriptor, error) {
	ctx, cancel := context.WithTimeout(ctx, DefaultTimeout)
	defer cancel()
	resp, err := imagesapi.NewImagesClient(c.conn).Get(c.withNS(ctx), &imagesapi.GetImageRequest{Name: imageName})
	if status.Code(err) == codes.NotFound {
		return descriptor{}, fmt.Errorf("image %q not found in containerd namespace %q", imageName, c.namespace)
	}
	if err != nil {
		return descriptor{}, c.wrap(err, fmt.Sprintf("get image %q", imageName))
	}
	t := resp.GetImage().GetTarget()
	if t == nil || t.GetDigest() == "" {
		return descriptor{}, fmt.Errorf("image %q has no target", imageName)
	}
	return descriptor{MediaType: t.GetMediaType(), Digest: t.GetDigest(), Size: t.GetSize()}, nil
}

// hasBlob reports whether the content store holds blob dgst.
func (c *client) hasBlob(ctx context.Context, dgst string) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, DefaultTimeout)
	defer cancel()
	_, err := contentapi.NewContentClient(c.conn).Info(c.withNS(ctx), &contentapi.InfoRequest{Digest: dgst})
	if status.Code(err) == codes.NotFound {
		return false, nil
	}
	if err != nil {
		return false, c.wrap(err, "look up blob "+dgst)
	}
	return true, nil
}

// readAll reads a small blob (manifest, index, config) whole, checking its size.
func (c *client) readAll(ctx context.Context, d descriptor) ([]byte, error) {
	const maxSmallBlob = 8 << 20
	if d.Size > maxSmallBlob {
		return nil, fmt.Errorf("blob %s: size %d exceeds %d", d.Digest, d.Size, maxSmallBlob)
	}
	ctx, cancel := context.WithTimeout(ctx, DefaultTimeout)
	defer cancel()
	rc, err := c.open(ctx, d.Digest, d.Size)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	b, err := io.ReadAll(io.LimitReader(rc, maxSmallBlob+1))
	if err != nil {
		return nil, err
	}
	return b, nil
}

// open streams blob dgst from the content store. When size >= 0 the stream
// must have exactly that many bytes. The first chunk is fetched before open
// returns so that a missing blob fails here, not on the first Read.
func (c *client) open(ctx context.Context, dgst string, size int64) (io.ReadCloser, error) {
	ctx, cancel := context.WithCancel(ctx)
	stream, err := contentapi.NewContentClient(c.conn).Read(c.withNS(ctx), &contentapi.ReadContentRequest{Digest: dgst})
	if err != nil {
		cancel()
		return nil, c.wrap(err, "read blob "+dgst)
	}
	r := &blobReader{client: c, dgst: dgst, want: size, stream: stream, cancel: cancel}
	if err := r.fill(); err != nil && err != io.EOF {
		cancel()
		return nil, err
	}
	return r, nil
}

// blobReader adapts a content Read stream to an io.ReadCloser.
type blobReader struct {
	client *client
	dgst   string
	want   int64 // expected size, < 0 when unknown
	got    int64
	stream contentapi.Content_ReadClient
	buf    []byte
	err    error
	cancel context.CancelFunc
}

// fill fetches the next non-empty chunk into r.buf, or records the final error.
func (r *blobReader) fill() error {
	for len(r.buf) == 0 && r.err == nil {
		resp, err := r.stream.Recv()
		switch {
		case err == io.EOF:
			r.err = io.EOF
			if r.want >= 0 && r.got != r.want {
				r.err = fmt.Errorf("read blob %s: got %d bytes, want %d: %w", r.dgst, r.got, r.want, io.ErrUnexpectedEOF)
			}
		case status.Code(err) == codes.NotFound:
			r.err = fmt.Errorf("blob %s not in containerd's content store (namespace %q)", r.dgst, r.client.namespace)
		case err != nil:
			r.err = r.client.wrap(err, "read blob "+r.dgst)
		default:
			r.buf = resp.GetData()
			r.got += int64(len(r.buf))
			if r.want >= 0 && r.got > r.want {
				r.err = fmt.Errorf("read blob %s: more than the expected %d bytes", r.dgst, r.want)
				r.buf = nil
			}
		}
	}
	if len(r.buf) > 0 {
		return nil
	}
	return r.err
}

// Read implements io.Reader.
func (r *blobReader) Read(p []byte) (int, error) {
	if err := r.fill(); err != nil {
		return 0, err
	}
	n := copy(p, r.buf)
	r.buf = r.buf[n:]
	return n, nil
}

// Close ends the stream.
func (r *blobReader) Close() error {
	r.cancel()
	return nil
}
