package integration

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/seamless-snapshot/seamless/snapshot"
)

// changeScript makes every kind of change a snapshot must carry.
const changeScript = `set -e
mkdir -p "/root/dir with space"
echo "hello world" > "/root/dir with space/file name.txt"
echo "changed motd" >> /etc/motd
rm /data/imgfile.txt
rm -rf /data/imgdir
mkdir /data/imgdir
echo fresh > /data/imgdir/new.txt
ln -s /etc/motd /root/link
echo linked > /root/hl1
ln /root/hl1 /root/hl2
chmod 0751 "/root/dir with space"
chown 1000:1000 "/root/dir with space/file name.txt"
chmod 0604 "/root/dir with space/file name.txt"
testbin setxattr /root/hl1 user.seamless "kept value"
mkfifo /root/fifo
mkdir /root/emptydir
dd if=/dev/urandom of=/root/big bs=1M count=50 2>/dev/null
sha256sum /root/big > /root/big.sha256
`

// checkScript verifies, inside a container started from the snapshot, that
// every change is there; it prints OK lines and FAIL lines.
const checkScript = `
check() { if eval "$2"; then echo "OK $1"; else echo "FAIL $1"; fi; }
check spaces '[ "$(cat "/root/dir with space/file name.txt")" = "hello world" ]'
check modified '[ "$(tail -n1 /etc/motd)" = "changed motd" ]'
check deleted '[ ! -e /data/imgfile.txt ]'
check kept '[ -e /data/keep.txt ]'
check opaque '[ "$(ls /data/imgdir)" = "new.txt" ] && [ "$(cat /data/imgdir/new.txt)" = fresh ]'
check symlink '[ "$(readlink /root/link)" = /etc/motd ]'
check hardlink '[ "$(stat -c %i /root/hl1)" = "$(stat -c %i /root/hl2)" ] && [ "$(cat /root/hl2)" = linked ]'
check dirmode '[ "$(stat -c %a "/root/dir with space")" = 751 ]'
check filemode '[ "$(stat -c %a "/root/dir with space/file name.txt")" = 604 ]'
check owner '[ "$(stat -c %u:%g "/root/dir with space/file name.txt")" = 1000:1000 ]'
check xattr '[ "$(testbin getxattr /root/hl1 user.seamless)" = "kept value" ]'
check fifo '[ -p /root/fifo ]'
check emptydir '[ -d /root/emptydir ] && [ -z "$(ls -A /root/emptydir)" ]'
check bigfile 'sha256sum -c /root/big.sha256 >/dev/null'
`

func assertAllOK(t *testing.T, out string) {
	t.Helper()
	oks := 0
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "FAIL") {
			t.Errorf("in the snapshot image: %s", line)
		}
		if strings.HasPrefix(line, "OK") {
			oks++
		}
	}
	if want := strings.Count(checkScript, "\ncheck "); oks != want {
		t.Errorf("%d of %d checks passed; output:\n%s", oks, want, out)
	}
}

func snapshotID(t *testing.T, stdout string) string {
	t.Helper()
	for _, f := range strings.Fields(stdout) {
		if snapshot.ValidID(f) && strings.Count(f, "-") == 1 && strings.Contains(f, "t") && len(f) > 20 {
			return f
		}
	}
	t.Fatalf("no snapshot id in %q", stdout)
	return ""
}

// TestSnapshotEndToEnd: changes made inside a running container reach the
// registry through the CLI (by id prefix) and come back in a new container.
func TestSnapshotEndToEnd(t *testing.T) {
	id := "e2e-full-4f1c"
	startContainer(t, id, nil)
	exec1(t, id, changeScript)

	target := env.reg.Host + "/e2e/full:1"
	res := seamless(t, "snapshot", "--container", "e2e-full", "--target", target, "--plain-http", "--wait")
	if res.code != 0 {
		t.Fatalf("snapshot failed: exit %d\n%s", res.code, res.stderr)
	}
	if !strings.Contains(res.stdout, "pause:") || !strings.Contains(res.stdout, "pushed "+target) {
		t.Fatalf("snapshot output lacks pause or pushed line:\n%s", res.stdout)
	}
	st := loadState(t, snapshotID(t, res.stdout))
	if st.Phase != snapshot.PhaseDone || !strings.HasPrefix(st.Digest, "sha256:") || st.PauseUS <= 0 {
		t.Fatalf("state after --wait: %+v", st)
	}
	if st.Freezer != "v1" {
		t.Errorf("freezer = %q, want v1 (what runc uses on this host)", st.Freezer)
	}
	assertThawedAndRunning(t, id)

	// Data and spool are gone after success; the manifest stays.
	snapDir := snapshot.Store{Root: env.dirs.SnapshotsDir()}.Dir(st.ID)
	for _, gone := range []string{snapshot.DataDir, snapshot.LayerFile} {
		if _, err := os.Stat(snapDir + "/" + gone); err == nil {
			t.Errorf("%s left in %s after success", gone, snapDir)
		}
	}
	if _, err := os.Stat(snapDir + "/" + snapshot.ManifestFile); err != nil {
		t.Errorf("manifest missing after success: %v", err)
	}

	// The container kept changing after the snapshot; the image must not.
	exec1(t, id, `echo "after snapshot" > "/root/dir with space/file name.txt"`)
	assertAllOK(t, runImage(t, target, "e2e-full-check", checkScript))

	// A second snapshot to the same repository sends no base layer again.
	res = seamless(t, "commit", "--container", id, "--target", env.reg.Host+"/e2e/full:2", "--plain-http", "--wait", "--output", "json")
	if res.code != 0 {
		t.Fatalf("second snapshot: exit %d\n%s", res.code, res.stderr)
	}
	var st2 snapshot.State
	if err := json.Unmarshal([]byte(res.stdout), &st2); err != nil || st2.Phase != snapshot.PhaseDone {
		t.Fatalf("--output json: %v\n%s", err, res.stdout)
	}
	for _, layer := range env.image.LayerDigests {
		n, err := env.reg.BlobUploads(layer)
		if err != nil {
			t.Fatal(err)
		}
		if n != 1 {
			t.Errorf("base layer %s uploaded %d times, want 1", layer, n)
		}
	}
	out := runImage(t, env.reg.Host+"/e2e/full:2", "e2e-full-check2", `cat "/root/dir with space/file name.txt"`)
	if strings.TrimSpace(out) != "after snapshot" {
		t.Errorf("second snapshot has %q, want the later content", out)
	}

	res = seamless(t, "status", st.ID[:len(st.ID)-4], "--output", "json")
	var got snapshot.State
	if res.code != 0 || json.Unmarshal([]byte(res.stdout), &got) != nil || got.ID != st.ID {
		t.Errorf("status by prefix: exit %d, %s", res.code, res.stdout)
	}
	removeContainer(t, id)
}

// TestSnapshotBySignal: SIGUSR1 to the shim snapshots to the annotated target.
func TestSnapshotBySignal(t *testing.T) {
	id := "e2e-signal"
	startContainer(t, id, map[string]string{
		"io.seamless.snapshot.target":     env.reg.Host + "/e2e/signal:{{.Time}}",
		"io.seamless.snapshot.plain-http": "true",
	})
	exec1(t, id, `echo "by signal" > /root/sig.txt`)
	if err := syscall.Kill(shimPID(t, id), syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	st := waitForSnapshotOf(t, id, time.Minute)
	if st.Phase != snapshot.PhaseDone {
		t.Fatalf("signal snapshot: %s: %s", st.Phase, st.Error)
	}
	if !strings.HasPrefix(st.Target, env.reg.Host+"/e2e/signal:2") {
		t.Fatalf("target %q: placeholder not expanded", st.Target)
	}
	out := runImage(t, st.Target, "e2e-signal-check", "cat /root/sig.txt")
	if strings.TrimSpace(out) != "by signal" {
		t.Fatalf("image has %q", out)
	}
	assertThawedAndRunning(t, id)
	removeContainer(t, id)
}

// waitForSnapshotOf waits until container id has a snapshot in a final phase.
func waitForSnapshotOf(t *testing.T, id string, timeout time.Duration) *snapshot.State {
	t.Helper()
	store := snapshot.Store{Root: env.dirs.SnapshotsDir()}
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		all, _ := store.List()
		for _, st := range all {
			if st.Container == id && st.Phase.Final() {
				return st
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("no finished snapshot of %s after %v; shim log:\n%s", id, timeout, readFile(env.dirs.Run+"/"+id+".log"))
	return nil
}

// rawHTTP sends one HTTP/1.1 request over the shim's unix socket, as curl
// --unix-socket would, and returns status code and body.
func rawHTTP(t *testing.T, socket, method, path, body string) (int, string) {
	t.Helper()
	c, err := net.Dial("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "%s %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", method, path, len(body), body)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var b strings.Builder
	bufio.NewReader(resp.Body).WriteTo(&b)
	return resp.StatusCode, b.String()
}

// TestSnapshotBySocket: the control socket's raw HTTP API, with the v2 freezer.
func TestSnapshotBySocket(t *testing.T) {
	id := "e2e-socket"
	startContainer(t, id, map[string]string{"io.seamless.freezer": "v2"})
	exec1(t, id, `echo "by socket" > /root/sock.txt`)
	socket := env.dirs.Socket(id)

	code, body := rawHTTP(t, socket, "GET", "/v1/info", "")
	var info map[string]any
	if code != 200 || json.Unmarshal([]byte(body), &info) != nil {
		t.Fatalf("GET /v1/info: %d %s", code, body)
	}
	for _, k := range []string{"container_id", "shim_pid", "init_pid", "cgroup", "freezer", "upperdir"} {
		if info[k] == nil || info[k] == "" {
			t.Errorf("/v1/info lacks %s: %s", k, body)
		}
	}
	if info["freezer"] != "v2" {
		t.Errorf("freezer = %v, want v2 from the annotation", info["freezer"])
	}

	code, body = rawHTTP(t, socket, "POST", "/v1/snapshots", `{"target":"not a reference!"}`)
	if code != 400 || !strings.Contains(body, "invalid target reference") {
		t.Errorf("bad reference: %d %s", code, body)
	}
	code, body = rawHTTP(t, socket, "POST", "/v1/snapshots", `{"target":`)
	if code != 400 {
		t.Errorf("malformed body: %d %s", code, body)
	}

	target := env.reg.Host + "/e2e/socket:1"
	code, body = rawHTTP(t, socket, "POST", "/v1/snapshots", fmt.Sprintf(`{"target":%q,"plain_http":true}`, target))
	var st snapshot.State
	if code != 201 || json.Unmarshal([]byte(body), &st) != nil || st.ID == "" {
		t.Fatalf("POST /v1/snapshots: %d %s", code, body)
	}
	if st.Freezer != "v2" || st.PauseUS <= 0 {
		t.Errorf("freezer %q pause %d", st.Freezer, st.PauseUS)
	}
	res := seamless(t, "wait", st.ID)
	if res.code != 0 {
		t.Fatalf("wait: exit %d %s", res.code, res.stderr)
	}
	code, body = rawHTTP(t, socket, "GET", "/v1/snapshots/"+st.ID, "")
	if code != 200 || !strings.Contains(body, `"state": "done"`) {
		t.Errorf("GET snapshot: %d %s", code, body)
	}
	if out := runImage(t, target, "e2e-socket-check", "cat /root/sock.txt"); strings.TrimSpace(out) != "by socket" {
		t.Errorf("image has %q", out)
	}
	assertThawedAndRunning(t, id)
	removeContainer(t, id)
}

// TestBusy: a second request while a capture is in progress gets 409.
func TestBusy(t *testing.T) {
	id := "e2e-busy"
	startContainer(t, id, map[string]string{"io.seamless.test.pause-delay-ms": "1500"})
	socket := env.dirs.Socket(id)
	target := fmt.Sprintf(`{"target":%q,"plain_http":true}`, env.reg.Host+"/e2e/busy:1")
	first := make(chan int, 1)
	go func() {
		code, _ := rawHTTP(t, socket, "POST", "/v1/snapshots", target)
		first <- code
	}()
	time.Sleep(500 * time.Millisecond)
	code, body := rawHTTP(t, socket, "POST", "/v1/snapshots", target)
	if code != 409 || !strings.Contains(body, "already being captured") {
		t.Errorf("concurrent request: %d %s, want 409", code, body)
	}
	if c := <-first; c != 201 {
		t.Errorf("first request: %d", c)
	}
	waitForSnapshotOf(t, id, time.Minute)
	assertThawedAndRunning(t, id)
	removeContainer(t, id)
}

// TestBadInput: clear errors, nothing changed, container never left frozen.
func TestBadInput(t *testing.T) {
	startContainer(t, "e2e-bad-aa", nil)
	startContainer(t, "e2e-bad-ab", nil)

	res := seamless(t, "snapshot", "--container", "e2e-nope", "--target", env.reg.Host+"/x:1")
	if res.code != 2 || !strings.Contains(res.stderr, `no container "e2e-nope"`) {
		t.Errorf("unknown container: exit %d %s", res.code, res.stderr)
	}
	res = seamless(t, "snapshot", "--container", "e2e-bad-a", "--target", env.reg.Host+"/x:1")
	if res.code != 2 || !strings.Contains(res.stderr, "ambiguous") || !strings.Contains(res.stderr, "e2e-bad-aa") || !strings.Contains(res.stderr, "e2e-bad-ab") {
		t.Errorf("ambiguous prefix: exit %d %s", res.code, res.stderr)
	}
	before, _ := snapshot.Store{Root: env.dirs.SnapshotsDir()}.List()
	res = seamless(t, "snapshot", "--container", "e2e-bad-aa", "--target", "UPPER/Case::bad")
	if res.code != 2 || !strings.Contains(res.stderr, "invalid target reference") {
		t.Errorf("malformed reference: exit %d %s", res.code, res.stderr)
	}
	after, _ := snapshot.Store{Root: env.dirs.SnapshotsDir()}.List()
	if len(after) != len(before) {
		t.Errorf("a rejected request created a snapshot record")
	}

	// Unreachable registry: captured, then the upload fails clearly once
	// its retries (connection refused is transient) run out.
	res = seamless(t, "snapshot", "--container", "e2e-bad-aa", "--target", "127.0.0.1:1/unreachable/x:1", "--plain-http", "--retry-timeout", "2s", "--wait")
	if res.code != 1 {
		t.Fatalf("unreachable registry: exit %d, want 1", res.code)
	}
	st := loadState(t, snapshotID(t, res.stdout))
	if st.Phase != snapshot.PhaseFailed || !strings.Contains(st.Error, "127.0.0.1:1") {
		t.Errorf("unreachable registry state: %s %q", st.Phase, st.Error)
	}
	if !strings.Contains(res.stderr, "failed") {
		t.Errorf("stderr does not say it failed: %s", res.stderr)
	}
	assertThawedAndRunning(t, "e2e-bad-aa")
	removeContainer(t, "e2e-bad-aa")
	removeContainer(t, "e2e-bad-ab")
}

// TestUserPausedContainerRefused: a container the user paused (ctr task
// pause, i.e. runc pause) is not snapshotted, because the thaw would undo
// the user's pause; it stays paused, and once resumed a snapshot works.
func TestUserPausedContainerRefused(t *testing.T) {
	id := "e2e-paused"
	startContainer(t, id, nil)
	ctx := context.Background()
	if out, err := env.ctd.Ctr(ctx, "task", "pause", id); err != nil {
		t.Fatalf("ctr task pause: %v\n%s", err, out)
	}
	res := seamless(t, "snapshot", "--container", id, "--target", env.reg.Host+"/e2e/paused:1", "--plain-http")
	if res.code != 1 || !strings.Contains(res.stderr, "is paused") {
		t.Errorf("snapshot of a paused container: exit %d %s", res.code, res.stderr)
	}
	if frozen, err := env.ctd.Frozen(id); err != nil || !frozen {
		t.Errorf("the user's pause was undone: frozen=%v err=%v", frozen, err)
	}
	if out, err := env.ctd.Ctr(ctx, "task", "resume", id); err != nil {
		t.Fatalf("ctr task resume: %v\n%s", err, out)
	}
	assertThawedAndRunning(t, id)
	res = seamless(t, "snapshot", "--container", id, "--target", env.reg.Host+"/e2e/paused:1", "--plain-http", "--wait")
	if res.code != 0 {
		t.Errorf("snapshot after resume: exit %d %s", res.code, res.stderr)
	}
	assertThawedAndRunning(t, id)
	removeContainer(t, id)
}
