package integration

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seamless-snapshot/seamless/integration/testenv"
	"github.com/seamless-snapshot/seamless/snapshot"
)

// Tests of the upload (issue 4) through the real CLI, shim and uploader.

// bigChangeScript writes data the build takes a moment over: 40 MiB of
// random bytes and 40 MiB of text, in a few files.
const bigChangeScript = `set -e
mkdir -p /root/big
for i in 1 2 3 4; do dd if=/dev/urandom of=/root/big/random$i bs=1M count=10 2>/dev/null; done
yes "seamless upload test line with some text to compress" | head -c 41943040 > /root/big/text
sha256sum /root/big/* > /root/big.sha256
`

// snapshotStore is the suite's snapshot store.
func snapshotStore() snapshot.Store { return snapshot.Store{Root: env.dirs.SnapshotsDir()} }

// waitState polls snapshot id until cond holds.
func waitState(t *testing.T, id string, timeout time.Duration, what string, cond func(*snapshot.State) bool) *snapshot.State {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		st, err := snapshotStore().Load(id)
		if err == nil && cond(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("snapshot %s: not %s after %v (state %+v, %v)\nupload.log:\n%s", id, what, timeout, st, err,
				readFile(filepath.Join(snapshotStore().Dir(id), snapshot.LogFile)))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// statusPhase runs `seamless status ID --output json` and returns the phase.
func statusPhase(t *testing.T, id string) snapshot.Phase {
	t.Helper()
	res := seamless(t, "status", id, "--output", "json")
	var st snapshot.State
	if res.code != 0 || json.Unmarshal([]byte(res.stdout), &st) != nil {
		t.Fatalf("status %s: exit %d\n%s%s", id, res.code, res.stdout, res.stderr)
	}
	return st.Phase
}

// killUploader SIGKILLs the snapshot's uploader and waits until it is gone.
func killUploader(t *testing.T, st *snapshot.State) {
	t.Helper()
	if err := syscall.Kill(st.UploaderPID, syscall.SIGKILL); err != nil {
		t.Fatalf("kill uploader %d: %v", st.UploaderPID, err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for testenv.ProcessAlive(st.UploaderPID) {
		if time.Now().After(deadline) {
			t.Fatalf("uploader %d survived SIGKILL", st.UploaderPID)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestUploadKilledAndRetried: the uploader a snapshot starts is SIGKILLed
// during the build; `seamless status` says interrupted; `seamless retry`
// is SIGKILLed in turn during the push; after the spool is deleted, a last
// `seamless retry --wait` rebuilds the layer from the capture, to the same
// digest, and pushes an image that holds the changes.
func TestUploadKilledAndRetried(t *testing.T) {
	id := "up-kill"
	startContainer(t, id, nil)
	exec1(t, id, bigChangeScript)
	target := env.reg.Host + "/upload/kill:1"

	res := seamless(t, "snapshot", "--container", id, "--target", target, "--plain-http", "--compression", "zstd")
	if res.code != 0 {
		t.Fatalf("snapshot: exit %d\n%s", res.code, res.stderr)
	}
	sid := snapshotID(t, res.stdout)
	st := waitState(t, sid, time.Minute, "building", func(st *snapshot.State) bool { return st.Phase == snapshot.PhaseBuilding })
	killUploader(t, st)
	assertThawedAndRunning(t, id)
	if p := statusPhase(t, sid); p != snapshot.PhaseInterrupted {
		t.Fatalf("status after SIGKILL in the build: %s, want interrupted", p)
	}
	if res := seamless(t, "status", sid); !strings.Contains(res.stdout, "seamless retry "+sid) {
		t.Errorf("status does not say how to continue:\n%s", res.stdout)
	}

	// Retry, stopped for good once the push phase sent its first bytes
	// (the layer itself went up while it was built), then killed.
	res = seamlessEnv(t, []string{"_SEAMLESS_TEST_STALL=push:1"}, "retry", sid)
	if res.code != 0 {
		t.Fatalf("retry: exit %d\n%s", res.code, res.stderr)
	}
	st = waitState(t, sid, time.Minute, "stalled in the push", func(st *snapshot.State) bool {
		return st.Phase == snapshot.PhasePushing && strings.Contains(readFile(filepath.Join(snapshotStore().Dir(sid), snapshot.LogFile)), "test stall at push")
	})
	if res := seamless(t, "retry", sid); res.code != 1 || !strings.Contains(res.stderr, "is being uploaded") {
		t.Errorf("retry while an uploader runs: exit %d %s", res.code, res.stderr)
	}
	built := st.LayerDigest
	if built == "" || st.DiffID == "" {
		t.Fatalf("no layer recorded before the push: %+v", st)
	}
	killUploader(t, st)
	if p := statusPhase(t, sid); p != snapshot.PhaseInterrupted {
		t.Fatalf("status after SIGKILL in the push: %s, want interrupted", p)
	}

	// Without its spool, the last run rebuilds the layer from the capture.
	if err := os.Remove(filepath.Join(snapshotStore().Dir(sid), "layer.tar.zst")); err != nil {
		t.Fatal(err)
	}
	res = seamless(t, "retry", sid, "--wait")
	if res.code != 0 || !strings.Contains(res.stdout, "pushed "+target) {
		t.Fatalf("retry --wait: exit %d\n%s%s", res.code, res.stdout, res.stderr)
	}
	st = loadState(t, sid)
	if st.Phase != snapshot.PhaseDone || st.LayerDigest != built || st.Upload.SpoolReused || st.Upload.Runs != 3 {
		t.Fatalf("after the last retry: %s, layer %s (built %s), spool reused %v, runs %d", st.Phase, st.LayerDigest, built, st.Upload.SpoolReused, st.Upload.Runs)
	}
	out := runImage(t, target, "up-kill-check", "sha256sum -c /root/big.sha256 >/dev/null && echo intact")
	if strings.TrimSpace(out) != "intact" {
		t.Errorf("image content: %q", out)
	}
	assertThawedAndRunning(t, id)
	removeContainer(t, id)
}

// TestUploadAuthTLS: a registry with TLS (self-signed) and htpasswd auth.
// Without --target-insecure the snapshot fails on the certificate, at
// once; with it but without credentials, on the authentication (401, not
// retried); `seamless retry` with DOCKER_CONFIG then pushes, and no
// credential is written to the snapshot's files.
func TestUploadAuthTLS(t *testing.T) {
	const user, password = "ci", "Sn4pshot-secret"
	reg := testenv.StartRegistryT(t, testenv.RegistryOptions{TLS: true, Htpasswd: map[string]string{user: password}})
	id := "up-auth"
	startContainer(t, id, nil)
	exec1(t, id, `echo "behind auth" > /root/auth.txt`)
	target := reg.Host + "/secure/app:1"

	start := time.Now()
	res := seamless(t, "snapshot", "--container", id, "--target", target, "--wait")
	if res.code != 1 || !strings.Contains(res.stderr, "certificate") || !strings.Contains(res.stderr, "--target-insecure") {
		t.Fatalf("verified TLS: exit %d\n%s", res.code, res.stderr)
	}
	res = seamless(t, "snapshot", "--container", id, "--target", target, "--target-insecure", "--wait")
	if res.code != 1 || !strings.Contains(res.stderr, "401") {
		t.Fatalf("no credentials: exit %d\n%s", res.code, res.stderr)
	}
	if d := time.Since(start); d > time.Minute {
		t.Errorf("two refusals took %v: retried?", d)
	}
	sid := snapshotID(t, res.stdout)

	cfg := t.TempDir()
	auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + password))
	b, _ := json.Marshal(map[string]any{"auths": map[string]any{reg.Host: map[string]string{"auth": auth}}})
	if err := os.WriteFile(filepath.Join(cfg, "config.json"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	res = seamlessEnv(t, []string{"DOCKER_CONFIG=" + cfg}, "retry", sid, "--wait")
	if res.code != 0 {
		t.Fatalf("retry with credentials: exit %d\n%s%s", res.code, res.stdout, res.stderr)
	}
	dir := snapshotStore().Dir(sid)
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if c := readFile(filepath.Join(dir, e.Name())); strings.Contains(c, password) || strings.Contains(c, auth) {
			t.Errorf("%s holds the credentials", e.Name())
		}
	}
	// The pushed image is there, behind auth and TLS.
	cmd := exec.CommandContext(t.Context(), "skopeo", "inspect", "--tls-verify=false", "--creds", user+":"+password, "docker://"+target)
	if out, err := cmd.CombinedOutput(); err != nil || !strings.Contains(string(out), loadState(t, sid).Digest) {
		t.Errorf("skopeo inspect: %v\n%s", err, out)
	}
	assertThawedAndRunning(t, id)
	removeContainer(t, id)
}

// TestUploadDiskFull: the build fills the disk holding the snapshot: the
// snapshot fails with a clear error, the partial spool is removed, and the
// container runs on, unaffected.
func TestUploadDiskFull(t *testing.T) {
	id := "up-full"
	startContainer(t, id, nil)
	exec1(t, id, `dd if=/dev/urandom of=/root/noise bs=1M count=24 2>/dev/null`)
	// Captured, then failed fast on an unreachable registry.
	res := seamless(t, "snapshot", "--container", id, "--target", "127.0.0.1:1/full/x:1", "--plain-http", "--retry-timeout", "1s", "--wait")
	if res.code != 1 {
		t.Fatalf("snapshot to 127.0.0.1:1: exit %d", res.code)
	}
	sid := snapshotID(t, res.stdout)
	dir := snapshotStore().Dir(sid)

	// Move the snapshot, without the spool of the failed push, onto a tmpfs
	// with room for the capture but not for a new spool too (random data:
	// the spool is as big).
	saved := t.TempDir()
	if out, err := exec.Command("cp", "-a", dir+"/.", saved).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v %s", err, out)
	}
	if err := os.Remove(filepath.Join(saved, snapshot.LayerFile)); err != nil {
		t.Fatalf("the failed push left no spool: %v", err)
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=32m,mode=0700"); err != nil {
		t.Fatalf("mount tmpfs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	if out, err := exec.Command("cp", "-a", saved+"/.", dir).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v %s", err, out)
	}
	res = seamless(t, "retry", sid, "--wait")
	if res.code != 1 || !strings.Contains(res.stderr, "disk full") || !strings.Contains(res.stderr, "no space left on device") {
		t.Fatalf("retry on a full disk: exit %d\n%s", res.code, res.stderr)
	}
	st := loadState(t, sid)
	if st.Phase != snapshot.PhaseFailed || !strings.Contains(st.Error, "disk full") {
		t.Errorf("state: %s %q", st.Phase, st.Error)
	}
	for _, f := range []string{snapshot.LayerFile, snapshot.LayerFile + ".partial"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err == nil {
			t.Errorf("%s left on the full disk", f)
		}
	}
	assertThawedAndRunning(t, id)
	if out := exec1(t, id, "head -c 1000 /root/noise | wc -c"); strings.TrimSpace(out) != "1000" {
		t.Errorf("container file: %q", out)
	}
	removeContainer(t, id)
}

// TestUploadMetricsAndReuse: the shim's /metrics counts its container's
// snapshots; a snapshot to another repository of the same registry sends
// none of the base layers (they are mounted); gc lists finished snapshots
// and never one in progress.
func TestUploadMetricsAndReuse(t *testing.T) {
	id := "up-metrics"
	startContainer(t, id, nil)
	exec1(t, id, `echo one > /root/m.txt`)
	socket := env.dirs.Socket(id)
	before := map[string]int{}
	for _, l := range env.image.LayerDigests {
		before[l], _ = env.reg.BlobUploads(l)
	}
	var sids []string
	for i, repo := range []string{"upload/metrics-a:1", "upload/metrics-b:1"} {
		res := seamless(t, "snapshot", "--container", id, "--target", env.reg.Host+"/"+repo, "--plain-http", "--wait", "--output", "json")
		var st snapshot.State
		if res.code != 0 || json.Unmarshal([]byte(res.stdout), &st) != nil {
			t.Fatalf("snapshot %d: exit %d\n%s", i, res.code, res.stderr)
		}
		sids = append(sids, st.ID)
		if i == 1 && st.Upload.PushedBytes > 64<<10 {
			t.Errorf("second repository: %d bytes sent; the base layers were sent again?", st.Upload.PushedBytes)
		}
	}
	for _, l := range env.image.LayerDigests {
		n, _ := env.reg.BlobUploads(l)
		if n-before[l] > 1 || n > 1 && before[l] == 0 {
			t.Errorf("base layer %s uploaded %d more times", l, n-before[l])
		}
	}
	code, body := rawHTTP(t, socket, "GET", "/metrics", "")
	if code != 200 {
		t.Fatalf("GET /metrics: %d %s", code, body)
	}
	for _, want := range []string{
		`seamless_snapshots_total{outcome="done"} 2`,
		`seamless_snapshots_total{outcome="captured"} 2`,
		`seamless_pause_seconds_count 2`,
		`seamless_upload_duration_seconds_count 2`,
		"# TYPE seamless_pushed_bytes_total counter",
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %q:\n%s", want, body)
		}
	}
	res := seamless(t, "gc", "--older-than", "0s", "--dry-run", "--output", "json")
	if res.code != 0 {
		t.Fatalf("gc --dry-run: exit %d %s", res.code, res.stderr)
	}
	for _, sid := range sids {
		if !strings.Contains(res.stdout, fmt.Sprintf("%q", sid)) {
			t.Errorf("gc --dry-run does not list %s:\n%s", sid, res.stdout)
		}
	}
	assertThawedAndRunning(t, id)
	removeContainer(t, id)
}
