package baseimage

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"runtime"
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// BaseFlagHint tells the user how to name a base image by hand; errors about
// a base that cannot be found or fetched end with it.
const BaseFlagHint = "name the base image with `seamless snapshot --base REF` (or the io.seamless.snapshot.base annotation)"

// RegistryOptions configure FromRegistry.
type RegistryOptions struct {
	// PlainHTTP talks to the registry over HTTP (loopback registries always
	// are); Insecure also skips TLS verification.
	PlainHTTP, Insecure bool
	// DiffIDs, when set, are the layers the image must have (uncompressed
	// digests, base first): the layers the container actually runs on.
	DiffIDs []string
	// Keychain resolves credentials (default authn.DefaultKeychain).
	Keychain authn.Keychain
	// Transport is the HTTP transport (default: remote.DefaultTransport,
	// without TLS verification when Insecure).
	Transport http.RoundTripper
}

// FromRegistry opens the base image ref in its registry, resolving an index
// to its linux/GOARCH image. Layers are read lazily, when pushed; pushed to
// the same registry they are mounted, not copied. Manifest and config are
// fetched here, so a missing or unreachable base fails now, and a base whose
// layers differ from opts.DiffIDs is refused. The Closer does nothing.
func FromRegistry(ctx context.Context, ref string, opts RegistryOptions) (v1.Image, io.Closer, error) {
	var nopts []name.Option
	if opts.PlainHTTP || opts.Insecure {
		nopts = append(nopts, name.Insecure)
	}
	r, err := name.ParseReference(ref, nopts...)
	if err != nil {
		return nil, nil, fmt.Errorf("base image %q: %w; %s", ref, err, BaseFlagHint)
	}
	kc := opts.Keychain
	if kc == nil {
		kc = authn.DefaultKeychain
	}
	tr := opts.Transport
	if tr == nil {
		t := remote.DefaultTransport.(*http.Transport).Clone()
		if opts.Insecure {
			if t.TLSClientConfig == nil {
				t.TLSClientConfig = &tls.Config{}
			}
			t.TLSClientConfig.InsecureSkipVerify = true //nolint:gosec // asked for (--target-insecure on the same registry)
		}
		tr = t
	}
	img, err := remote.Image(r,
		remote.WithContext(ctx),
		remote.WithAuthFromKeychain(kc),
		remote.WithTransport(tr),
		remote.WithPlatform(v1.Platform{OS: "linux", Architecture: runtime.GOARCH}),
	)
	if err != nil {
		return nil, nil, fmt.Errorf("fetch base image %s: %w; %s", ref, err, BaseFlagHint)
	}
	if len(opts.DiffIDs) > 0 {
		if err := checkDiffIDs(img, opts.DiffIDs); err != nil {
			return nil, nil, fmt.Errorf("base image %s: %w; %s", ref, err, BaseFlagHint)
		}
	}
	return img, io.NopCloser(nil), nil
}

// checkDiffIDs compares img's layers with the ones the container runs on.
func checkDiffIDs(img v1.Image, want []string) error {
	cfg, err := img.ConfigFile()
	if err != nil {
		return fmt.Errorf("read config: %w", err)
	}
	got := make([]string, len(cfg.RootFS.DiffIDs))
	for i, d := range cfg.RootFS.DiffIDs {
		got[i] = d.String()
	}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		return fmt.Errorf("its layers %v are not the %v the container runs on", short(got), short(want))
	}
	return nil
}

// short abbreviates digests for messages.
func short(ds []string) []string {
	out := make([]string, len(ds))
	for i, d := range ds {
		if len(d) > 19 {
			d = d[:19]
		}
		out[i] = d
	}
	return out
}
