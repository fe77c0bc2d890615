package freezer

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"
	"unsafe"

	"golang.org/x/sys/unix"
)

// procsReader lists the processes of a cgroup subtree through the cgroup's
// directory, opened in advance: inside a pause it costs a getdents, an open
// and a read per cgroup instead of a path walk. cgroup.procs is opened
// afresh each time: on v1 an open file keeps serving the pid list it loaded
// first (until a second after its last reader), so it would go stale.
type procsReader struct {
	dirFD int
	buf   []byte // cgroup.procs content
	dents []byte // getdents records
}

// openProcs opens the cgroup directory dir.
func openProcs(dir string) (*procsReader, error) {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", dir, err)
	}
	return &procsReader{dirFD: fd, buf: make([]byte, 16<<10), dents: make([]byte, 8<<10)}, nil
}

func (r *procsReader) close() {
	if r.dirFD >= 0 {
		unix.Close(r.dirFD)
		r.dirFD = -1
	}
}

// pids returns the ids listed in file ("cgroup.procs" for processes; v1
// "tasks" or v2 "cgroup.threads" for threads) of the cgroup and of every
// descendant cgroup, each once.
func (r *procsReader) pids(file string) ([]int, error) {
	var pids []int
	seen := map[int]bool{}
	if err := r.collect(r.dirFD, file, ".", true, seen, &pids); err != nil {
		return nil, err
	}
	return pids, nil
}

// collect adds the ids in file of the cgroup open as dirFD and of its
// descendants. A descendant (top false) removed meanwhile had none: skipped.
func (r *procsReader) collect(dirFD int, file, rel string, top bool, seen map[int]bool, pids *[]int) error {
	procs, err := unix.Openat(dirFD, file, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if !top && (errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENODEV)) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("open %s/%s: %w", rel, file, err)
	}
	b, err := r.readAll(procs)
	unix.Close(procs)
	if err != nil {
		return fmt.Errorf("read %s/%s: %w", rel, file, err)
	}
	for len(b) > 0 {
		var field []byte
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			field, b = b[:i], b[i+1:]
		} else {
			field, b = b, nil
		}
		if len(field) == 0 {
			continue
		}
		pid, err := strconv.Atoi(string(field))
		if err != nil {
			return fmt.Errorf("%s/%s: bad id %q", rel, file, field)
		}
		if !seen[pid] {
			seen[pid] = true
			*pids = append(*pids, pid)
		}
	}
	// A cgroup directory's link count is 2 + its child cgroups.
	var st unix.Stat_t
	if err := unix.Fstat(dirFD, &st); err == nil && st.Nlink == 2 {
		return nil
	}
	subdirs, err := r.subdirs(dirFD)
	if err != nil {
		return fmt.Errorf("list %s: %w", rel, err)
	}
	for _, name := range subdirs {
		child := rel + "/" + name
		fd, err := unix.Openat(dirFD, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if errors.Is(err, unix.ENOENT) {
			continue
		}
		if err != nil {
			return fmt.Errorf("open %s: %w", child, err)
		}
		err = r.collect(fd, file, child, false, seen, pids)
		unix.Close(fd)
		if err != nil {
			return err
		}
	}
	return nil
}

// readAll reads a whole cgroup file from offset 0 into r.buf (grown as
// needed); the result is valid until the next call.
func (r *procsReader) readAll(fd int) ([]byte, error) {
	n := 0
	for {
		if n == len(r.buf) {
			r.buf = append(r.buf, make([]byte, len(r.buf))...)
		}
		m, err := unix.Pread(fd, r.buf[n:], int64(n))
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return nil, err
		}
		if m == 0 {
			return r.buf[:n], nil
		}
		n += m
	}
}

// subdirs lists the directories (descendant cgroups) in the open directory
// fd, rewound first.
func (r *procsReader) subdirs(fd int) ([]string, error) {
	if _, err := unix.Seek(fd, 0, 0); err != nil {
		return nil, err
	}
	var names []string
	buf := r.dents
	for {
		n, err := unix.Getdents(fd, buf)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return nil, err
		}
		if n <= 0 {
			return names, nil
		}
		for b := buf[:n]; len(b) > 0; {
			// struct linux_dirent64: ino u64, off s64, reclen u16, type u8, name.
			reclen := int(*(*uint16)(unsafe.Pointer(&b[16])))
			if reclen < 20 || reclen > len(b) {
				return nil, fmt.Errorf("getdents: bad record length %d", reclen)
			}
			if b[18] == unix.DT_DIR {
				name := b[19:reclen]
				if i := bytes.IndexByte(name, 0); i >= 0 {
					name = name[:i]
				}
				if s := string(name); s != "." && s != ".." {
					names = append(names, s)
				}
			}
			b = b[reclen:]
		}
	}
}
