package baseimage

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
)

// EngineImage is what a container engine (Docker, podman) knows of the image
// a container was created from.
type EngineImage struct {
	// Name is the reference the container was created from, as the engine
	// recorded it (e.g. "registry.example.com/app:1").
	Name string
	// ID is the engine's image id ("sha256:..." for Docker, hex for podman).
	ID string
	// RepoDigests are the registry references by digest ("repo@sha256:...")
	// under which the engine knows the image: where it was pulled from or
	// pushed to.
	RepoDigests []string
	// DiffIDs are the uncompressed digests of the image's layers, base first,
	// when known.
	DiffIDs []string
}

// ErrNoRegistryDigest means the engine knows no registry reference by digest
// for an image: it was built or loaded locally and never pulled or pushed.
var ErrNoRegistryDigest = errors.New("the engine knows no registry digest for it (built or loaded locally, never pulled from or pushed to a registry)")

// RegistryRef returns the registry reference by digest to read the base
// image from: the repo digest in the repository the container was created
// from, else the first usable one. References to podman's local-only
// "localhost/" namespace are skipped. It wraps ErrNoRegistryDigest when there
// is none.
func (e *EngineImage) RegistryRef() (string, error) {
	var wantRepo string
	if ref, err := name.ParseReference(e.Name); err == nil {
		wantRepo = ref.Context().Name()
	}
	var first string
	for _, rd := range e.RepoDigests {
		d, err := name.NewDigest(rd)
		if err != nil || localOnly(rd) {
			continue
		}
		if d.Context().Name() == wantRepo {
			return d.String(), nil
		}
		if first == "" {
			first = d.String()
		}
	}
	if first != "" {
		return first, nil
	}
	what := e.Name
	if what == "" {
		what = e.ID
	} else if e.ID != "" {
		what += " (" + e.ID + ")"
	}
	return "", fmt.Errorf("image %s: %w", what, ErrNoRegistryDigest)
}

// localOnly reports whether ref names podman's local-only "localhost/"
// namespace (no registry behind it).
func localOnly(ref string) bool {
	return strings.HasPrefix(ref, "localhost/")
}

// ContainerdFromPID infers containerd's address and namespace from process
// pid when it is a containerd shim (see ParentContainerd); the environment
// overrides apply as there.
func ContainerdFromPID(pid int) (address, namespace string, ok bool) {
	args, _ := readCmdline(pid)
	return resolveContainerd(args, os.Getenv)
}

// ParentPID returns the parent pid of process pid (field 4 of /proc/pid/stat).
func ParentPID(pid int) (int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("parent of pid %d: %w", pid, err)
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("parent of pid %d: malformed stat", pid)
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 2 {
		return 0, fmt.Errorf("parent of pid %d: short stat", pid)
	}
	ppid, err := strconv.Atoi(f[1])
	if err != nil {
		return 0, fmt.Errorf("parent of pid %d: %w", pid, err)
	}
	return ppid, nil
}

// ProcessCmdline returns the arguments of process pid.
func ProcessCmdline(pid int) ([]string, error) { return readCmdline(pid) }
