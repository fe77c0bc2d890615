package main

import (
	"archive/tar"
	"bufio"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/klauspost/compress/gzip"
	"golang.org/x/sys/unix"

	"github.com/seamless-snapshot/seamless/integration/bench/contract"
)

// commitStats describes a layer built by commitLayer.
type commitStats struct {
	Entries      int   `json:"entries"`
	Uncompressed int64 `json:"tar_bytes"`
	Compressed   int64 `json:"layer_bytes"`
	DiffID       string
	Digest       string
}

// commitLayer builds the OCI layer of an overlay upper dir the way commit
// tools do (docker's overlay2 diff with the overlay whiteout converter,
// nerdctl/containerd's diff of the overlay snapshot): walk the upper dir in
// lexical order, write a tar with char 0:0 whiteouts turned into .wh.<name>
// files, an opaque marker after opaque dirs, hardlinks as tar links,
// security.capability kept and overlay xattrs dropped; gzip it while
// hashing the tar (diff id) and the blob (digest), write it to out and sync
// it. The start of the files keep selects (upper-relative paths, see
// writerKeep) is also returned, as it went into the tar.
func commitLayer(ctx context.Context, upper string, out *os.File, userXattr bool, keep func(string) (string, bool)) (map[string][]byte, commitStats, error) {
	var st commitStats
	blobHash, tarHash := sha256.New(), sha256.New()
	blob := &countWriter{w: io.MultiWriter(out, blobHash)}
	bw := bufio.NewWriterSize(blob, 1<<20)
	gz, err := gzip.NewWriterLevel(bw, gzip.DefaultCompression)
	if err != nil {
		return nil, st, err
	}
	raw := &countWriter{w: io.MultiWriter(gz, tarHash)}
	cw := &committer{tw: tar.NewWriter(raw), links: map[uint64]string{}, keep: keep, got: map[string][]byte{},
		opaque: overlayXattr(userXattr, "opaque"), buf: make([]byte, 32<<10)}
	walkErr := filepath.WalkDir(upper, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if p == upper {
			return nil
		}
		return cw.add(p, filepath.ToSlash(strings.TrimPrefix(p, upper+"/")))
	})
	if walkErr != nil {
		return nil, st, fmt.Errorf("commit layer: %w", walkErr)
	}
	for _, c := range []io.Closer{cw.tw, gz} {
		if err := c.Close(); err != nil {
			return nil, st, fmt.Errorf("commit layer: %w", err)
		}
	}
	if err := bw.Flush(); err != nil {
		return nil, st, fmt.Errorf("commit layer: %w", err)
	}
	if err := out.Sync(); err != nil {
		return nil, st, fmt.Errorf("commit layer: sync: %w", err)
	}
	st.Entries, st.Uncompressed, st.Compressed = cw.entries, raw.n, blob.n
	st.DiffID, st.Digest = fmt.Sprintf("sha256:%x", tarHash.Sum(nil)), fmt.Sprintf("sha256:%x", blobHash.Sum(nil))
	return cw.got, st, nil
}

// overlayXattr is overlayfs' xattr name for key under the mount's prefix.
func overlayXattr(userXattr bool, key string) string {
	if userXattr {
		return "user.overlay." + key
	}
	return "trusted.overlay." + key
}

// committer writes the tar entries of one commitLayer.
type committer struct {
	tw      *tar.Writer
	links   map[uint64]string // inode -> first name, for hardlinks
	keep    func(string) (string, bool)
	got     map[string][]byte
	opaque  string // the opaque-dir xattr name
	buf     []byte
	entries int
}

// add writes the entries of the object at p (name: upper-relative).
func (cw *committer) add(p, name string) error {
	fi, err := os.Lstat(p)
	if err != nil {
		return err
	}
	sys, _ := fi.Sys().(*syscall.Stat_t)
	if fi.Mode()&fs.ModeSocket != 0 {
		return nil
	}
	if fi.Mode()&fs.ModeCharDevice != 0 && sys != nil && sys.Rdev == 0 {
		return cw.whiteout(name, fi, sys)
	}
	hdr, err := cw.header(p, name, fi, sys)
	if err != nil {
		return err
	}
	if err := cw.write(hdr); err != nil {
		return err
	}
	switch {
	case fi.IsDir():
		return cw.opaqueMarker(p, hdr)
	case hdr.Typeflag == tar.TypeReg && hdr.Size > 0:
		return cw.copyData(p, name, hdr.Size)
	}
	return nil
}

// header builds a tar header like archive.FileInfoHeader: numeric owners,
// PAX, security.capability, hardlinks by inode.
func (cw *committer) header(p, name string, fi fs.FileInfo, sys *syscall.Stat_t) (*tar.Header, error) {
	link := ""
	if fi.Mode()&fs.ModeSymlink != 0 {
		var err error
		if link, err = os.Readlink(p); err != nil {
			return nil, err
		}
	}
	hdr, err := tar.FileInfoHeader(fi, link)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	hdr.Name, hdr.Format, hdr.Uname, hdr.Gname = name, tar.FormatPAX, "", ""
	if fi.IsDir() {
		hdr.Name += "/"
	}
	if sys != nil {
		hdr.Uid, hdr.Gid = int(sys.Uid), int(sys.Gid)
		if fi.Mode().IsRegular() && sys.Nlink > 1 {
			if first, ok := cw.links[sys.Ino]; ok {
				hdr.Typeflag, hdr.Linkname, hdr.Size = tar.TypeLink, first, 0
			} else {
				cw.links[sys.Ino] = name
			}
		}
	}
	if capability := lgetxattr(p, "security.capability"); capability != nil {
		hdr.PAXRecords = map[string]string{"SCHILY.xattr.security.capability": string(capability)}
	}
	return hdr, nil
}

// whiteout writes the .wh.<name> file of a deleted lower entry.
func (cw *committer) whiteout(name string, fi fs.FileInfo, sys *syscall.Stat_t) error {
	dir, base := path.Split(name)
	return cw.write(&tar.Header{
		Typeflag: tar.TypeReg, Name: dir + ".wh." + base, Mode: 0o600,
		Uid: int(sys.Uid), Gid: int(sys.Gid), ModTime: fi.ModTime(), Format: tar.FormatPAX,
	})
}

// opaqueMarker writes <dir>/.wh..wh..opq after an opaque directory.
func (cw *committer) opaqueMarker(p string, dir *tar.Header) error {
	if string(lgetxattr(p, cw.opaque)) != "y" {
		return nil
	}
	return cw.write(&tar.Header{
		Typeflag: tar.TypeReg, Name: dir.Name + ".wh..wh..opq", Mode: dir.Mode & 0o777,
		Uid: dir.Uid, Gid: dir.Gid, ModTime: dir.ModTime, Format: tar.FormatPAX,
	})
}

// copyData copies a regular file's content into the tar.
func (cw *committer) copyData(p, name string, size int64) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	var w io.Writer = cw.tw
	kept, keepName := &prefixBuffer{n: contract.CounterWidth}, ""
	if k, ok := cw.keep(name); ok {
		keepName = k
		w = io.MultiWriter(cw.tw, kept)
	}
	n, err := io.CopyBuffer(w, io.LimitReader(f, size), cw.buf)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	if n != size {
		return fmt.Errorf("%s: %d of %d bytes (changed while being committed?)", name, n, size)
	}
	if keepName != "" {
		cw.got[keepName] = kept.b
	}
	return nil
}

func (cw *committer) write(hdr *tar.Header) error {
	if err := cw.tw.WriteHeader(hdr); err != nil {
		return fmt.Errorf("%s: %w", hdr.Name, err)
	}
	cw.entries++
	return nil
}

// lgetxattr returns an xattr's value, nil when absent.
func lgetxattr(p, attr string) []byte {
	buf := make([]byte, 256)
	n, err := unix.Lgetxattr(p, attr, buf)
	if err != nil || n <= 0 {
		return nil
	}
	return buf[:n]
}

// prefixBuffer keeps the first n bytes written through it.
type prefixBuffer struct {
	n int
	b []byte
}

func (p *prefixBuffer) Write(b []byte) (int, error) {
	if room := p.n - len(p.b); room > 0 {
		p.b = append(p.b, b[:min(room, len(b))]...)
	}
	return len(b), nil
}

// countWriter counts the bytes written through it.
type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.n += int64(n)
	return n, err
}
