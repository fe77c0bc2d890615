package overlay

import (
	"errors"
	"fmt"
	"strconv"

	"golang.org/x/sys/unix"
)

// copier copies regular files' data, remembering per capture which faster
// methods the filesystems refused so they are not retried for every file.
type copier struct {
	noClone bool   // FICLONE is unsupported between source and destination
	noRange bool   // copy_file_range is unsupported between them
	buf     []byte // read/write fallback buffer, allocated on first use
	small   []byte // buffer of plain copies (copyData's plainBelow)
}

// pausePlainCopy is the plainBelow of copies made in or right before a
// pause: sharing extents (FICLONE, or copy_file_range on XFS and btrfs)
// first writes the source's dirty pages back to disk, which costs far more
// than copying a small file through the page cache.
const pausePlainCopy = 64 << 10

// copyResult describes one copied file.
type copyResult struct {
	Size      int64  // bytes in the copy
	Ino       uint64 // inode of the source as opened
	Reflinked bool   // the copy shares extents with the source (FICLONE)
}

// copyData copies the regular file name, resolved beneath srcDirFd (it may
// have several components), into dst (created with mode 0600, or rewritten
// in place and trimmed: much cheaper than truncating it first on some
// filesystems). The source is opened O_PATH first and only reopened for
// reading once it is known to be a regular file, so a fifo or device node is
// never opened. The copy must have exactly the source's size at open time.
// Files smaller than plainBelow bytes are copied with read and write.
func (c *copier) copyData(srcDirFd int, name, dst string, plainBelow int64) (copyResult, error) {
	src, st, err := openRegularBeneath(srcDirFd, name)
	if err != nil {
		return copyResult{}, err
	}
	defer unix.Close(src)
	out, err := unix.Open(dst, unix.O_WRONLY|unix.O_CREAT|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return copyResult{}, fmt.Errorf("create %s: %w", dst, err)
	}
	defer unix.Close(out)
	res := copyResult{Ino: st.Ino}
	res.Size, res.Reflinked, err = c.copySized(src, out, st.Size, plainBelow)
	if err == nil {
		err = trimTo(out, res.Size)
	}
	if err != nil {
		return res, fmt.Errorf("copy to %s: %w", dst, err)
	}
	if res.Size != st.Size {
		return res, fmt.Errorf("copy to %s: copied %d bytes but the file has %d (changed while being captured?)", dst, res.Size, st.Size)
	}
	return res, nil
}

// copySized copies src over dst, both opened afresh or rewound to their
// start, choosing by the source's size: read and write below plainBelow,
// copyFd otherwise.
func (c *copier) copySized(src, dst int, size, plainBelow int64) (n int64, reflinked bool, err error) {
	if size < plainBelow {
		n, err = c.copySmall(src, dst)
		return n, false, err
	}
	return c.copyFd(src, dst)
}

// trimTo cuts fd to size when an earlier, longer content was overwritten.
func trimTo(fd int, size int64) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("fstat copy: %w", err)
	}
	if st.Size <= size {
		return nil
	}
	if err := unix.Ftruncate(fd, size); err != nil {
		return fmt.Errorf("trim copy: %w", err)
	}
	return nil
}

// openRegularBeneath opens name beneath dirfd for reading, refusing anything
// but a regular file before it is opened for real.
func openRegularBeneath(dirfd int, name string) (int, *unix.Stat_t, error) {
	pfd, err := openat2(dirfd, name, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC)
	if err != nil {
		return -1, nil, fmt.Errorf("open: %w", err)
	}
	defer unix.Close(pfd)
	var st unix.Stat_t
	if err := unix.Fstat(pfd, &st); err != nil {
		return -1, nil, fmt.Errorf("fstat: %w", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return -1, nil, fmt.Errorf("not a regular file (mode %#o): changed while being captured?", st.Mode)
	}
	// Reopening through the O_PATH fd's magic link reaches exactly that inode.
	fd, err := unix.Open("/proc/self/fd/"+strconv.Itoa(pfd), unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
	if err != nil {
		return -1, nil, fmt.Errorf("reopen for reading: %w", err)
	}
	if err := sameObject(fd, &st); err != nil {
		unix.Close(fd)
		return -1, nil, err
	}
	return fd, &st, nil
}

// copyFd copies src (from its start) over dst (from its start; the caller
// trims dst to n): FICLONE, else copy_file_range, else read/write.
func (c *copier) copyFd(src, dst int) (n int64, reflinked bool, err error) {
	if !c.noClone {
		err := unix.IoctlFileClone(dst, src)
		if err == nil {
			var st unix.Stat_t
			if err := unix.Fstat(src, &st); err != nil {
				return 0, false, fmt.Errorf("fstat clone source: %w", err)
			}
			return st.Size, true, nil
		}
		if permanentlyUnsupported(err) {
			c.noClone = true
		}
	}
	if !c.noRange {
		n, err = copyRange(src, dst)
		if err == nil {
			return n, false, nil
		}
		if !fallbackErr(err) {
			return n, false, fmt.Errorf("copy_file_range: %w", err)
		}
		if permanentlyUnsupported(err) {
			c.noRange = true
		}
	}
	m, err := c.readWrite(src, dst)
	return n + m, false, err
}

// copyRange copies with copy_file_range until EOF. On error, the bytes
// copied so far are returned and both offsets stay consistent, so a
// read/write fallback can continue.
func copyRange(src, dst int) (int64, error) {
	var total int64
	for {
		n, err := unix.CopyFileRange(src, nil, dst, nil, 1<<30, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return total, err
		}
		if n == 0 {
			return total, nil
		}
		total += int64(n)
	}
}

// readWrite copies src to dst until EOF through a buffer.
func (c *copier) readWrite(src, dst int) (int64, error) {
	if c.buf == nil {
		c.buf = make([]byte, 1<<20)
	}
	return copyThrough(src, dst, c.buf)
}

// copySmall copies a small file with read and write through a buffer kept
// for such copies (one read and one write, plus the read at EOF).
func (c *copier) copySmall(src, dst int) (int64, error) {
	if c.small == nil {
		c.small = make([]byte, pausePlainCopy)
	}
	return copyThrough(src, dst, c.small)
}

// copyThrough copies src to dst from their current offsets to src's EOF
// with read and write through buf.
func copyThrough(src, dst int, buf []byte) (int64, error) {
	var total int64
	for {
		n, err := unix.Read(src, buf)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return total, fmt.Errorf("read: %w", err)
		}
		if n == 0 {
			return total, nil
		}
		if err := writeAll(dst, buf[:n]); err != nil {
			return total, fmt.Errorf("write: %w", err)
		}
		total += int64(n)
	}
}

func writeAll(fd int, b []byte) error {
	for len(b) > 0 {
		n, err := unix.Write(fd, b)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}

// fallbackErr reports errors after which a plainer copy method may work.
func fallbackErr(err error) bool {
	return errors.Is(err, unix.EXDEV) || errors.Is(err, unix.EINVAL) ||
		errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) ||
		errors.Is(err, unix.ENOTTY)
}

// permanentlyUnsupported reports errors that will repeat for every file of
// the same pair of filesystems.
func permanentlyUnsupported(err error) bool {
	return errors.Is(err, unix.EXDEV) || errors.Is(err, unix.EOPNOTSUPP) ||
		errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.ENOTTY)
}
