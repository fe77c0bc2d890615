package overlay

import (
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"

	"golang.org/x/sys/unix"
)

// fdXattrs reads all xattrs of an open (non-O_PATH) fd.
func fdXattrs(fd int) (map[string][]byte, error) {
	return readXattrs(
		func(b []byte) (int, error) { return unix.Flistxattr(fd, b) },
		func(name string, b []byte) (int, error) { return unix.Fgetxattr(fd, name, b) },
	)
}

// pathXattrs reads all xattrs of p itself (never following a final symlink).
func pathXattrs(p string) (map[string][]byte, error) {
	return readXattrs(
		func(b []byte) (int, error) { return unix.Llistxattr(p, b) },
		func(name string, b []byte) (int, error) { return unix.Lgetxattr(p, name, b) },
	)
}

// readXattrs lists and reads xattrs through the given syscalls. A filesystem
// without xattr support yields no xattrs.
func readXattrs(list func([]byte) (int, error), get func(string, []byte) (int, error)) (map[string][]byte, error) {
	raw, err := sizedRead(list)
	if errors.Is(err, unix.ENOTSUP) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list xattrs: %w", err)
	}
	var out map[string][]byte
	for _, name := range strings.Split(string(raw), "\x00") {
		if name == "" {
			continue
		}
		val, err := sizedRead(func(b []byte) (int, error) { return get(name, b) })
		if errors.Is(err, unix.ENODATA) {
			continue // removed between list and get
		}
		if err != nil {
			return nil, fmt.Errorf("get xattr %s: %w", name, err)
		}
		if out == nil {
			out = map[string][]byte{}
		}
		out[name] = val
	}
	return out, nil
}

// sizedRead calls an xattr syscall first for the size, then with a buffer,
// retrying when the value grew in between (ERANGE).
func sizedRead(call func([]byte) (int, error)) ([]byte, error) {
	for {
		n, err := call(nil)
		if err != nil {
			return nil, err
		}
		if n == 0 {
			return []byte{}, nil
		}
		buf := make([]byte, n)
		n, err = call(buf)
		if errors.Is(err, unix.ERANGE) {
			continue
		}
		if err != nil {
			return nil, err
		}
		return buf[:n], nil
	}
}

// checkXattrNames refuses xattr names a JSON manifest cannot carry verbatim.
func checkXattrNames(e *Entry) error {
	for name := range e.Xattrs {
		if !utf8.ValidString(name) {
			return fmt.Errorf("capture %s: xattr name %q is not valid UTF-8 and cannot be recorded", e.Path, name)
		}
	}
	return nil
}
