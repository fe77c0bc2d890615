package uploader

import (
	"context"
	"io"

	ecr "github.com/awslabs/amazon-ecr-credential-helper/ecr-login"
	ecrapi "github.com/awslabs/amazon-ecr-credential-helper/ecr-login/api"
	"github.com/google/go-containerregistry/pkg/authn"
)

// hostKeychain chooses where a registry's credentials come from by its
// host: Amazon ECR registries ask the ECR credential helper, run in this
// process (AWS credentials from the usual AWS sources), then Docker's
// config; every other registry uses Docker's config.json ($DOCKER_CONFIG,
// else ~/.docker: auths, credsStore, credHelpers).
type hostKeychain struct {
	docker authn.Keychain
	ecr    authn.Keychain
}

// NewKeychain returns the uploader's keychain: Docker's config for every
// registry, with the in-process ECR helper first for ECR registries.
// Credentials go to the registry only: never to logs or state.
func NewKeychain(log io.Writer) authn.Keychain {
	if log == nil {
		log = io.Discard
	}
	return &hostKeychain{
		docker: authn.DefaultKeychain,
		ecr:    authn.NewKeychainFromHelper(ecr.NewECRHelper(ecr.WithLogger(log))),
	}
}

// Resolve returns the authenticator for r.
func (k *hostKeychain) Resolve(r authn.Resource) (authn.Authenticator, error) {
	return k.ResolveContext(context.Background(), r)
}

// ResolveContext returns the authenticator for r.
func (k *hostKeychain) ResolveContext(ctx context.Context, r authn.Resource) (authn.Authenticator, error) {
	if isECR(r.RegistryStr()) {
		return authn.Resolve(ctx, authn.NewMultiKeychain(k.ecr, k.docker), r)
	}
	return authn.Resolve(ctx, k.docker, r)
}

// isECR reports whether host is an Amazon ECR registry
// (<account>.dkr.ecr[-fips].<region>.amazonaws.com[.cn] and the other
// partitions' domains, or ECR Public), as the ECR helper itself reads it.
func isECR(host string) bool {
	_, err := ecrapi.ExtractRegistry(host)
	return err == nil
}
