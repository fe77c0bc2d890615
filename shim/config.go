// Package shim is the per-container process that takes snapshot requests
// (control socket, SIGUSR1), freezes the container, captures its upper dir,
// thaws it and hands the capture to a detached uploader.
package shim

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"
)

// Config is everything a shim knows of its container. The wrapper or the OCI
// hook fills it in and passes it to the shim process as JSON.
type Config struct {
	ContainerID string `json:"container_id"`
	Bundle      string `json:"bundle"`
	// RuncRoot is runc's state root, when started by the wrapper.
	RuncRoot string `json:"runc_root,omitempty"`
	InitPID  int    `json:"init_pid"`
	// InitStart is the init process's start time (field 22 of /proc/pid/stat),
	// to tell it apart from a later process reusing its pid.
	InitStart uint64 `json:"init_start,omitempty"`
	// Rootfs is the container's root mount point on the host (the overlay).
	Rootfs string `json:"rootfs"`
	// CgroupPaths are runc's cgroup_paths: controller -> absolute directory, "" = unified.
	CgroupPaths map[string]string `json:"cgroup_paths"`
	// Freezer forces "v1" or "v2"; empty picks what runc uses.
	Freezer     string            `json:"freezer,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
	// Engine is the container engine that runs the container and knows its
	// base image: "containerd", "cri", "docker" or "podman" (see base.go).
	Engine              string `json:"engine,omitempty"`
	ContainerdAddress   string `json:"containerd_address,omitempty"`
	ContainerdNamespace string `json:"containerd_namespace,omitempty"`
	// Image is the image the container was started from as its engine names
	// it, when known at start (shown by `seamless list`).
	Image string `json:"image,omitempty"`
	// DockerHost is the Docker API socket (engine "docker").
	DockerHost string `json:"docker_host,omitempty"`
	// PodmanContainersDir is podman's <graphroot>/<driver>-containers
	// directory in containers/storage (engine "podman").
	PodmanContainersDir string `json:"podman_containers_dir,omitempty"`
	StateDir            string `json:"state_dir"`
	RunDir              string `json:"run_dir"`
}

// Annotations read by the shim.
const (
	// AnnotationTarget is the target reference of a SIGUSR1 snapshot; it may
	// contain {{.Time}} (UTC, 20060102-150405) and {{.Container}}.
	AnnotationTarget = "io.seamless.snapshot.target"
	// AnnotationPlainHTTP ("true") makes SIGUSR1 snapshots push over plain HTTP.
	AnnotationPlainHTTP = "io.seamless.snapshot.plain-http"
	// AnnotationInsecure ("true") skips TLS verification for SIGUSR1 snapshots.
	AnnotationInsecure = "io.seamless.snapshot.insecure"
	// AnnotationFreezer ("v1" or "v2") picks the freezer on hybrid hosts.
	AnnotationFreezer = "io.seamless.freezer"
	// AnnotationTestPauseDelay (milliseconds, at most 2000) lengthens every
	// pause of this container; tests use it to hold a capture in progress.
	AnnotationTestPauseDelay = "io.seamless.test.pause-delay-ms"
)

// maxTestPauseDelay caps AnnotationTestPauseDelay.
const maxTestPauseDelay = 2 * time.Second

// testPauseDelay reads AnnotationTestPauseDelay.
func (c *Config) testPauseDelay() time.Duration {
	ms, err := strconv.Atoi(c.Annotations[AnnotationTestPauseDelay])
	if err != nil || ms <= 0 {
		return 0
	}
	return min(time.Duration(ms)*time.Millisecond, maxTestPauseDelay)
}

// Validate checks that the config names a container that can be snapshotted.
func (c *Config) Validate() error {
	var errs []error
	if c.ContainerID == "" {
		errs = append(errs, errors.New("no container id"))
	}
	if c.InitPID <= 0 {
		errs = append(errs, errors.New("no init pid"))
	}
	if c.Rootfs == "" {
		errs = append(errs, errors.New("no rootfs"))
	}
	if len(c.CgroupPaths) == 0 {
		errs = append(errs, errors.New("no cgroup paths"))
	}
	if c.StateDir == "" || c.RunDir == "" {
		errs = append(errs, errors.New("no state or run dir"))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("shim config for %q: %w", c.ContainerID, err)
	}
	return nil
}

// Encode returns the config as the shim's command-line argument.
func (c *Config) Encode() (string, error) {
	b, err := json.Marshal(c)
	if err != nil {
		return "", fmt.Errorf("encode shim config: %w", err)
	}
	return string(b), nil
}

// DecodeConfig parses a config made by Encode.
func DecodeConfig(s string) (*Config, error) {
	var c Config
	if err := json.Unmarshal([]byte(s), &c); err != nil {
		return nil, fmt.Errorf("decode shim config: %w", err)
	}
	return &c, nil
}

// Info is what GET /v1/info answers and what the shim writes to
// <run-dir>/<container-id>.json for `seamless list`.
type Info struct {
	ContainerID string `json:"container_id"`
	ShimPID     int    `json:"shim_pid"`
	InitPID     int    `json:"init_pid"`
	Cgroup      string `json:"cgroup"`
	Freezer     string `json:"freezer"`
	Upperdir    string `json:"upperdir"`
	Bundle      string `json:"bundle"`
	Engine      string `json:"engine,omitempty"`
	Namespace   string `json:"namespace,omitempty"`
	Image       string `json:"image,omitempty"`
	Socket      string `json:"socket"`
	StartedAt   string `json:"started_at"`
}
