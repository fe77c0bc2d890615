// Package config resolves the directories every seamless role shares: where
// snapshots are kept (state dir) and where per-container shims listen (run dir).
package config

import (
	"os"
	"path/filepath"
)

const (
	// DefaultStateDir holds snapshot data: <state>/snapshots/<id>/.
	DefaultStateDir = "/var/lib/seamless"
	// DefaultRunDir holds the shims' control sockets and info files.
	DefaultRunDir = "/run/seamless"

	// EnvStateDir overrides DefaultStateDir.
	EnvStateDir = "SEAMLESS_STATE_DIR"
	// EnvRunDir overrides DefaultRunDir.
	EnvRunDir = "SEAMLESS_RUN_DIR"
)

// Dirs are the two directories shared by the CLI, shims and uploaders.
type Dirs struct {
	State string
	Run   string
}

// FromEnv returns the directories from the environment, falling back to the defaults.
func FromEnv() Dirs {
	return Dirs{
		State: envOr(EnvStateDir, DefaultStateDir),
		Run:   envOr(EnvRunDir, DefaultRunDir),
	}
}

// SnapshotsDir is the directory holding one sub-directory per snapshot.
func (d Dirs) SnapshotsDir() string { return filepath.Join(d.State, "snapshots") }

// Socket is the control socket of the shim of container id.
func (d Dirs) Socket(id string) string { return filepath.Join(d.Run, id+".sock") }

// ShimInfo is the JSON file a shim writes next to its socket.
func (d Dirs) ShimInfo(id string) string { return filepath.Join(d.Run, id+".json") }

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}
