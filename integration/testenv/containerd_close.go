package testenv

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Close tears the instance down: it removes every container (thawing frozen
// ones first), stops containerd by PID, kills leftover shims of this
// instance, kills any process left in CgroupParent, removes this instance's
// shim sockets, unmounts everything under Dir, removes the cgroups under
// CgroupParent and deletes Dir. It keeps going after errors and returns them
// joined. Later calls return the first call's result.
func (c *Containerd) Close() error {
	c.closeOnce.Do(func() {
		c.closed.Store(true)
		c.closeErr = c.close()
	})
	return c.closeErr
}

func (c *Containerd) close() error {
	var errs []error
	add := func(step string, err error) {
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", step, err))
		}
	}
	sockets := c.shimSockets()
	if c.daemonAlive() {
		add("remove containers", c.removeAllContainers())
	}
	add("stop containerd", c.stopDaemon())
	if c.CgroupParent != "" {
		add("kill cgroup processes", killCgroup(c.CgroupParent))
	}
	add("kill shims", c.killShims())
	add("remove shim sockets", removeSockets(sockets))
	add("unmount", unmountUnder(c.Dir))
	if c.CgroupParent != "" {
		add("remove cgroups", removeCgroupTree(c.CgroupParent))
	}
	add("remove shim run dirs", removeRunDirs(c.runDirsCreated))
	if left, err := MountsUnder(c.Dir); err != nil || len(left) > 0 {
		add("remove dir", fmt.Errorf("not removing %s: mounts left %v (%v)", c.Dir, left, err))
	} else {
		add("remove dir", os.RemoveAll(c.Dir))
	}
	return errors.Join(errs...)
}

// daemonAlive reports whether this instance's containerd still runs.
func (c *Containerd) daemonAlive() bool {
	if c.d != nil {
		return !c.d.exited()
	}
	return sameProcess(c.PID, c.pidStart)
}

// stopDaemon stops containerd: through the child handle when we started it
// in this process, else by recorded PID and start time.
func (c *Containerd) stopDaemon() error {
	if c.d != nil {
		return c.d.stop(10 * time.Second)
	}
	return stopRecordedPID(c.PID, c.pidStart, 10*time.Second)
}

// removeAllContainers removes every container of every namespace.
func (c *Containerd) removeAllContainers() error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var errs []error
	if c.CgroupParent != "" {
		// Thaw everything first so SIGKILL can take effect.
		errs = append(errs, ThawCgroups(c.CgroupParent))
	}
	out, err := c.ctrNS(ctx, c.Namespace, "namespaces", "ls", "-q")
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	for _, ns := range strings.Fields(string(out)) {
		ids, err := c.ctrNS(ctx, ns, "containers", "ls", "-q")
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, id := range strings.Fields(string(ids)) {
			errs = append(errs, c.removeIn(ctx, ns, id))
		}
	}
	return errors.Join(errs...)
}

// killShims SIGKILLs the shims still serving this containerd's socket.
func (c *Containerd) killShims() error {
	pids, err := ShimPIDs(c.Address)
	if err != nil || len(pids) == 0 {
		return err
	}
	return killPIDs(pids)
}

// ShimPIDs returns the PIDs of this instance's runc v2 shims.
func (c *Containerd) ShimPIDs() ([]int, error) { return ShimPIDs(c.Address) }

// shimSockets lists the shim sockets recorded in this instance's bundles
// ("address" holds unix:///run/containerd/s/<hash>).
func (c *Containerd) shimSockets() []string {
	files, _ := filepath.Glob(filepath.Join(c.State, "io.containerd.runtime.v2.task", "*", "*", "address"))
	var out []string
	for _, f := range files {
		raw, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		addr := strings.TrimSpace(string(raw))
		if p, ok := strings.CutPrefix(addr, "unix://"); ok && filepath.IsAbs(p) {
			out = append(out, p)
		}
	}
	return out
}

// ShimSockets lists the shim sockets of this instance's current bundles.
func (c *Containerd) ShimSockets() []string { return c.shimSockets() }

// removeSockets removes the given paths if they are still unix sockets.
func removeSockets(paths []string) error {
	var errs []error
	for _, p := range paths {
		fi, err := os.Lstat(p)
		if err != nil || fi.Mode()&fs.ModeSocket == 0 {
			continue
		}
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
