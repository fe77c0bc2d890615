package overlay

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// childRoleEnv selects a child role when the test binary is re-executed:
// changes made by the test process itself are invisible to dirty tracking
// (own-pid events are dropped), so concurrent writers are other processes.
const childRoleEnv = "SEAMLESS_OVERLAY_TEST_ROLE"

func TestMain(m *testing.M) {
	if role := os.Getenv(childRoleEnv); role != "" {
		if err := runChild(role, os.Args[1:]); err != nil {
			fmt.Fprintf(os.Stderr, "child %s: %v\n", role, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// runChild runs a role: it prints "ready" once set up, then waits for a line
// on stdin before it starts (so the test can move it into a cgroup first).
func runChild(role string, args []string) error {
	switch role {
	case "ops":
		return runOps(args)
	case "idle":
		return childStart(func() error {
			for {
				time.Sleep(time.Hour)
			}
		})
	case "writer":
		return childStart(func() error { return runWriter(args[0]) })
	case "mmap":
		return runMmapWriter(args)
	case "mmapexec":
		return runMmapThenExec(args)
	case "fdwriter":
		return runFdWriter(args[0])
	case "slowwriter":
		return childStart(func() error { return runSlowWriter(args[0]) })
	}
	return fmt.Errorf("unknown role %q", role)
}

// childStart announces readiness, waits for the go line, then runs fn.
func childStart(fn func() error) error {
	fmt.Println("ready")
	if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
		return fmt.Errorf("wait for go: %w", err)
	}
	return fn()
}

// runOps applies ops given as arguments, in order: "write:P:CONTENT",
// "append:P:CONTENT", "rm:P", "rmrf:P", "mkdir:P", "mv:A:B", "ln:A:B",
// "symlink:TARGET:P", "chmod:P:MODE", "xattr:P:NAME:VALUE", "mkfifo:P",
// "mknod:P" (char 1:3), "touch:P" (times set to 2001).
func runOps(ops []string) error {
	for _, op := range ops {
		if err := applyOp(op); err != nil {
			return fmt.Errorf("%s: %w", op, err)
		}
	}
	return nil
}

func applyOp(op string) error {
	f := strings.SplitN(op, ":", 4)
	arg := func(i int) string {
		if i < len(f) {
			return f[i]
		}
		return ""
	}
	switch f[0] {
	case "write":
		return os.WriteFile(arg(1), []byte(arg(2)), 0o644)
	case "append":
		fh, err := os.OpenFile(arg(1), os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			return err
		}
		_, err = fh.WriteString(arg(2))
		return joinClose(err, fh)
	case "rm":
		return os.Remove(arg(1))
	case "rmrf":
		return os.RemoveAll(arg(1))
	case "mkdir":
		return os.MkdirAll(arg(1), 0o755)
	case "mv":
		return os.Rename(arg(1), arg(2))
	case "ln":
		return os.Link(arg(1), arg(2))
	case "symlink":
		return os.Symlink(arg(1), arg(2))
	case "chmod":
		mode, err := strconv.ParseUint(arg(2), 8, 32)
		if err != nil {
			return err
		}
		return os.Chmod(arg(1), os.FileMode(mode))
	case "xattr":
		return unix.Setxattr(arg(1), arg(2), []byte(arg(3)), 0)
	case "mkfifo":
		return unix.Mkfifo(arg(1), 0o640)
	case "mknod":
		return unix.Mknod(arg(1), unix.S_IFCHR|0o600, int(unix.Mkdev(1, 3)))
	case "touch":
		ts := []unix.Timespec{{Sec: 1e9}, {Sec: 1e9}}
		return unix.UtimesNanoAt(unix.AT_FDCWD, arg(1), ts, unix.AT_SYMLINK_NOFOLLOW)
	}
	return fmt.Errorf("unknown op")
}

func joinClose(err error, f *os.File) error {
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// Writer fixture layout (relative to the merged dir).
const (
	invA, invB    = "inv/a", "inv/b" // the invariant pair: B <= A <= B+1
	counterFormat = "%020d\n"
	copyUpFiles   = 200 // lower cu/fNNN, appended to (copy-up)
	deleteFiles   = 200 // lower del/fNNN, deleted (whiteouts)
	opaqueDirs    = 20  // lower opq/dNN with files, replaced (opaque dirs)
)

// runWriter mutates the merged dir forever, keeping the invariant pair.
func runWriter(merged string) error {
	m := func(p string) string { return filepath.Join(merged, p) }
	for n := 1; ; n++ {
		if err := writeCounter(m(invA), n); err != nil {
			return err
		}
		if err := writeCounter(m(invB), n); err != nil {
			return err
		}
		if err := churn(m, n); err != nil {
			return fmt.Errorf("iteration %d: %w", n, err)
		}
		if n%8 == 0 {
			time.Sleep(time.Millisecond)
		}
	}
}

// writeCounter overwrites the counter in place with one pwrite.
func writeCounter(p string, n int) error {
	fd, err := unix.Open(p, unix.O_WRONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	_, err = unix.Pwrite(fd, []byte(fmt.Sprintf(counterFormat, n)), 0)
	if cerr := unix.Close(fd); err == nil {
		err = cerr
	}
	return err
}

// churn does the iteration's other changes: rewrites, renames over, chmod,
// xattrs, copy-ups, whiteouts, opaque dirs, dir renames, hardlinks, mkdir.
func churn(m func(string) string, n int) error {
	content := pseudoRandom(n % 8192)
	steps := []struct {
		every int
		fn    func() error
	}{
		{1, func() error { return os.WriteFile(m(fmt.Sprintf("rot/f%02d", n%50)), content, 0o644) }},
		{7, func() error {
			tmp := m(fmt.Sprintf("tmp/t%d", n))
			if err := os.WriteFile(tmp, content, 0o644); err != nil {
				return err
			}
			return os.Rename(tmp, m(fmt.Sprintf("rot/r%d", n%10)))
		}},
		{11, func() error { return os.Chmod(m(fmt.Sprintf("rot/f%02d", n%50)), os.FileMode(0o600|(n%2)*0o044)) }},
		{13, func() error {
			return unix.Setxattr(m(fmt.Sprintf("rot/f%02d", (n+1)%50)), "user.seq", []byte(strconv.Itoa(n)), 0)
		}},
		{17, func() error { return appendTo(m(fmt.Sprintf("cu/f%03d", n/17%copyUpFiles)), n) }},
		{19, func() error { return ignoreNotExist(os.Remove(m(fmt.Sprintf("del/f%03d", n/19%deleteFiles)))) }},
		{23, func() error { return os.WriteFile(m(fmt.Sprintf("rot/u%d", n%20)), content[:n%100], 0o644) }},
		{29, func() error { return ignoreNotExist(os.Remove(m(fmt.Sprintf("rot/u%d", n%20)))) }},
		{31, func() error { return swapDirs(m, n) }},
		{37, func() error { return relink(m, n) }},
		{41, func() error { return toggleDir(m(fmt.Sprintf("rot/sub%d", n%5)), n) }},
		{43, func() error {
			p := m(fmt.Sprintf("rot/s%d", n%5))
			_ = os.Remove(p)
			return os.Symlink(fmt.Sprintf("target-%d", n), p)
		}},
		{97, func() error { return replaceDir(m(fmt.Sprintf("opq/d%02d", n/97%opaqueDirs)), n) }},
	}
	for _, s := range steps {
		if n%s.every == 0 {
			if err := s.fn(); err != nil {
				return err
			}
		}
	}
	return nil
}

func appendTo(p string, n int) error {
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(f, "append %d\n", n)
	return joinClose(err, f)
}

// swapDirs renames dd <-> dd2 (whichever exists) and writes a file in it.
func swapDirs(m func(string) string, n int) error {
	from, to := m("dd"), m("dd2")
	if _, err := os.Lstat(from); err != nil {
		from, to = to, from
	}
	if err := os.Rename(from, to); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(to, fmt.Sprintf("f%d", n%3)), []byte(strconv.Itoa(n)), 0o644)
}

// relink toggles a second name of hl/a and rewrites hl/a in place.
func relink(m func(string) string, n int) error {
	b := m(fmt.Sprintf("hl/b%d", n%3))
	if err := os.Link(m("hl/a"), b); err != nil {
		if err := os.Remove(b); err != nil {
			return err
		}
	}
	return writeCounter(m("hl/a"), n)
}

// toggleDir creates dir with a file in it, or removes it.
func toggleDir(dir string, n int) error {
	if _, err := os.Lstat(dir); err == nil {
		return os.RemoveAll(dir)
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "x"), []byte(strconv.Itoa(n)), 0o644)
}

// replaceDir does rm -rf dir; mkdir dir (an opaque dir over a lower one).
func replaceDir(dir string, n int) error {
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "new"), []byte(strconv.Itoa(n)), 0o644)
}

func ignoreNotExist(err error) error {
	if os.IsNotExist(err) {
		return nil
	}
	return err
}

// runMmapWriter maps args[0] (in args[1] when it chroots by pivot_root into
// that merged dir first: "ns:MERGED") shared and stores a counter into every
// page, never calling msync.
func runMmapWriter(args []string) error {
	p := args[0]
	if len(args) > 1 {
		if err := pivotInto(args[1]); err != nil {
			return err
		}
	}
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	st, err := f.Stat()
	if err != nil {
		return err
	}
	b, err := unix.Mmap(int(f.Fd()), 0, int(st.Size()), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return err
	}
	if err := f.Close(); err != nil { // the mapping keeps the file open for writing
		return err
	}
	return childStart(func() error {
		for n := uint64(1); ; n++ {
			for off := 0; off+8 <= len(b); off += 4096 {
				copy(b[off:off+8], fmt.Sprintf("%08d", n%100000000))
			}
		}
	})
}

// runMmapThenExec maps args[0] shared and writable, announces readiness,
// and on the second line read from stdin re-executes the test binary as an
// "mmap" child of args[1]: same pid, another address space.
func runMmapThenExec(args []string) error {
	f, err := os.OpenFile(args[0], os.O_RDWR, 0)
	if err != nil {
		return err
	}
	b, err := unix.Mmap(int(f.Fd()), 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return err
	}
	b[0] = 'x'
	if err := f.Close(); err != nil {
		return err
	}
	fmt.Println("ready")
	in := bufio.NewReader(os.Stdin) // one reader: the two lines may come in one read
	for _, what := range []string{"go", "exec"} {
		if _, err := in.ReadString('\n'); err != nil {
			return fmt.Errorf("wait for %s: %w", what, err)
		}
	}
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	env := []string{childRoleEnv + "=mmap"}
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, childRoleEnv+"=") {
			env = append(env, kv)
		}
	}
	return unix.Exec(exe, []string{exe, args[1]}, env)
}

// pivotInto makes dir the root of this process's (new) mount namespace, the
// way runc does for a container.
func pivotInto(dir string) error {
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make / private: %w", err)
	}
	if err := unix.Chdir(dir); err != nil {
		return err
	}
	if err := unix.PivotRoot(".", "."); err != nil {
		return fmt.Errorf("pivot_root: %w", err)
	}
	if err := unix.Unmount(".", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detach old root: %w", err)
	}
	return unix.Chdir("/")
}

// runSlowWriter rewrites one file of a bigOverlay tree about 100 times a second.
func runSlowWriter(merged string) error {
	for n := 0; ; n++ {
		p := filepath.Join(merged, fmt.Sprintf("d%02d/f%03d", n*37%100, n*53%100))
		if err := os.WriteFile(p, []byte(fmt.Sprintf("rewrite %d\n", n)), 0o644); err != nil {
			return err
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// runFdWriter opens a file, and writes through that descriptor each time it
// is told to (answering "written"), whatever happened to the name since.
func runFdWriter(p string) error {
	f, err := os.OpenFile(p, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	in := bufio.NewReader(os.Stdin)
	fmt.Println("ready")
	if _, err := in.ReadString('\n'); err != nil { // "go"
		return err
	}
	for n := 0; ; n++ {
		if _, err := in.ReadString('\n'); err != nil {
			return err
		}
		if _, err := f.WriteAt([]byte(fmt.Sprintf("written through a descriptor %d\n", n)), 0); err != nil {
			return err
		}
		fmt.Println("written")
	}
}
