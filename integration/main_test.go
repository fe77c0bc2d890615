// Package integration runs seamless end to end on real containerd, runc,
// overlayfs, cgroups and a real registry.
package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/seamless-snapshot/seamless/config"
	"github.com/seamless-snapshot/seamless/integration/testenv"
	"github.com/seamless-snapshot/seamless/snapshot"
)

// suite is the environment shared by the tests of this package: one
// containerd whose runc v2 shims see the seamless directories, one registry,
// one base image.
type suite struct {
	dir   string
	bin   string
	dirs  config.Dirs
	ctd   *testenv.Containerd
	reg   *testenv.Registry
	image *testenv.BuiltImage
}

var env *suite

// baseImageName is the image every test container starts from.
const baseImageName = "localhost/seamless-test:1.0"

func TestMain(m *testing.M) {
	flag.Parse()
	if testing.Short() {
		fmt.Println("integration: skipped in -short mode")
		os.Exit(0)
	}
	if err := testenv.Prereqs(); err != nil {
		fmt.Fprintf(os.Stderr, "integration: prerequisites missing (run 'make deps' as root): %v\n", err)
		os.Exit(1)
	}
	// Tear down instances left by an earlier run that was killed.
	if cleaned, err := testenv.CleanStale(""); err != nil {
		fmt.Fprintf(os.Stderr, "integration: clean stale instances: %v\n", err)
	} else if len(cleaned) > 0 {
		fmt.Fprintf(os.Stderr, "integration: cleaned stale instances: %v\n", cleaned)
	}
	s, err := setup()
	if err != nil {
		fmt.Fprintf(os.Stderr, "integration: setup: %v\n", err)
		if s != nil {
			s.close()
		}
		os.Exit(1)
	}
	env = s
	code := m.Run()
	if err := s.close(); err != nil {
		fmt.Fprintf(os.Stderr, "integration: teardown: %v\n", err)
		code = 1
	}
	os.Exit(code)
}

func setup() (*suite, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	dir, err := os.MkdirTemp("", "sl-it-")
	if err != nil {
		return nil, err
	}
	s := &suite{dir: dir, bin: filepath.Join(dir, "bin")}
	s.dirs = config.Dirs{State: filepath.Join(dir, "state"), Run: filepath.Join(dir, "run")}
	if err := buildBinaries(ctx, s.bin); err != nil {
		return s, err
	}
	s.ctd, err = testenv.StartContainerd(ctx, testenv.ContainerdOptions{Env: []string{
		config.EnvStateDir + "=" + s.dirs.State,
		config.EnvRunDir + "=" + s.dirs.Run,
	}})
	if err != nil {
		return s, err
	}
	s.reg, err = testenv.StartRegistry(ctx, testenv.RegistryOptions{})
	if err != nil {
		return s, err
	}
	s.image, err = testenv.BuildImage(ctx, dir, baseImageName, map[string]testenv.FileSpec{
		"/usr/bin/testbin": {Mode: 0o755, Source: filepath.Join(s.bin, "testbin")},
	})
	if err != nil {
		return s, err
	}
	if err := s.ctd.ImportImage(ctx, s.image.Archive); err != nil {
		return s, err
	}
	return s, nil
}

// buildBinaries builds the seamless binaries (static) into dir.
func buildBinaries(ctx context.Context, dir string) error {
	cmd := exec.CommandContext(ctx, "go", "build", "-o", dir+"/", "../cmd/seamless", "../cmd/seamless-runc", "../cmd/seamless-hook", "./testbin")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build: %v\n%s", err, out)
	}
	return nil
}

// close tears everything down and reports what the tests left behind.
func (s *suite) close() error {
	var problems []string
	if s.ctd != nil {
		if err := testenv.CheckNoFrozenCgroups(s.ctd.CgroupParent); err != nil {
			problems = append(problems, err.Error())
		}
	}
	for _, pid := range testenv.ProcessesOf(s.bin) {
		problems = append(problems, fmt.Sprintf("process %d (%s) left running", pid, cmdline(pid)))
		if p, err := os.FindProcess(pid); err == nil {
			p.Kill()
		}
	}
	if s.reg != nil {
		s.reg.Close()
	}
	if s.ctd != nil {
		if err := s.ctd.Close(); err != nil {
			problems = append(problems, "close containerd: "+err.Error())
		}
	}
	if mounts, _ := testenv.MountsUnder(s.dir); len(mounts) > 0 {
		problems = append(problems, fmt.Sprintf("mounts left under %s: %v", s.dir, mounts))
	}
	os.RemoveAll(s.dir)
	if len(problems) > 0 {
		return fmt.Errorf("%s", strings.Join(problems, "; "))
	}
	return nil
}

func cmdline(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	s := strings.ReplaceAll(string(bytes.TrimRight(b, "\x00")), "\x00", " ")
	if len(s) > 120 {
		s = s[:120] + "..."
	}
	return s
}

// cliResult is one run of the seamless CLI.
type cliResult struct {
	code           int
	stdout, stderr string
}

// seamless runs the CLI against the suite's directories.
func seamless(t *testing.T, args ...string) cliResult {
	t.Helper()
	return seamlessEnv(t, nil, args...)
}

// seamlessEnv runs the CLI with extra environment variables (which reach
// the uploaders it starts).
func seamlessEnv(t *testing.T, extraEnv []string, args ...string) cliResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(env.bin, "seamless"), args...)
	cmd.Env = append(append(os.Environ(), config.EnvStateDir+"="+env.dirs.State, config.EnvRunDir+"="+env.dirs.Run), extraEnv...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			t.Fatalf("seamless %v: %v", args, err)
		}
		code = ee.ExitCode()
	}
	t.Logf("$ seamless %s\n%s%s(exit %d)", strings.Join(args, " "), out.String(), errb.String(), code)
	return cliResult{code: code, stdout: out.String(), stderr: errb.String()}
}

// startContainer runs a long-lived busybox container through seamless-runc
// and removes it at the end of the test, checking its shim went away.
func startContainer(t *testing.T, id string, annotations map[string]string) {
	t.Helper()
	testenv.RunT(t, env.ctd, testenv.RunOptions{
		ID: id, Image: baseImageName, RuncBinary: filepath.Join(env.bin, "seamless-runc"),
		Annotations: annotations,
		Args:        []string{"sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"},
	})
	socket := env.dirs.Socket(id)
	if _, err := os.Stat(socket); err != nil {
		t.Fatalf("no shim socket for %s after start: %v\nshim log: %s", id, err, readFile(filepath.Join(env.dirs.Run, id+".log")))
	}
}

// removeContainer removes a container now and checks that its shim exited
// and its socket is gone.
func removeContainer(t *testing.T, id string) {
	t.Helper()
	pid := shimPID(t, id)
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	if err := env.ctd.Remove(ctx, id); err != nil {
		t.Fatalf("remove %s: %v", id, err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for testenv.ProcessAlive(pid) && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if testenv.ProcessAlive(pid) {
		t.Errorf("shim %d of %s still running after the container was removed", pid, id)
	}
	if _, err := os.Stat(env.dirs.Socket(id)); err == nil {
		t.Errorf("socket of %s left behind", id)
	}
}

func shimPID(t *testing.T, id string) int {
	t.Helper()
	b, err := os.ReadFile(env.dirs.ShimInfo(id))
	if err != nil {
		t.Fatalf("shim info of %s: %v", id, err)
	}
	var info struct {
		ShimPID int `json:"shim_pid"`
	}
	if err := json.Unmarshal(b, &info); err != nil {
		t.Fatal(err)
	}
	return info.ShimPID
}

func exec1(t *testing.T, id, script string) string {
	t.Helper()
	out, err := env.ctd.Exec(t.Context(), id, "sh", "-c", script)
	if err != nil {
		t.Fatalf("exec in %s: %v\n%s", id, err, out)
	}
	return string(out)
}

// runImage pulls ref and runs script in a fresh container from it (plain
// runc), returning its output.
func runImage(t *testing.T, ref, id, script string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	if err := env.ctd.Pull(ctx, ref, true); err != nil {
		t.Fatalf("pull %s: %v", ref, err)
	}
	out, err := env.ctd.Ctr(ctx, "run", "--rm", "--runc-root", env.ctd.RuncRoot, "--fifo-dir", env.ctd.FifoDir,
		"--cgroup", env.ctd.CgroupParent+"/"+id, ref, id, "sh", "-c", script)
	if err != nil {
		t.Fatalf("run %s: %v\n%s", ref, err, out)
	}
	return string(out)
}

func loadState(t *testing.T, id string) *snapshot.State {
	t.Helper()
	st, err := snapshot.Store{Root: env.dirs.SnapshotsDir()}.Load(id)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func readFile(path string) string {
	b, _ := os.ReadFile(path)
	return string(b)
}

// assertThawedAndRunning checks that the container is not frozen and still
// executes commands.
func assertThawedAndRunning(t *testing.T, id string) {
	t.Helper()
	frozen, err := env.ctd.Frozen(id)
	if err != nil || frozen {
		t.Fatalf("container %s frozen=%v err=%v after snapshot", id, frozen, err)
	}
	if out := exec1(t, id, "echo alive"); strings.TrimSpace(out) != "alive" {
		t.Fatalf("container %s does not answer: %q", id, out)
	}
}
