package hook

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/seamless-snapshot/seamless/baseimage"
	"github.com/seamless-snapshot/seamless/shim"
)

// Engine markers in the bundle's spec and runc's command line.
const (
	// annotationLibpodManager is set to "libpod" by podman.
	annotationLibpodManager = "io.container.manager"
	// dockerRuncRootSuffix ends the runc --root dockerd's containerd uses
	// (<exec-root>/runtime-runc/moby).
	dockerRuncRootSuffix = "/runtime-runc/moby"
	// dockerNamespace is the containerd namespace of dockerd's containers.
	dockerNamespace = "moby"
	// dockerSetKeyHook is argv[0] of the prestart hook dockerd adds to every
	// container with a network sandbox; its path is /proc/<dockerd pid>/exe.
	dockerSetKeyHook = "libnetwork-setkey"
	// EnvDockerHost overrides where the Docker API is (unix:///path).
	EnvDockerHost = "DOCKER_HOST"
)

// imageLookupTimeout bounds the image name lookup of a starting container.
const imageLookupTimeout = 2 * time.Second

// engineHints is what the caller knows besides the bundle: the runc root
// (wrapper only) and the pid of the process that may be a containerd shim.
type engineHints struct {
	// runcRoot is runc's --root, "" for a hook.
	runcRoot string
	// shimPID is the process that would be containerd's runc v2 shim: the
	// wrapper's parent, the hook's grandparent (runc's parent).
	shimPID int
	getenv  func(string) string
}

// loadSpec reads the OCI spec of bundle.
func loadSpec(bundle string) (*specs.Spec, error) {
	b, err := os.ReadFile(filepath.Join(bundle, "config.json"))
	if err != nil {
		return nil, fmt.Errorf("read bundle spec: %w", err)
	}
	var spec specs.Spec
	if err := json.Unmarshal(b, &spec); err != nil {
		return nil, fmt.Errorf("decode bundle spec %s/config.json: %w", bundle, err)
	}
	return &spec, nil
}

// detectEngine fills in cfg's engine, where that engine is reached and, when
// it is cheap to know, the image name, from the bundle's spec and the hints.
// It never fails: an undetected engine leaves cfg.Engine empty, and
// snapshots then need a base named by hand.
func detectEngine(cfg *shim.Config, spec *specs.Spec, h engineHints) {
	if h.getenv == nil {
		h.getenv = os.Getenv
	}
	ann := cfg.Annotations
	addr, ns, isContainerd := "", "", false
	if h.shimPID > 0 {
		addr, ns, isContainerd = baseimage.ContainerdFromPID(h.shimPID)
	}
	switch {
	case ns == dockerNamespace || strings.HasSuffix(filepath.Clean(h.runcRoot), dockerRuncRootSuffix) || dockerdPID(spec) > 0:
		cfg.Engine = shim.EngineDocker
		cfg.DockerHost = dockerHost(spec, h.getenv)
		cfg.Image = dockerImageName(spec)
		if isContainerd {
			cfg.ContainerdAddress, cfg.ContainerdNamespace = addr, ns
		}
	case ann[annotationLibpodManager] == "libpod":
		cfg.Engine = shim.EnginePodman
		cfg.PodmanContainersDir = baseimage.PodmanContainersDir(cfg.Bundle)
		if cfg.PodmanContainersDir != "" {
			cfg.Image = baseimage.PodmanImageName(cfg.PodmanContainersDir, cfg.ContainerID)
		}
	case isContainerd && ann[shim.AnnotationCRIContainerType] != "":
		cfg.Engine, cfg.ContainerdAddress, cfg.ContainerdNamespace = shim.EngineCRI, addr, ns
		cfg.Image = ann[shim.AnnotationCRIImageName]
	case isContainerd:
		cfg.Engine, cfg.ContainerdAddress, cfg.ContainerdNamespace = shim.EngineContainerd, addr, ns
		ctx, cancel := context.WithTimeout(context.Background(), imageLookupTimeout)
		defer cancel()
		cfg.Image, _ = baseimage.ContainerdImageName(ctx, addr, ns, cfg.ContainerID)
	}
}

// dockerdPID returns the pid of the dockerd that created spec, from its
// libnetwork-setkey prestart hook (path /proc/<pid>/exe), or 0.
func dockerdPID(spec *specs.Spec) int {
	if spec == nil || spec.Hooks == nil {
		return 0
	}
	for _, hk := range spec.Hooks.Prestart { //nolint:staticcheck // dockerd still uses prestart
		if len(hk.Args) == 0 || hk.Args[0] != dockerSetKeyHook {
			continue
		}
		rest, ok := strings.CutPrefix(hk.Path, "/proc/")
		if !ok {
			continue
		}
		pidStr, ok := strings.CutSuffix(rest, "/exe")
		if !ok {
			continue
		}
		if pid, err := strconv.Atoi(pidStr); err == nil && pid > 0 {
			return pid
		}
	}
	return 0
}

// dockerHost finds the Docker API socket: $DOCKER_HOST (from the engine's
// environment), else the -H flags of the dockerd named by the spec's
// libnetwork-setkey hook, else DefaultDockerHost.
func dockerHost(spec *specs.Spec, getenv func(string) string) string {
	if p := baseimage.DockerSocketPath(getenv(EnvDockerHost)); p != "" {
		return p
	}
	if pid := dockerdPID(spec); pid > 0 {
		if args, err := baseimage.ProcessCmdline(pid); err == nil {
			if p := baseimage.DockerHostFromCmdline(args); p != "" {
				return p
			}
		}
	}
	return baseimage.DefaultDockerHost
}

// dockerImageName reads the image a Docker container was created with from
// its config.v2.json, found next to the /etc/hostname file dockerd mounts
// (<data-root>/containers/<id>/hostname); "" when unknown. The Docker API is
// not asked: dockerd holds the container's lock while it starts it.
func dockerImageName(spec *specs.Spec) string {
	if spec == nil {
		return ""
	}
	for _, m := range spec.Mounts {
		if m.Destination == "/etc/hostname" && filepath.IsAbs(m.Source) {
			img, err := baseimage.DockerConfigImage(filepath.Dir(m.Source))
			if err == nil {
				return img
			}
		}
	}
	return ""
}

// rootfsOf resolves the spec's root.path against the bundle.
func rootfsOf(spec *specs.Spec, bundle string) (string, error) {
	if spec.Root == nil || spec.Root.Path == "" {
		return "", fmt.Errorf("bundle %s: spec has no root.path", bundle)
	}
	if filepath.IsAbs(spec.Root.Path) {
		return filepath.Clean(spec.Root.Path), nil
	}
	return filepath.Join(bundle, spec.Root.Path), nil
}
