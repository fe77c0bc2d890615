package uploader

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/seamless-snapshot/seamless/snapshot"
)

// Collected is a snapshot directory removed by Collect (or that would be,
// in a dry run).
type Collected struct {
	ID        string         `json:"id"`
	Phase     snapshot.Phase `json:"state"`
	UpdatedAt time.Time      `json:"updated_at"`
	// Bytes is the size of its files.
	Bytes int64 `json:"bytes"`
}

// Collect removes the directories of the snapshots of store that are done,
// failed or interrupted and whose state was last updated before cutoff.
// A snapshot whose uploader holds the upload lock is never removed, nor one
// still being captured. With dryRun nothing is removed.
func Collect(store snapshot.Store, cutoff time.Time, dryRun bool) ([]Collected, error) {
	all, err := store.List()
	if err != nil {
		return nil, err
	}
	var out []Collected
	var errs []error
	for _, st := range all {
		phase := st.Phase
		if Interrupted(st) {
			phase = snapshot.PhaseInterrupted
		}
		if (!phase.Final() && phase != snapshot.PhaseInterrupted) || !st.UpdatedAt.Before(cutoff) {
			continue
		}
		c, err := collectOne(store.Dir(st.ID), dryRun)
		if errors.Is(err, ErrRunning) {
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("snapshot %s: %w", st.ID, err))
			continue
		}
		c.ID, c.Phase, c.UpdatedAt = st.ID, phase, st.UpdatedAt
		out = append(out, c)
	}
	return out, errors.Join(errs...)
}

// collectOne removes dir while holding its upload lock.
func collectOne(dir string, dryRun bool) (Collected, error) {
	lock, err := lockDir(dir)
	if err != nil {
		return Collected{}, err
	}
	defer lock.Close()
	c := Collected{Bytes: diskUsage(dir)}
	if dryRun {
		return c, nil
	}
	if err := os.RemoveAll(dir); err != nil {
		return Collected{}, fmt.Errorf("remove: %w", err)
	}
	return c, nil
}

// diskUsage adds up the sizes of the regular files under dir.
func diskUsage(dir string) int64 {
	var n int64
	filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error { //nolint:errcheck // best effort
		if err != nil {
			return nil
		}
		if fi, err := d.Info(); err == nil && fi.Mode().IsRegular() {
			n += fi.Size()
		}
		return nil
	})
	return n
}
