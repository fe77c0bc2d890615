// Package snapshot defines the on-disk record of one snapshot: its directory
// layout and its state.json, shared by the shim (which creates it), the
// uploader (which advances it) and the CLI (which reads it).
package snapshot

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// Phase is where a snapshot is in its life.
type Phase string

// Phases in order. Failed and Done are final.
const (
	PhaseCapturing Phase = "capturing"
	PhaseCaptured  Phase = "captured"
	PhaseBuilding  Phase = "building"
	PhasePushing   Phase = "pushing"
	PhaseDone      Phase = "done"
	PhaseFailed    Phase = "failed"
)

// PhaseInterrupted is never written to state.json: readers derive it for a
// snapshot left in a non-final phase whose uploader is gone (killed, host
// rebooted). `seamless retry` continues such a snapshot.
const PhaseInterrupted Phase = "interrupted"

// Final reports whether no more progress will happen without intervention.
func (p Phase) Final() bool { return p == PhaseDone || p == PhaseFailed }

// Request is what a user asks for: where to push and how.
type Request struct {
	Target      string `json:"target"`
	PlainHTTP   bool   `json:"plain_http,omitempty"`
	Insecure    bool   `json:"insecure,omitempty"`
	Compression string `json:"compression,omitempty"`
	// Base, when set, is the registry reference of the container's base
	// image, used instead of what the container's engine reports.
	Base string `json:"base,omitempty"`
	// OCI asks for OCI media types even when the base image uses Docker
	// schema2 ones (zstd layers always get OCI media types).
	OCI bool `json:"oci,omitempty"`
	// RetryTimeout is how long transient registry errors are retried
	// (0: the uploader's default, 10 minutes).
	RetryTimeout Duration `json:"retry_timeout,omitempty"`
}

// Duration is a time.Duration written to JSON as a Go duration string
// ("10m0s"); a JSON number is read as seconds. Negative values are refused.
type Duration time.Duration

// MarshalJSON writes d as a duration string.
func (d Duration) MarshalJSON() ([]byte, error) {
	return json.Marshal(time.Duration(d).String())
}

// UnmarshalJSON reads a duration string ("90s", "10m") or a number of seconds.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		return fmt.Errorf("duration: %w", err)
	}
	var dur time.Duration
	switch v := v.(type) {
	case string:
		p, err := time.ParseDuration(v)
		if err != nil {
			return fmt.Errorf("duration %q: %w", v, err)
		}
		dur = p
	case float64:
		dur = time.Duration(v * float64(time.Second))
	default:
		return fmt.Errorf("duration: want a string like \"10m\" or a number of seconds, got %s", b)
	}
	if dur < 0 {
		return fmt.Errorf("duration %s: must not be negative", dur)
	}
	*d = Duration(dur)
	return nil
}

// Base names the image the container was started from.
type Base struct {
	// Ref is the image name as recorded by the engine (e.g. containerd's image name).
	Ref string `json:"ref,omitempty"`
	// Source is where the base's blobs are read from: "containerd" (its
	// content store) or "registry" (Ref is a registry reference).
	Source string `json:"source,omitempty"`
	// ContainerdAddress and ContainerdNamespace locate containerd's content store.
	ContainerdAddress   string `json:"containerd_address,omitempty"`
	ContainerdNamespace string `json:"containerd_namespace,omitempty"`
	// PlainHTTP and Insecure apply to a "registry" base: plain HTTP, or TLS
	// without verification.
	PlainHTTP bool `json:"plain_http,omitempty"`
	Insecure  bool `json:"insecure,omitempty"`
	// DiffIDs, when known, are the uncompressed layer digests the engine ran
	// the container on; a "registry" base must have exactly these layers.
	DiffIDs []string `json:"diff_ids,omitempty"`
}

// PauseTimes breaks the pause down into its parts, in microseconds.
type PauseTimes struct {
	// FreezeUS is the freeze wait: request to every task frozen.
	FreezeUS int64 `json:"freeze_us"`
	// TasksUS is listing the frozen tasks (part of CaptureUS).
	TasksUS int64 `json:"tasks_us,omitempty"`
	// DrainUS is reading the dirty tracker's queue while frozen (part of
	// CaptureUS).
	DrainUS int64 `json:"drain_us,omitempty"`
	// MmapScanUS is the scan of the tasks' shared writable mappings (part
	// of CaptureUS).
	MmapScanUS int64 `json:"mmap_scan_us,omitempty"`
	// RecaptureUS is copying the dirty entries and mapped files again (part
	// of CaptureUS).
	RecaptureUS int64 `json:"recapture_us,omitempty"`
	// CaptureUS is all the work done frozen, from every task frozen to the
	// thaw request: listing the tasks, the drain, the mmap scan and the
	// re-capture of the dirty entries (the whole capture when nothing was
	// pre-copied).
	CaptureUS int64 `json:"capture_us"`
	// ThawUS is the thaw request to thaw confirmed.
	ThawUS int64 `json:"thaw_us"`
	// FrozenAtMonoNS is CLOCK_MONOTONIC, in nanoseconds, when the freeze was
	// confirmed (CapturedAt on the wall clock): for lining the pause up with
	// other measurements on this host, which a step of the wall clock (a
	// resumed VM, settimeofday) would otherwise throw off.
	FrozenAtMonoNS int64 `json:"frozen_at_mono_ns,omitempty"`
}

// CaptureFigures describes how a capture was made.
type CaptureFigures struct {
	// Strategy is "precopy" (pre-copy + dirty re-capture) or "full" (everything in the pause).
	Strategy string `json:"strategy,omitempty"`
	// DataCopy is how file data was copied: "reflink", "copy" or "mixed".
	DataCopy string `json:"data_copy,omitempty"`
	// PrecopyMS is the time spent copying before the freeze.
	PrecopyMS int64 `json:"precopy_ms"`
	// PrecopyRounds counts pre-copy passes (the first full one included).
	PrecopyRounds int `json:"precopy_rounds,omitempty"`
	// DirtyEntries is how many paths were re-captured in the pause.
	DirtyEntries int `json:"dirty_entries"`
	// MappedFiles counts the upper files the frozen tasks mapped shared and
	// writable (copied again in every pause: stores through a mapping raise
	// no event); MappedHeld those of them copied through descriptors held
	// open since right before the freeze.
	MappedFiles int `json:"mapped_files,omitempty"`
	MappedHeld  int `json:"mapped_held,omitempty"`
	// Fallback is true when the dirty tracker could not be trusted (queue
	// overflow, tracker failure) and the pause rescanned everything.
	Fallback bool `json:"fallback"`
	// FallbackReason says why.
	FallbackReason string `json:"fallback_reason,omitempty"`
	// QuiesceWaitUS is how long the freeze was put off while a task of the
	// container was in an uninterruptible sleep (which would hold the
	// freeze, and so every other task, until it ended); QuiesceTimedOut
	// says the wait ran out and the freeze went ahead anyway.
	QuiesceWaitUS   int64 `json:"quiesce_wait_us,omitempty"`
	QuiesceTimedOut bool  `json:"quiesce_timed_out,omitempty"`
}

// UploadFigures describe the uploader's work, over all its runs.
type UploadFigures struct {
	// Runs counts uploader processes started for the snapshot (1 + retries).
	Runs int `json:"runs,omitempty"`
	// StartedAt is when the first uploader started; FinishedAt when the
	// snapshot reached done or failed.
	StartedAt  time.Time `json:"started_at,omitzero"`
	FinishedAt time.Time `json:"finished_at,omitzero"`
	// BuildMS and PushMS time the last run's build (or spool check) and push.
	BuildMS int64 `json:"build_ms,omitempty"`
	PushMS  int64 `json:"push_ms,omitempty"`
	// SpoolReused is true when the last run pushed a spool built by an
	// earlier one.
	SpoolReused bool `json:"spool_reused,omitempty"`
	// PushedBytes counts request body bytes sent to the registry (blobs
	// actually uploaded and manifests; blobs it already had cost nothing).
	PushedBytes int64 `json:"pushed_bytes,omitempty"`
	// Retries counts push attempts that failed with a transient error.
	Retries int `json:"retries,omitempty"`
}

// Progress counts bytes of the current phase.
type Progress struct {
	Done  int64 `json:"done"`
	Total int64 `json:"total"`
}

// State is the content of state.json.
type State struct {
	ID        string     `json:"id"`
	Container string     `json:"container"`
	Target    string     `json:"target"`
	Request   Request    `json:"request"`
	Base      Base       `json:"base"`
	Phase     Phase      `json:"state"`
	PauseUS   int64      `json:"pause_us"`
	Pause     PauseTimes `json:"pause"`
	Freezer   string     `json:"freezer,omitempty"`
	// Capture tells how the capture was made (pre-copy, dirty set, fallback).
	Capture     CaptureFigures `json:"capture"`
	CapturedAt  time.Time      `json:"captured_at"`
	Entries     int            `json:"entries"`
	Bytes       int64          `json:"bytes"`
	Progress    Progress       `json:"progress"`
	Digest      string         `json:"digest,omitempty"`
	LayerDigest string         `json:"layer_digest,omitempty"`
	// DiffID, LayerSize and LayerUncompressedSize describe the built layer
	// (the spool), recorded once it is complete so that a resumed upload
	// can check and reuse it.
	DiffID                string `json:"diff_id,omitempty"`
	LayerSize             int64  `json:"layer_size,omitempty"`
	LayerUncompressedSize int64  `json:"layer_uncompressed_size,omitempty"`
	PushedRef             string `json:"pushed_ref,omitempty"`
	Error                 string `json:"error,omitempty"`
	UploaderPID           int    `json:"uploader_pid,omitempty"`
	// UploaderStart is the uploader's start time (field 22 of
	// /proc/PID/stat, clock ticks after boot): with UploaderPID it tells a
	// live uploader from a recycled pid.
	UploaderStart uint64        `json:"uploader_start,omitempty"`
	Upload        UploadFigures `json:"upload,omitzero"`
	UpdatedAt     time.Time     `json:"updated_at"`
}

// File names inside a snapshot directory.
const (
	StateFile    = "state.json"
	ManifestFile = "manifest.json"
	DataDir      = "data"
	LayerFile    = "layer.tar.gz"
	LogFile      = "upload.log"
)

// Store is a directory of snapshot directories.
type Store struct {
	Root string
}

// NewID returns a fresh snapshot id: a UTC timestamp and random suffix, sortable by time.
func NewID(now time.Time) (string, error) {
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("new snapshot id: %w", err)
	}
	return now.UTC().Format("20060102t150405") + "-" + hex.EncodeToString(b[:]), nil
}

// ValidID reports whether id can name a snapshot directory.
func ValidID(id string) bool {
	if id == "" || len(id) > 128 || id == "." || id == ".." {
		return false
	}
	for _, r := range id {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.') {
			return false
		}
	}
	return true
}

// Dir is the directory of snapshot id.
func (s Store) Dir(id string) string { return filepath.Join(s.Root, id) }

// Create makes the directory of a new snapshot (and its data dir).
func (s Store) Create(id string) (string, error) {
	if !ValidID(id) {
		return "", fmt.Errorf("create snapshot: invalid id %q", id)
	}
	dir := s.Dir(id)
	if err := os.MkdirAll(s.Root, 0o700); err != nil {
		return "", fmt.Errorf("create snapshot store %s: %w", s.Root, err)
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		return "", fmt.Errorf("create snapshot %s: %w", id, err)
	}
	return dir, nil
}

// Save writes st to its state.json atomically (temp file, fsync, rename).
func (s Store) Save(st *State) error {
	st.UpdatedAt = time.Now().UTC()
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("encode state of %s: %w", st.ID, err)
	}
	if err := WriteFileAtomic(filepath.Join(s.Dir(st.ID), StateFile), append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("save state of %s: %w", st.ID, err)
	}
	return nil
}

// Load reads the state of snapshot id.
func (s Store) Load(id string) (*State, error) {
	if !ValidID(id) {
		return nil, fmt.Errorf("load snapshot: invalid id %q", id)
	}
	b, err := os.ReadFile(filepath.Join(s.Dir(id), StateFile))
	if err != nil {
		return nil, fmt.Errorf("load snapshot %s: %w", id, err)
	}
	var st State
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("decode state of %s: %w", id, err)
	}
	return &st, nil
}

// List returns every snapshot's state, oldest first. Directories without a
// readable state are skipped.
func (s Store) List() ([]*State, error) {
	ents, err := os.ReadDir(s.Root)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list snapshots in %s: %w", s.Root, err)
	}
	var out []*State
	for _, e := range ents {
		if !e.IsDir() || !ValidID(e.Name()) {
			continue
		}
		st, err := s.Load(e.Name())
		if err != nil {
			continue
		}
		out = append(out, st)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

// Resolve finds the snapshot whose id is id or starts with id.
func (s Store) Resolve(id string) (*State, error) {
	if st, err := s.Load(id); err == nil {
		return st, nil
	}
	all, err := s.List()
	if err != nil {
		return nil, err
	}
	var found []*State
	for _, st := range all {
		if strings.HasPrefix(st.ID, id) {
			found = append(found, st)
		}
	}
	switch len(found) {
	case 0:
		return nil, fmt.Errorf("no snapshot %q in %s", id, s.Root)
	case 1:
		return found[0], nil
	}
	ids := make([]string, len(found))
	for i, st := range found {
		ids[i] = st.ID
	}
	return nil, fmt.Errorf("snapshot id %q is ambiguous: %s", id, strings.Join(ids, ", "))
}

// WriteFileAtomic writes data to path through a synced temp file and a rename.
func WriteFileAtomic(path string, data []byte, perm os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(perm); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}
