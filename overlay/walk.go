package overlay

import (
	"context"
	"errors"
	"fmt"
	"unicode/utf8"

	"golang.org/x/sys/unix"
)

// resolveBeneath confines every openat2 of the capture to the directory it
// starts from: no "..", no symlinks (not even in the last component), no
// mount crossings.
const resolveBeneath = unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_XDEV

// walkFunc is called once per object below the walked root, a directory
// before its children. dirfd is an open fd of the object's parent directory
// and name the object's name in it; st is the object's lstat. fn may fill in
// e (e.g. e.Data) but must not keep dirfd.
type walkFunc func(dirfd int, name string, e *Entry, st *unix.Stat_t) error

// walker reads the metadata of a tree fd-relatively; it never opens anything
// but directories and never follows a symlink.
type walker struct {
	// dev is the device of the root: objects on another device are refused.
	dev uint64
	// exclude holds root-relative paths skipped with their subtree.
	exclude map[string]bool
	// beforeOpen, when set (tests only), runs just before a directory is opened.
	beforeOpen func(rel string)
	// direntBuf is reused by every getdents (names are copied out of it).
	direntBuf []byte
	// onError, when set, is offered the error of an object (or of a directory's
	// listing) at rel; if it returns nil the walk skips that object and its
	// subtree and goes on. Used while the tree is still changing (pre-copy).
	onError func(rel string, err error) error
}

// walk calls fn for every object below the directory rootfd, parents first,
// checking ctx between entries. rootfd itself is not reported.
func walk(ctx context.Context, rootfd int, w *walker, fn walkFunc) error {
	var st unix.Stat_t
	if err := unix.Fstat(rootfd, &st); err != nil {
		return fmt.Errorf("stat walk root: %w", err)
	}
	w.dev = uint64(st.Dev)
	return w.walkDir(ctx, rootfd, "", fn)
}

// walkDir reports the children of the directory dirfd (at rel) and descends.
func (w *walker) walkDir(ctx context.Context, dirfd int, rel string, fn walkFunc) error {
	if w.direntBuf == nil {
		w.direntBuf = make([]byte, 32*1024)
	}
	names, err := readDirNames(dirfd, w.direntBuf)
	if err != nil {
		return fmt.Errorf("read dir %q: %w", displayPath(rel), err)
	}
	for _, name := range names {
		if err := ctx.Err(); err != nil {
			return err
		}
		p := joinRel(rel, name)
		if w.exclude[p] {
			continue
		}
		if err := w.visit(ctx, dirfd, name, p, fn); err != nil {
			if w.onError == nil || ctx.Err() != nil {
				return err
			}
			if err := w.onError(p, err); err != nil {
				return err
			}
		}
	}
	return nil
}

// visit reports one object and, for a directory, its subtree.
func (w *walker) visit(ctx context.Context, dirfd int, name, rel string, fn walkFunc) error {
	e, st, fd, err := w.readEntry(dirfd, name, rel)
	if err != nil {
		return err
	}
	if fd < 0 {
		return fn(dirfd, name, e, st)
	}
	defer unix.Close(fd)
	if err := fn(dirfd, name, e, st); err != nil {
		return err
	}
	return w.walkDir(ctx, fd, e.Path, fn)
}

// readEntry reads the metadata of the object name in dirfd (at rel) without
// descending. For a directory it also returns an open fd of it (the caller
// closes it); for anything else fd is -1.
func (w *walker) readEntry(dirfd int, name, rel string) (e *Entry, st *unix.Stat_t, fd int, err error) {
	if !utf8.ValidString(name) {
		return nil, nil, -1, fmt.Errorf("capture %q: name is not valid UTF-8 and cannot be recorded", displayPath(rel))
	}
	st = new(unix.Stat_t)
	if err := unix.Fstatat(dirfd, name, st, unix.AT_SYMLINK_NOFOLLOW|unix.AT_NO_AUTOMOUNT); err != nil {
		return nil, nil, -1, fmt.Errorf("capture %s: stat: %w", rel, err)
	}
	if uint64(st.Dev) != w.dev {
		return nil, nil, -1, fmt.Errorf("capture %s: on another filesystem (a mount inside the upper dir?): refusing", rel)
	}
	if e, err = entryFromStat(rel, st); err != nil {
		return nil, nil, -1, err
	}
	if e.Type == TypeDir {
		fd, err := w.openDirEntry(dirfd, name, e, st)
		if err != nil {
			return nil, nil, -1, err
		}
		return e, st, fd, nil
	}
	if err := w.fillNonDir(dirfd, name, e); err != nil {
		return nil, nil, -1, err
	}
	return e, st, -1, nil
}

// openDirEntry opens a directory safely and records its xattrs in e.
func (w *walker) openDirEntry(dirfd int, name string, e *Entry, st *unix.Stat_t) (int, error) {
	if w.beforeOpen != nil {
		w.beforeOpen(e.Path)
	}
	fd, err := openDirBeneath(dirfd, name)
	if errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ELOOP) {
		return -1, fmt.Errorf("capture %s: open dir: %w (replaced while being captured: is the container frozen?)", e.Path, err)
	}
	if err != nil {
		return -1, fmt.Errorf("capture %s: open dir: %w", e.Path, err)
	}
	if err := sameObject(fd, st); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("capture %s: %w", e.Path, err)
	}
	if e.Xattrs, err = fdXattrs(fd); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("capture %s: %w", e.Path, err)
	}
	if err := checkXattrNames(e); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

// fillNonDir reads what a stat does not give for a non-directory: xattrs and
// a symlink's target. It never opens the object.
func (w *walker) fillNonDir(dirfd int, name string, e *Entry) error {
	var err error
	if e.Xattrs, err = pathXattrs(procFdPath(dirfd, name)); err != nil {
		return fmt.Errorf("capture %s: %w", e.Path, err)
	}
	if err := checkXattrNames(e); err != nil {
		return err
	}
	if e.Type != TypeSymlink {
		return nil
	}
	if e.Link, err = readlinkat(dirfd, name); err != nil {
		return fmt.Errorf("capture %s: readlink: %w", e.Path, err)
	}
	if !utf8.ValidString(e.Link) {
		return fmt.Errorf("capture %s: symlink target is not valid UTF-8 and cannot be recorded", e.Path)
	}
	return nil
}

// entryFromStat builds the metadata part of an Entry.
func entryFromStat(rel string, st *unix.Stat_t) (*Entry, error) {
	e := &Entry{
		Path:    rel,
		Mode:    st.Mode & 0o7777,
		UID:     int(st.Uid),
		GID:     int(st.Gid),
		MtimeNS: st.Mtim.Nano(),
		Nlink:   uint32(st.Nlink),
		Inode:   st.Ino,
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		e.Type, e.Size = TypeFile, st.Size
	case unix.S_IFDIR:
		e.Type = TypeDir
	case unix.S_IFLNK:
		e.Type = TypeSymlink
	case unix.S_IFIFO:
		e.Type = TypeFifo
	case unix.S_IFSOCK:
		e.Type = TypeSocket
	case unix.S_IFCHR, unix.S_IFBLK:
		e.Type = TypeChar
		if st.Mode&unix.S_IFMT == unix.S_IFBLK {
			e.Type = TypeBlock
		}
		e.RdevMajor, e.RdevMinor = unix.Major(uint64(st.Rdev)), unix.Minor(uint64(st.Rdev))
	default:
		return nil, fmt.Errorf("capture %s: unknown file type %#o", rel, st.Mode&unix.S_IFMT)
	}
	return e, nil
}

// openDirBeneath opens the directory name of dirfd without following symlinks
// or crossing mounts.
func openDirBeneath(dirfd int, name string) (int, error) {
	return openat2(dirfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC)
}

// openat2 opens name beneath dirfd with resolveBeneath, retrying on EINTR/EAGAIN.
func openat2(dirfd int, name string, flags uint64) (int, error) {
	how := &unix.OpenHow{Flags: flags, Resolve: resolveBeneath}
	for {
		fd, err := unix.Openat2(dirfd, name, how)
		if errors.Is(err, unix.EINTR) || errors.Is(err, unix.EAGAIN) {
			continue
		}
		return fd, err
	}
}

// sameObject checks that fd is the object st was taken of (guards against a
// swap between stat and open).
func sameObject(fd int, st *unix.Stat_t) error {
	var got unix.Stat_t
	if err := unix.Fstat(fd, &got); err != nil {
		return fmt.Errorf("fstat: %w", err)
	}
	if got.Dev != st.Dev || got.Ino != st.Ino || got.Mode&unix.S_IFMT != st.Mode&unix.S_IFMT {
		return errors.New("changed while being captured (is the container frozen?)")
	}
	return nil
}

// readDirNames lists a directory fd (without "." and "..") using buf for getdents.
func readDirNames(fd int, buf []byte) ([]string, error) {
	if _, err := unix.Seek(fd, 0, 0); err != nil {
		return nil, err
	}
	var names []string
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
		_, _, names = unix.ParseDirent(buf[:n], -1, names)
	}
}

// readlinkat reads a symlink's target; targets are shorter than PATH_MAX.
func readlinkat(dirfd int, name string) (string, error) {
	buf := make([]byte, unix.PathMax+1)
	n, err := unix.Readlinkat(dirfd, name, buf)
	if err != nil {
		return "", err
	}
	if n >= len(buf) {
		return "", errors.New("symlink target too long")
	}
	return string(buf[:n]), nil
}

// procFdPath names "name inside the directory fd" for path-based syscalls
// that must not follow the last component (llistxattr, lgetxattr).
func procFdPath(dirfd int, name string) string {
	return fmt.Sprintf("/proc/self/fd/%d/%s", dirfd, name)
}

func joinRel(dir, name string) string {
	if dir == "" {
		return name
	}
	return dir + "/" + name
}

func displayPath(rel string) string {
	if rel == "" {
		return "."
	}
	return rel
}
