package uploader

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/seamless-snapshot/seamless/config"
	"github.com/seamless-snapshot/seamless/integration/testenv"
	"github.com/seamless-snapshot/seamless/overlay"
	"github.com/seamless-snapshot/seamless/snapshot"
)

// writeBigCapture writes a capture of about size bytes (text and random
// data) in snapshot dir: the same bytes for every call.
func writeBigCapture(t *testing.T, dir string, size int) {
	t.Helper()
	data := filepath.Join(dir, snapshot.DataDir)
	big := mixedData(5, size)
	if err := os.WriteFile(filepath.Join(data, "big"), big, 0o600); err != nil {
		t.Fatal(err)
	}
	mt := capturedAt.UnixNano()
	m := overlay.Manifest{Version: overlay.ManifestVersion, Entries: []overlay.Entry{
		{Path: "hello", Type: overlay.TypeFile, Mode: 0o644, Size: 6, Data: "1", MtimeNS: mt},
		{Path: "var", Type: overlay.TypeDir, Mode: 0o755, MtimeNS: mt},
		{Path: "var/big", Type: overlay.TypeFile, Mode: 0o600, Size: int64(len(big)), Data: "big", MtimeNS: mt},
	}}
	b, _ := json.Marshal(m)
	if err := os.WriteFile(filepath.Join(dir, snapshot.ManifestFile), b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// waitExit reaps our child pid and returns its exit code.
func waitExit(t *testing.T, pid int) int {
	t.Helper()
	p, err := os.FindProcess(pid)
	if err != nil {
		t.Fatal(err)
	}
	ps, err := p.Wait()
	if err != nil {
		t.Fatalf("wait for uploader %d: %v", pid, err)
	}
	return ps.ExitCode()
}

// waitForLog waits until the snapshot's upload.log contains s.
func waitForLog(t *testing.T, dir, s string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		b, _ := os.ReadFile(filepath.Join(dir, snapshot.LogFile))
		if strings.Contains(string(b), s) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %q in upload.log after %v:\n%s", s, timeout, b)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestKillMatrix: an uploader SIGKILLed at any point of the build or the
// push leaves a snapshot that reads as interrupted, and Resume completes
// it with the layer digest an uninterrupted upload gives, for both
// compressions. The processes are the real uploader (Main): base image from
// containerd, layer from package overlay, Debian's registry.
func TestKillMatrix(t *testing.T) {
	needRegistry(t)
	ctd := testenv.StartContainerdT(t, testenv.ContainerdOptions{})
	base := testenv.ImportImageT(t, ctd, testenv.DefaultImageName, nil)
	reg := testenv.StartRegistryT(t, testenv.RegistryOptions{})
	stateDir := t.TempDir()
	store := snapshot.Store{Root: config.Dirs{State: stateDir}.SnapshotsDir()}
	exe, _ := os.Executable()

	prepare := func(id string, compression string, size int) *snapshot.State {
		// A repository each: the layer blob must not be there already.
		st := newSnapshot(t, store, id, reg.Host+"/kill/"+id+":1")
		writeBigCapture(t, store.Dir(id), size)
		st.Request.Compression = compression
		st.Base = snapshot.Base{Source: "containerd", Ref: base.Name, ContainerdAddress: ctd.Address, ContainerdNamespace: ctd.Namespace}
		if err := store.Save(st); err != nil {
			t.Fatal(err)
		}
		return st
	}
	uploadLog := func(id string) string {
		b, _ := os.ReadFile(filepath.Join(store.Dir(id), snapshot.LogFile))
		return string(b)
	}

	const small, big = 6 << 20, streamMin + 8<<20 // big: uploaded while built
	refs := map[string]*snapshot.State{}
	for _, compression := range []string{"gzip", "zstd"} {
		// The references: the same captures, never interrupted.
		for _, size := range []int{small, big} {
			ref := fmt.Sprintf("ref-%s-%d", compression, size)
			prepare(ref, compression, size)
			pid, err := Spawn(exe, stateDir, ref)
			if err != nil {
				t.Fatal(err)
			}
			if code := waitExit(t, pid); code != 0 {
				t.Fatalf("reference upload: exit %d\n%s", code, uploadLog(ref))
			}
			refs[ref], _ = store.Load(ref)
		}

		for _, tc := range []struct {
			stall      string
			size       int
			phase      snapshot.Phase
			spoolReuse bool
		}{
			{"build:2097152", small, snapshot.PhaseBuilding, false}, // half-written spool
			{"build:16777216", big, snapshot.PhaseBuilding, false},  // half-written spool, half-streamed blob
			{"spooled", small, snapshot.PhaseBuilding, false},       // spool complete, not recorded
			{"built", small, snapshot.PhaseBuilding, true},          // spool recorded
			{"built", big, snapshot.PhaseBuilding, true},            // spool recorded, blob streamed
			{"push:1048576", small, snapshot.PhasePushing, true},    // blobs half sent
			{"pushed", small, snapshot.PhasePushing, true},          // manifest sent, not recorded
		} {
			point, _, _ := strings.Cut(tc.stall, ":")
			want := refs[fmt.Sprintf("ref-%s-%d", compression, tc.size)]
			label := point
			if tc.size == big {
				label += "-streamed"
			}
			t.Run(compression+"/"+label, func(t *testing.T) {
				id := "kill-" + compression + "-" + label
				prepare(id, compression, tc.size)
				dir := store.Dir(id)

				t.Setenv(envTestStall, tc.stall)
				pid, err := Spawn(exe, stateDir, id)
				if err != nil {
					t.Fatal(err)
				}
				os.Unsetenv(envTestStall)
				waitForLog(t, dir, "test stall at "+point, time.Minute)
				st, _ := store.Load(id)
				if !Running(st) || Interrupted(st) || st.Phase != tc.phase {
					t.Fatalf("stalled uploader: running %v, interrupted %v, phase %s (want %s)", Running(st), Interrupted(st), st.Phase, tc.phase)
				}
				if _, err := Resume(exe, stateDir, id, 0); !errors.Is(err, ErrRunning) {
					t.Fatalf("Resume while the uploader runs: %v, want ErrRunning", err)
				}
				if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
					t.Fatal(err)
				}
				waitExit(t, pid)
				st, _ = store.Load(id)
				if !Interrupted(st) || st.Phase != tc.phase {
					t.Fatalf("after SIGKILL: interrupted %v, phase %s", Interrupted(st), st.Phase)
				}

				pid, err = Resume(exe, stateDir, id, 0)
				if err != nil {
					t.Fatalf("Resume: %v", err)
				}
				if code := waitExit(t, pid); code != 0 {
					t.Fatalf("resumed upload: exit %d\n%s", code, uploadLog(id))
				}
				st, _ = store.Load(id)
				if st.Phase != snapshot.PhaseDone || st.LayerDigest != want.LayerDigest || st.DiffID != want.DiffID {
					t.Fatalf("resumed: %s %q, layer %s diff_id %s; uninterrupted upload gave %s %s\n%s",
						st.Phase, st.Error, st.LayerDigest, st.DiffID, want.LayerDigest, want.DiffID, uploadLog(id))
				}
				if st.Upload.SpoolReused != tc.spoolReuse || st.Upload.Runs != 2 || Interrupted(st) {
					t.Errorf("spool reused %v (want %v), runs %d", st.Upload.SpoolReused, tc.spoolReuse, st.Upload.Runs)
				}
				r, _ := name.ParseReference(st.Target, name.Insecure)
				desc, err := remote.Head(r)
				if err != nil || desc.Digest.String() != st.Digest {
					t.Errorf("registry has %v (%v) at %s, state says %s", desc, err, st.Target, st.Digest)
				}
				if n, _ := reg.BlobUploads(st.LayerDigest); n < 1 {
					t.Errorf("layer %s never uploaded", st.LayerDigest)
				}
				for _, gone := range []string{snapshot.DataDir, spoolName(compression), spoolName(compression) + ".partial"} {
					if exists(filepath.Join(dir, gone)) {
						t.Errorf("%s left after success", gone)
					}
				}
				if _, err := Resume(exe, stateDir, id, 0); !errors.Is(err, ErrDone) {
					t.Errorf("Resume of a done snapshot: %v, want ErrDone", err)
				}
			})
		}
	}
}

func spoolName(compression string) string {
	c, _ := codecFor(compression)
	return c.file
}
