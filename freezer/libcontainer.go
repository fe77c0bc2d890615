package freezer

import (
	"fmt"
	"time"

	"github.com/opencontainers/cgroups"
	"github.com/opencontainers/cgroups/fs"
	"github.com/opencontainers/cgroups/fs2"
)

// LibcontainerFreezeThaw freezes and thaws the cgroup dir once through the
// cgroup managers runc uses (github.com/opencontainers/cgroups: fs for v1,
// fs2 for v2), timing each Freeze call. It is the baseline our Freezer is
// measured against, never the hot path. Building the manager is not timed.
func LibcontainerFreezeThaw(kind Kind, dir string) (freeze, thaw time.Duration, err error) {
	m, err := libcontainerManager(kind, dir)
	if err != nil {
		return 0, 0, err
	}
	start := time.Now()
	if err := m.Freeze(cgroups.Frozen); err != nil {
		return time.Since(start), 0, fmt.Errorf("libcontainer freeze %s: %w", dir, err)
	}
	frozen := time.Now()
	if err := m.Freeze(cgroups.Thawed); err != nil {
		return frozen.Sub(start), time.Since(frozen), fmt.Errorf("libcontainer thaw %s: %w", dir, err)
	}
	return frozen.Sub(start), time.Since(frozen), nil
}

// freezeManager is the part of a libcontainer cgroup manager used here.
type freezeManager interface {
	Freeze(state cgroups.FreezerState) error
}

func libcontainerManager(kind Kind, dir string) (freezeManager, error) {
	cg := &cgroups.Cgroup{Resources: &cgroups.Resources{}}
	var (
		m   freezeManager
		err error
	)
	switch kind {
	case V1:
		m, err = fs.NewManager(cg, map[string]string{"freezer": dir})
	case V2:
		m, err = fs2.NewManager(cg, dir)
	default:
		return nil, fmt.Errorf("libcontainer freezer %s: unknown kind %q", dir, kind)
	}
	if err != nil {
		return nil, fmt.Errorf("libcontainer %s manager for %s: %w", kind, dir, err)
	}
	return m, nil
}
