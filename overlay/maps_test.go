package overlay

import (
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestParseMapsLine(t *testing.T) {
	for _, tc := range []struct {
		line string
		ok   bool
		want sharedMapping
	}{
		{"7f00-7f10 rw-s 00000000 00:28 9979511                    /tmp/a b/merged/mm", true,
			sharedMapping{addr: "7f00-7f10", dev: unix.Mkdev(0, 0x28), ino: 9979511, path: "/tmp/a b/merged/mm"}},
		{"7f00-7f10 -w-s 00001000 fd:01 42 /data/x (deleted)", true,
			sharedMapping{addr: "7f00-7f10", dev: unix.Mkdev(0xfd, 1), ino: 42, path: "/data/x", deleted: true}},
		{"7f00-7f10 rw-p 00000000 00:28 9979511    /private", false, sharedMapping{}},
		{"7f00-7f10 r--s 00000000 00:28 9979511    /readonly", false, sharedMapping{}},
		{"7f00-7f10 rw-s 00000000 00:01 0          /dev/zero (deleted)", true,
			sharedMapping{addr: "7f00-7f10", dev: unix.Mkdev(0, 1), ino: 0, path: "/dev/zero", deleted: true}},
		{"7ffc-7ffd rw-p 00000000 00:00 0          [stack]", false, sharedMapping{}},
	} {
		got, ok, err := parseMapsLine(tc.line)
		if tc.want.ino == 0 && tc.ok {
			tc.ok = false // anonymous shared memory is skipped
		}
		if err != nil || ok != tc.ok || (ok && !reflect.DeepEqual(got, tc.want)) {
			t.Errorf("parseMapsLine(%q) = %+v, %v, %v; want %+v, %v", tc.line, got, ok, err, tc.want, tc.ok)
		}
	}
	if _, _, err := parseMapsLine("garbage"); err == nil {
		t.Error("a malformed line was accepted")
	}
}

// TestMapsReaderQueryMatchesText: PROCMAP_QUERY and the text format find
// the same shared writable mapping; the query is the cheaper one.
func TestMapsReaderQueryMatchesText(t *testing.T) {
	requireRoot(t)
	o := newOverlay(t, t.TempDir(), nil)
	writeFile(t, filepath.Join(o.merged, "mm"), string(make([]byte, 64<<10)))
	cg := newTestCgroup(t)
	c := startChild(t, cg, "mmap", false, filepath.Join(o.merged, "mm"))
	pid := c.cmd.Process.Pid
	cg.freeze(t)
	defer cg.thaw(t)
	var query, text mapsReader
	text.noQuery = true
	var got [2][]sharedMapping
	var took [2]time.Duration
	for i := 0; i < 3; i++ {
		for j, r := range []*mapsReader{&query, &text} {
			start := time.Now()
			ms, err := r.read(pid)
			took[j] = time.Since(start)
			mustNil(t, err)
			got[j] = ms
		}
	}
	if query.noQuery {
		t.Log("PROCMAP_QUERY not supported by this kernel: both used the text format")
	}
	if len(got[0]) != 1 || !reflect.DeepEqual(got[0], got[1]) || got[0][0].path != filepath.Join(o.merged, "mm") {
		t.Errorf("query %+v, text %+v", got[0], got[1])
	}
	t.Logf("query %v, text %v", took[0], took[1])
}
