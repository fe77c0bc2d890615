package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seamless-snapshot/seamless/freezer"
	"github.com/seamless-snapshot/seamless/integration/bench/contract"
	"github.com/seamless-snapshot/seamless/integration/testenv"
	"github.com/seamless-snapshot/seamless/overlay"
)

// Paths inside a bench container.
const (
	dataDir   = "/bench/data" // testbin fill's files
	writerDir = "/bench/w"    // testbin writer's files
)

// freezeTimeout bounds the bench's own freezes (strategies 2–5).
const freezeTimeout = 2 * time.Second

// container is one running bench container: started through seamless-runc
// (so it has a shim), with the probe running inside once startProbe is done.
type container struct {
	env       *Env
	id        string
	initPID   int
	paths     map[string]string // runc's cgroup_paths
	upper     string
	userXattr bool
	fr        *freezer.Freezer // the freezer runc (and the shim) use
	probe     *probeTracker
	writing   bool          // the consistency writer runs
	paused    time.Duration // sum of the pauses of the snapshots taken
	execSeq   atomic.Int64
}

var containerSeq atomic.Int64

// startContainer runs a container whose init sleeps, and waits for its shim.
func startContainer(ctx context.Context, env *Env, name string) (*container, error) {
	// Lower case: the id is also a repository name in the snapshot targets.
	id := strings.ToLower(fmt.Sprintf("bench-%s-%d-%d", name, os.Getpid()%100000, containerSeq.Add(1)))
	err := env.Ctd.Run(ctx, testenv.RunOptions{
		ID: id, Image: imageName, RuncBinary: filepath.Join(env.Bin, "seamless-runc"),
		Args: []string{"sleep", "2000000000"},
	})
	if err != nil {
		return nil, err
	}
	c := &container{env: env, id: id}
	if err := c.inspect(ctx); err != nil {
		return nil, errors.Join(err, c.close())
	}
	return c, nil
}

// inspect finds the shim, the cgroups, the upper dir and opens the freezer.
func (c *container) inspect(ctx context.Context) error {
	sock := c.env.Dirs.Socket(c.id)
	err := waitFor(ctx, 15*time.Second, 20*time.Millisecond, func() (bool, error) {
		_, err := os.Stat(sock)
		return err == nil, nil
	})
	if err != nil {
		return fmt.Errorf("no shim socket %s: %w", sock, err)
	}
	st, err := c.env.Ctd.RuncState(c.id)
	if err != nil {
		return err
	}
	c.initPID, c.paths = st.InitPID, st.CgroupPaths
	mnt, err := overlay.FindMount("/proc/self/mountinfo", filepath.Join(c.env.Ctd.Bundle(c.id), "rootfs"))
	if err != nil {
		return err
	}
	if err := mnt.CheckCapturable(); err != nil {
		return err
	}
	c.upper, c.userXattr = mnt.Upperdir, mnt.UserXattr()
	c.fr, err = freezer.FromCgroupPaths(c.paths, "")
	if err != nil {
		return fmt.Errorf("freezer of %s: %w", c.id, err)
	}
	return nil
}

// upperPath is the host path, in the upper dir, of an absolute path in the
// container.
func (c *container) upperPath(p string) string { return filepath.Join(c.upper, p) }

// upperRel is a container path relative to the upper dir (manifest paths).
func upperRel(p string) string { return path.Clean(p)[1:] }

// exec runs args in the container and waits for it.
func (c *container) exec(ctx context.Context, args ...string) error {
	if out, err := c.env.Ctd.Exec(ctx, c.id, args...); err != nil {
		return fmt.Errorf("%w\n%s", err, out)
	}
	return nil
}

// execDetached starts args in the container without waiting; its output
// goes to <logdir>/<id>-<name>.log. env is prepended as VAR=value words.
func (c *container) execDetached(ctx context.Context, name, env string, args ...string) error {
	frozen, err := c.env.Ctd.Frozen(c.id)
	if err != nil || frozen {
		return fmt.Errorf("exec %s in %s: frozen=%v %v", name, c.id, frozen, err)
	}
	script := "exec " + shellQuote(args...)
	if env != "" {
		script = env + " " + script
	}
	log := filepath.Join(c.env.Ctd.LogDir, c.id+"-"+name+".log")
	_, err = c.env.Ctd.Ctr(ctx, "task", "exec", "--detach",
		"--exec-id", fmt.Sprintf("%s-%d", name, c.execSeq.Add(1)), "--log-uri", "file://"+log,
		c.id, "sh", "-c", script)
	return err
}

func shellQuote(args ...string) string {
	s := ""
	for i, a := range args {
		if i > 0 {
			s += " "
		}
		s += strconv.Quote(a)
	}
	return s
}

// fill creates the scenario's files in the upper dir (through the
// container) and writes them back, so no writeback of the fill runs during
// the measurements.
func (c *container) fill(ctx context.Context, files int, size int64) error {
	err := c.exec(ctx, "testbin", "fill", "--dir", dataDir, "--files", strconv.Itoa(files), "--size", strconv.FormatInt(size, 10))
	if err != nil {
		return fmt.Errorf("fill %s: %w", c.id, err)
	}
	return syncFS(c.upper)
}

func syncFS(dir string) error {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("syncfs %s: %w", dir, err)
	}
	defer unix.Close(fd)
	if err := unix.Syncfs(fd); err != nil {
		return fmt.Errorf("syncfs %s: %w", dir, err)
	}
	return nil
}

// startProbe starts testbin probe in the container and opens its ring.
func (c *container) startProbe(ctx context.Context) error {
	err := c.execDetached(ctx, "probe", "GODEBUG=asyncpreemptoff=1",
		"testbin", "probe", "--out", contract.DefaultProbeFile, "--min-gap", c.env.Opts.MinGap.String())
	if err != nil {
		return fmt.Errorf("start probe: %w", err)
	}
	ringPath := fmt.Sprintf("/proc/%d/root%s", c.initPID, contract.DefaultProbeFile)
	var ring *contract.RingReader
	err = waitFor(ctx, 15*time.Second, 20*time.Millisecond, func() (bool, error) {
		var err error
		ring, err = contract.OpenRing(ringPath)
		return err == nil && ring.Heartbeat() > 0, nil
	})
	if err != nil {
		return fmt.Errorf("probe ring %s never appeared: %w", ringPath, err)
	}
	c.probe = &probeTracker{ring: ring, clock: c.env.Clock, threshold: ring.Threshold()}
	return ring.WaitBeat(c.env.Clock, c.env.Clock.Now(), 5*time.Second)
}

// startWriter starts the consistency writer and waits until it ticks.
func (c *container) startWriter(ctx context.Context) error {
	err := c.execDetached(ctx, "writer", "", "testbin", "writer", "--dir", writerDir, "--rate", strconv.Itoa(c.env.Opts.WriterRate))
	if err != nil {
		return fmt.Errorf("start writer: %w", err)
	}
	var first uint64
	err = waitFor(ctx, 15*time.Second, 20*time.Millisecond, func() (bool, error) {
		k := c.writerCounter()
		if first == 0 {
			first = k
		}
		return k > 0 && k > first+1, nil
	})
	if err != nil {
		return fmt.Errorf("writer does not tick (see %s): %w", c.env.Ctd.LogDir, err)
	}
	c.writing = true
	return syncFS(c.upper)
}

// writerCounter reads the writer's counter (file A) from the upper dir; 0
// when there is none yet.
func (c *container) writerCounter() uint64 {
	b, err := os.ReadFile(c.upperPath(path.Join(writerDir, contract.FileA)))
	if err != nil {
		return 0
	}
	k, _ := contract.ParseCounter(b)
	return k
}

// captureOpts are the overlay.Capture options for this container's upper.
func (c *container) captureOpts() overlay.CaptureOptions {
	return overlay.CaptureOptions{UserXattr: c.userXattr}
}

// close removes the container (testenv thaws it first if needed).
func (c *container) close() error {
	var errs []error
	if c.probe != nil {
		if c.probe.lost > 0 {
			logf("  warning: %s: the probe's ring overflowed, %d gaps lost (raise --probe-min-gap?)", c.id, c.probe.lost)
		}
		errs = append(errs, c.probe.ring.Close())
	}
	if c.fr != nil {
		errs = append(errs, c.fr.Close())
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	errs = append(errs, c.env.Ctd.Remove(ctx, c.id))
	return errors.Join(errs...)
}
