package shim

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"

	"github.com/seamless-snapshot/seamless/baseimage"
	"github.com/seamless-snapshot/seamless/snapshot"
)

// Engines that run containers, as Config.Engine names them.
const (
	// EngineContainerd is containerd without Kubernetes (ctr, nerdctl, ...):
	// the base is the container's image in containerd's content store.
	EngineContainerd = "containerd"
	// EngineCRI is containerd's CRI plugin (Kubernetes, namespace k8s.io):
	// the base is read from containerd's content store too.
	EngineCRI = "cri"
	// EngineDocker is dockerd (through containerd, namespace moby): the base
	// is the image's registry reference by digest, from the Docker API.
	EngineDocker = "docker"
	// EnginePodman is podman (OCI hook or runtime): the base is the image's
	// registry reference by digest, from podman's storage.
	EnginePodman = "podman"
)

// Annotations about the base image and Kubernetes pods.
const (
	// AnnotationBase names the base image (a registry reference) for every
	// snapshot of the container, instead of what its engine reports.
	AnnotationBase = "io.seamless.snapshot.base"
	// AnnotationCRIContainerType is "sandbox" for a pod's pause container
	// and "container" for the others (containerd's CRI plugin).
	AnnotationCRIContainerType = "io.kubernetes.cri.container-type"
	// AnnotationCRIImageName is the image a CRI container was created from.
	AnnotationCRIImageName = "io.kubernetes.cri.image-name"
	// AnnotationCRISandboxName and AnnotationCRISandboxNamespace name the pod.
	AnnotationCRISandboxName      = "io.kubernetes.cri.sandbox-name"
	AnnotationCRISandboxNamespace = "io.kubernetes.cri.sandbox-namespace"
)

// ErrSandbox is wrapped by the refusal to snapshot a pod sandbox.
var ErrSandbox = errors.New("it is a pod sandbox (pause container): it holds the pod's namespaces and has no changes worth an image")

// baseImage decides the image the snapshot's layer goes on: req.Base, the
// AnnotationBase annotation, or what the container's engine reports. It
// refuses pod sandboxes. Errors a user can fix by naming the base end with
// baseimage.BaseFlagHint.
func (s *Shim) baseImage(ctx context.Context, req snapshot.Request) (snapshot.Base, error) {
	id := s.cfg.ContainerID
	if s.cfg.Annotations[AnnotationCRIContainerType] == "sandbox" {
		pod := s.cfg.Annotations[AnnotationCRISandboxNamespace] + "/" + s.cfg.Annotations[AnnotationCRISandboxName]
		return snapshot.Base{}, &RequestError{Err: fmt.Errorf("container %s is not a snapshot target: %w; snapshot one of the containers of pod %s instead", id, ErrSandbox, pod)}
	}
	if ref := strings.TrimSpace(req.Base); ref != "" {
		if _, err := name.ParseReference(ref); err != nil {
			return snapshot.Base{}, badRequest("invalid --base reference %q: %v", ref, err)
		}
		return registryBase(ref, req, nil), nil
	}
	if ref := strings.TrimSpace(s.cfg.Annotations[AnnotationBase]); ref != "" {
		if _, err := name.ParseReference(ref); err != nil {
			return snapshot.Base{}, badRequest("invalid %s annotation %q: %v", AnnotationBase, ref, err)
		}
		return registryBase(ref, req, nil), nil
	}
	switch s.cfg.Engine {
	case EngineContainerd, EngineCRI:
		return s.containerdBase(ctx)
	case EngineDocker:
		img, err := baseimage.DockerImage(ctx, s.cfg.DockerHost, id)
		if err != nil {
			return snapshot.Base{}, fmt.Errorf("base image of %s: %w; %s", id, err, baseimage.BaseFlagHint)
		}
		return engineBase(id, img, req)
	case EnginePodman:
		img, err := baseimage.PodmanImage(s.cfg.PodmanContainersDir, id)
		if err != nil {
			return snapshot.Base{}, fmt.Errorf("base image of %s: %w; %s", id, err, baseimage.BaseFlagHint)
		}
		return engineBase(id, img, req)
	case "":
		return snapshot.Base{}, fmt.Errorf("base image of %s: the engine running it is unknown (not containerd, CRI, Docker or podman); %s", id, baseimage.BaseFlagHint)
	}
	return snapshot.Base{}, fmt.Errorf("base image of %s: unknown engine %q; %s", id, s.cfg.Engine, baseimage.BaseFlagHint)
}

// containerdBase is the container's image in containerd's content store: the
// image of its containerd record, or for CRI containers whose record has none
// the image the CRI plugin annotated.
func (s *Shim) containerdBase(ctx context.Context) (snapshot.Base, error) {
	id := s.cfg.ContainerID
	ref, err := baseimage.ContainerdImageName(ctx, s.cfg.ContainerdAddress, s.cfg.ContainerdNamespace, id)
	if err != nil || ref == "" {
		annotated := s.cfg.Annotations[AnnotationCRIImageName]
		if annotated == "" {
			return snapshot.Base{}, fmt.Errorf("base image of %s: %w; %s", id, err, baseimage.BaseFlagHint)
		}
		ref = annotated
	}
	return snapshot.Base{
		Ref: ref, Source: "containerd",
		ContainerdAddress: s.cfg.ContainerdAddress, ContainerdNamespace: s.cfg.ContainerdNamespace,
	}, nil
}

// engineBase is the registry reference by digest of an engine's image.
func engineBase(id string, img *baseimage.EngineImage, req snapshot.Request) (snapshot.Base, error) {
	ref, err := img.RegistryRef()
	if err != nil {
		return snapshot.Base{}, fmt.Errorf("base image of %s: %w; push it to a registry and run the container from there, or %s", id, err, baseimage.BaseFlagHint)
	}
	return registryBase(ref, req, img.DiffIDs), nil
}

// registryBase is a base read from a registry. The request's plain-HTTP and
// insecure choices apply to it when it lives in the target's registry.
func registryBase(ref string, req snapshot.Request, diffIDs []string) snapshot.Base {
	b := snapshot.Base{Ref: ref, Source: "registry", DiffIDs: diffIDs}
	if sameRegistry(ref, req.Target) {
		b.PlainHTTP, b.Insecure = req.PlainHTTP, req.Insecure
	}
	return b
}

// sameRegistry reports whether two references name the same registry host.
func sameRegistry(a, b string) bool {
	ra, errA := name.ParseReference(a)
	rb, errB := name.ParseReference(b)
	return errA == nil && errB == nil && ra.Context().RegistryStr() == rb.Context().RegistryStr()
}
