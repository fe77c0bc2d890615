package cli

import (
	"encoding/json"
	"os"
	"strings"
	"testing"

	"github.com/seamless-snapshot/seamless/config"
	"github.com/seamless-snapshot/seamless/internal/proc"
	"github.com/seamless-snapshot/seamless/snapshot"
)

// saveStates creates snapshot records in dirs.
func saveStates(t *testing.T, dirs config.Dirs, states ...*snapshot.State) snapshot.Store {
	t.Helper()
	store := snapshot.Store{Root: dirs.SnapshotsDir()}
	for _, st := range states {
		if _, err := store.Create(st.ID); err != nil {
			t.Fatal(err)
		}
		if err := store.Save(st); err != nil {
			t.Fatal(err)
		}
	}
	return store
}

// TestStatusTellsRecycledPIDs: a live pid that is not the uploader (its
// start time differs) means the uploader is gone.
func TestStatusTellsRecycledPIDs(t *testing.T) {
	dirs := fakeShims(t)
	start, err := proc.StartTime(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	saveStates(t, dirs,
		&snapshot.State{ID: "20260101t000000-live", Phase: snapshot.PhasePushing, UploaderPID: os.Getpid(), UploaderStart: start},
		&snapshot.State{ID: "20260101t000000-recy", Phase: snapshot.PhaseBuilding, UploaderPID: os.Getpid(), UploaderStart: start + 1},
	)
	for id, want := range map[string]snapshot.Phase{"20260101t000000-live": snapshot.PhasePushing, "20260101t000000-recy": snapshot.PhaseInterrupted} {
		code, out, _ := run(t, dirs, "status", id, "--output", "json")
		var st snapshot.State
		if code != 0 || json.Unmarshal([]byte(out), &st) != nil || st.Phase != want {
			t.Errorf("%s: exit %d, state %s; want %s", id, code, st.Phase, want)
		}
	}
	_, out, _ := run(t, dirs, "status", "20260101t000000-recy")
	if !strings.Contains(out, "seamless retry 20260101t000000-recy") {
		t.Errorf("status of an interrupted snapshot does not say how to continue:\n%s", out)
	}
}

func TestRetryRefusals(t *testing.T) {
	dirs := fakeShims(t)
	saveStates(t, dirs,
		&snapshot.State{ID: "20260101t000000-done", Phase: snapshot.PhaseDone, PushedRef: "r/x@sha256:01"},
		&snapshot.State{ID: "20260101t000000-gone", Phase: snapshot.PhaseFailed, Error: "boom"},
	)
	for _, tc := range []struct {
		args   []string
		code   int
		outHas string
	}{
		{[]string{"retry"}, ExitUsage, "one snapshot id"},
		{[]string{"retry", "nosuch"}, ExitUsage, "no snapshot"},
		{[]string{"retry", "20260101t000000-done", "--retry-timeout", "-1s"}, ExitUsage, "must not be negative"},
		{[]string{"retry", "20260101t000000-done"}, ExitOK, "already pushed: r/x@sha256:01"},
		{[]string{"retry", "20260101t000000-gone"}, ExitFailed, "cannot be resumed"},
	} {
		code, out, stderr := run(t, dirs, tc.args...)
		if code != tc.code || !strings.Contains(out+stderr, tc.outHas) {
			t.Errorf("%v: exit %d, %q %q; want exit %d with %q", tc.args, code, out, stderr, tc.code, tc.outHas)
		}
	}
}
