package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"os"
	"strings"
	"testing"

	"github.com/seamless-snapshot/seamless/config"
	"github.com/seamless-snapshot/seamless/shim"
	"github.com/seamless-snapshot/seamless/snapshot"
)

// fakeShims registers listening sockets and info files for ids, as live shims do.
func fakeShims(t *testing.T, ids ...string) config.Dirs {
	t.Helper()
	dirs := config.Dirs{State: t.TempDir(), Run: t.TempDir()}
	for _, id := range ids {
		l, err := net.Listen("unix", dirs.Socket(id))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		b, _ := json.Marshal(shim.Info{ContainerID: id, ShimPID: os.Getpid(), Socket: dirs.Socket(id), Freezer: "v1"})
		if err := os.WriteFile(dirs.ShimInfo(id), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dirs
}

func run(t *testing.T, dirs config.Dirs, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	app := &App{Stdout: &out, Stderr: &errb, Dirs: dirs}
	code = app.Run(context.Background(), args)
	return code, out.String(), errb.String()
}

func TestFindContainer(t *testing.T) {
	dirs := fakeShims(t, "abc123", "abd456", "xyz")
	app := &App{Dirs: dirs}
	ctx := context.Background()
	for _, tc := range []struct{ in, want, errHas string }{
		{in: "abc123", want: "abc123"},
		{in: "abc", want: "abc123"},
		{in: "x", want: "xyz"},
		{in: "ab", errHas: "ambiguous: abc123, abd456"},
		{in: "nope", errHas: "known: abc123, abd456, xyz"},
	} {
		info, err := app.findContainer(ctx, tc.in)
		if tc.errHas != "" {
			if err == nil || !strings.Contains(err.Error(), tc.errHas) {
				t.Errorf("%q: err = %v, want it to contain %q", tc.in, err, tc.errHas)
			}
			continue
		}
		if err != nil || info.ContainerID != tc.want {
			t.Errorf("%q: got %v, %v; want %s", tc.in, info, err, tc.want)
		}
	}
}

func TestStaleShimIgnored(t *testing.T) {
	dirs := fakeShims(t, "live")
	// An info file whose socket is gone is not a container.
	b, _ := json.Marshal(shim.Info{ContainerID: "dead", ShimPID: os.Getpid()})
	os.WriteFile(dirs.ShimInfo("dead"), b, 0o600)
	code, out, _ := run(t, dirs, "list", "--output", "json")
	if code != 0 {
		t.Fatalf("list exit %d", code)
	}
	var infos []shim.Info
	if err := json.Unmarshal([]byte(out), &infos); err != nil || len(infos) != 1 || infos[0].ContainerID != "live" {
		t.Fatalf("list = %s (%v)", out, err)
	}
}

func TestUsageErrors(t *testing.T) {
	dirs := fakeShims(t, "c1", "c2")
	for _, tc := range []struct {
		args   []string
		errHas string
	}{
		{nil, "no command"},
		{[]string{"frobnicate"}, "unknown command"},
		{[]string{"snapshot", "--target", "r/x:1"}, "--container is required"},
		{[]string{"snapshot", "--container", "c1"}, "--target is required"},
		{[]string{"snapshot", "--container", "c", "--target", "r/x:1"}, "ambiguous"},
		{[]string{"snapshot", "--container", "zz", "--target", "r/x:1"}, "no container"},
		{[]string{"snapshot", "--container", "c1", "--target", "r/x:1", "--output", "yaml"}, "--output"},
		{[]string{"status", "a", "b"}, "at most one"},
		{[]string{"status", "nosuch"}, "no snapshot"},
		{[]string{"wait"}, "one snapshot id"},
	} {
		code, _, stderr := run(t, dirs, tc.args...)
		if code != ExitUsage || !strings.Contains(stderr, tc.errHas) {
			t.Errorf("%v: exit %d, stderr %q; want exit 2 with %q", tc.args, code, stderr, tc.errHas)
		}
	}
}

func TestHelp(t *testing.T) {
	dirs := fakeShims(t)
	for _, args := range [][]string{{"--help"}, {"snapshot", "--help"}, {"status", "-h"}} {
		code, _, stderr := run(t, dirs, args...)
		if code != 0 || !strings.Contains(stderr, "Usage:") {
			t.Errorf("%v: exit %d, stderr %q", args, code, stderr)
		}
	}
	_, _, stderr := run(t, dirs, "snapshot", "--help")
	for _, flag := range []string{"--container", "--target", "--wait", "--plain-http"} {
		if !strings.Contains(stderr, strings.TrimPrefix(flag, "-")) {
			t.Errorf("snapshot --help lacks %s", flag)
		}
	}
}

func TestStatusListsAndMarksInterrupted(t *testing.T) {
	dirs := fakeShims(t)
	store := snapshot.Store{Root: dirs.SnapshotsDir()}
	for _, st := range []*snapshot.State{
		{ID: "20260101t000000-aaaa", Container: "c1", Target: "r/x:1", Phase: snapshot.PhaseDone, Digest: "sha256:0123"},
		// pid 0x7ffffffe never exists: the uploader is gone.
		{ID: "20260101t000001-bbbb", Container: "c1", Target: "r/x:2", Phase: snapshot.PhasePushing, UploaderPID: 0x7ffffffe},
	} {
		if _, err := store.Create(st.ID); err != nil {
			t.Fatal(err)
		}
		if err := store.Save(st); err != nil {
			t.Fatal(err)
		}
	}
	code, out, _ := run(t, dirs, "status", "--output", "json")
	if code != 0 {
		t.Fatalf("status exit %d", code)
	}
	var all []snapshot.State
	if err := json.Unmarshal([]byte(out), &all); err != nil || len(all) != 2 {
		t.Fatalf("status = %s (%v)", out, err)
	}
	if all[0].Phase != snapshot.PhaseDone || all[1].Phase != phaseInterrupted {
		t.Fatalf("phases = %s, %s; want done, interrupted", all[0].Phase, all[1].Phase)
	}
	code, _, _ = run(t, dirs, "wait", "20260101t000001")
	if code != ExitFailed {
		t.Fatalf("wait on interrupted snapshot: exit %d, want 1", code)
	}
	code, out, _ = run(t, dirs, "wait", "20260101t000000")
	if code != 0 || !strings.Contains(out, "sha256:0123") {
		t.Fatalf("wait on done snapshot: exit %d, out %q", code, out)
	}
}
