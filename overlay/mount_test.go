package overlay

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestFindMountReal(t *testing.T) {
	requireRoot(t)
	base := t.TempDir()
	lowerA := filepath.Join(base, "low:er a") // ':' and ' ' need escaping
	lowerB := filepath.Join(base, "lower,b")  // ',' too
	upper, work, merged := filepath.Join(base, "up per"), filepath.Join(base, "work"), filepath.Join(base, "merged")
	for _, d := range []string{lowerA, lowerB, upper, work, merged} {
		mustNil(t, os.Mkdir(d, 0o755))
	}
	esc := func(p string) string { return strings.NewReplacer(`:`, `\:`, `,`, `\,`).Replace(p) }
	mountOverlay(t, merged, "lowerdir="+esc(lowerA)+":"+esc(lowerB)+",upperdir="+upper+",workdir="+work)

	link := filepath.Join(base, "link")
	mustNil(t, os.Symlink(merged, link))
	m, err := FindMount("/proc/self/mountinfo", link+"/")
	mustNil(t, err)
	want := &Mount{Mountpoint: merged, Lowerdirs: []string{lowerA, lowerB}, Upperdir: upper, Workdir: work}
	if m.Mountpoint != want.Mountpoint || !reflect.DeepEqual(m.Lowerdirs, want.Lowerdirs) || m.Upperdir != upper || m.Workdir != work {
		t.Fatalf("FindMount = %+v\nwant %+v", m, want)
	}
	if err := m.CheckCapturable(); err != nil || m.UserXattr() {
		t.Errorf("CheckCapturable = %v, UserXattr = %v", err, m.UserXattr())
	}

	// A second overlay stacked on the same mount point wins.
	lower2, upper2, work2 := filepath.Join(base, "lower2"), filepath.Join(base, "upper2"), filepath.Join(base, "work2")
	for _, d := range []string{lower2, upper2, work2} {
		mustNil(t, os.Mkdir(d, 0o755))
	}
	mountOverlay(t, merged, "lowerdir="+lower2+",upperdir="+upper2+",workdir="+work2)
	if m, err := FindMount("/proc/self/mountinfo", merged); err != nil || m.Upperdir != upper2 {
		t.Errorf("stacked: FindMount = %+v, %v; want upperdir %s", m, err, upper2)
	}

	// A non-overlay on top hides it.
	mustNil(t, unix.Mount("tmpfs", merged, "tmpfs", 0, "size=1m"))
	t.Cleanup(func() { unmount(t, merged) })
	if _, err := FindMount("/proc/self/mountinfo", merged); err == nil || !strings.Contains(err.Error(), "not overlay") {
		t.Errorf("tmpfs on top: err = %v, want a not-overlay error", err)
	}
	if _, err := FindMount("/proc/self/mountinfo", base); err == nil || !strings.Contains(err.Error(), "nothing is mounted") {
		t.Errorf("no mount: err = %v", err)
	}
}

const syntheticMountinfo = `22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard
40 22 0:40 / /run/c\0401/rootfs rw,relatime - overlay overlay rw,lowerdir=/l/a\134:b:/l/c\134\054d,upperdir=/u\040p,workdir=/w\134\054x,index=off
41 22 0:41 / /stack rw - overlay overlay rw,lowerdir=/a,upperdir=/u1,workdir=/w1
42 22 0:42 / /stack rw - overlay overlay rw,lowerdir=/b,upperdir=/u2,workdir=/w2,userxattr
43 22 0:43 / /hidden rw - overlay overlay rw,lowerdir=/b,upperdir=/u2,workdir=/w2
44 22 0:44 / /hidden rw - tmpfs tmpfs rw
45 22 0:45 / /ro ro - overlay overlay ro,lowerdir=/a:/b
46 22 0:46 / /meta rw - overlay overlay rw,lowerdir=/a,upperdir=/u,workdir=/w,redirect_dir=on,metacopy=on
47 22 0:47 / /new rw shared:5 master:2 - overlay none rw,lowerdir+=/x:y\040z,lowerdir+=/q\134r,datadir+=/d,upperdir=/u,workdir=/w
48 22 0:48 / /data rw - overlay overlay rw,lowerdir=/a::/d1::/d2,upperdir=/u,workdir=/w
`

func TestFindMountSynthetic(t *testing.T) {
	p := filepath.Join(t.TempDir(), "mountinfo")
	mustNil(t, os.WriteFile(p, []byte(syntheticMountinfo), 0o644))

	m, err := FindMount(p, "/run/c 1/rootfs/")
	mustNil(t, err)
	if m.Mountpoint != "/run/c 1/rootfs" || !reflect.DeepEqual(m.Lowerdirs, []string{"/l/a:b", "/l/c,d"}) ||
		m.Upperdir != "/u p" || m.Workdir != "/w,x" || m.Options["index"] != "off" {
		t.Errorf("escapes: %+v", m)
	}
	if m, err := FindMount(p, "/stack"); err != nil || m.Upperdir != "/u2" || !m.UserXattr() {
		t.Errorf("stacked: %+v, %v", m, err)
	}
	if m, err := FindMount(p, "/new"); err != nil || !reflect.DeepEqual(m.Lowerdirs, []string{"/x:y z", "/qr"}) || !reflect.DeepEqual(m.Datadirs, []string{"/d"}) {
		t.Errorf("lowerdir+: %+v, %v", m, err)
	}
	if m, err := FindMount(p, "/data"); err != nil || !reflect.DeepEqual(m.Lowerdirs, []string{"/a"}) || !reflect.DeepEqual(m.Datadirs, []string{"/d1", "/d2"}) {
		t.Errorf("data-only layers: %+v, %v", m, err)
	}
	for mp, wantErr := range map[string]string{"/hidden": "not overlay", "/nowhere": "nothing is mounted"} {
		if _, err := FindMount(p, mp); err == nil || !strings.Contains(err.Error(), wantErr) {
			t.Errorf("%s: err = %v, want %q", mp, err, wantErr)
		}
	}
	for mp, wantErr := range map[string]string{"/ro": "no upperdir", "/meta": "metacopy=on"} {
		m, err := FindMount(p, mp)
		mustNil(t, err)
		if err := m.CheckCapturable(); err == nil || !strings.Contains(err.Error(), wantErr) {
			t.Errorf("%s: CheckCapturable = %v, want %q", mp, err, wantErr)
		}
	}
	mustNil(t, os.WriteFile(p, []byte("1 2 3\n"), 0o644))
	if _, err := FindMount(p, "/x"); err == nil {
		t.Error("a malformed mountinfo was accepted")
	}
}

func TestCheckCapturable(t *testing.T) {
	for _, tc := range []struct {
		m       Mount
		wantErr string
	}{
		{Mount{Upperdir: "/u", Options: map[string]string{"metacopy": "on"}}, "metacopy"},
		{Mount{Upperdir: "/u", Options: map[string]string{"redirect_dir": "on"}}, "redirect_dir"},
		{Mount{Options: map[string]string{}}, "no upperdir"},
		{Mount{Upperdir: "/u", Options: map[string]string{"metacopy": "off", "userxattr": ""}}, ""},
	} {
		err := tc.m.CheckCapturable()
		if (err == nil) != (tc.wantErr == "") || err != nil && !strings.Contains(err.Error(), tc.wantErr) {
			t.Errorf("%+v: CheckCapturable = %v, want %q", tc.m, err, tc.wantErr)
		}
	}
	if !(&Mount{Options: map[string]string{"userxattr": ""}}).UserXattr() {
		t.Error("UserXattr not reported")
	}
}
