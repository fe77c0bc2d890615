package overlay

import (
	"archive/tar"
	"context"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// OCI layer whiteout names.
const (
	whiteoutPrefix = ".wh."
	opaqueMarker   = ".wh..wh..opq"
)

// LayerStats summarises a written layer.
type LayerStats struct {
	Entries int   // tar entries written (whiteouts and opaque markers included)
	Bytes   int64 // file content bytes written
}

// WriteLayer writes the uncompressed OCI layer tar of the capture m, whose
// file contents are in dataDir (the snapshot's data/ dir), to w. It reads
// nothing but dataDir. The output is deterministic: the same manifest and
// data give a byte-identical tar.
//
// Translation: a char device 0:0 (or an empty file with the overlay
// "whiteout" xattr) becomes "<dir>/.wh.<name>"; a dir with the overlay
// "opaque" xattr "y" is followed by "<dir>/.wh..wh..opq"; overlay xattrs
// (trusted.overlay.*, user.overlay.*) are dropped and every other xattr is
// kept as a SCHILY.xattr PAX record; names of one inode become tar hardlinks
// to the first name; sockets are skipped. Only the overlay prefix recorded
// in m (see Manifest.UserXattr) carries whiteout/opaque meaning.
func WriteLayer(ctx context.Context, w io.Writer, m *Manifest, dataDir string) (LayerStats, error) {
	entries, err := sortedEntries(m)
	if err != nil {
		return LayerStats{}, err
	}
	lw := &layerWriter{
		tw:      tar.NewWriter(w),
		dataDir: dataDir,
		prefix:  overlayPrefix(m.UserXattr),
		links:   map[uint64]string{},
	}
	for i := range entries {
		if err := ctx.Err(); err != nil {
			return lw.stats, err
		}
		if err := lw.writeEntry(&entries[i]); err != nil {
			return lw.stats, fmt.Errorf("write layer: %s: %w", entries[i].Path, err)
		}
	}
	if err := lw.tw.Close(); err != nil {
		return lw.stats, fmt.Errorf("write layer: %w", err)
	}
	return lw.stats, nil
}

// sortedEntries returns a sorted copy of m's entries after checking their paths.
func sortedEntries(m *Manifest) ([]Entry, error) {
	entries := append([]Entry(nil), m.Entries...)
	sort.Slice(entries, func(i, j int) bool { return entries[i].Path < entries[j].Path })
	for i, e := range entries {
		if !validRelPath(e.Path) {
			return nil, fmt.Errorf("write layer: invalid entry path %q", e.Path)
		}
		if strings.HasPrefix(path.Base(e.Path), whiteoutPrefix) {
			return nil, fmt.Errorf("write layer: %s: names starting with %q are reserved for whiteouts in OCI layers", e.Path, whiteoutPrefix)
		}
		if i > 0 && entries[i-1].Path == e.Path {
			return nil, fmt.Errorf("write layer: duplicate entry %q", e.Path)
		}
	}
	return entries, nil
}

// layerWriter holds the state of one WriteLayer.
type layerWriter struct {
	tw      *tar.Writer
	dataDir string
	prefix  string            // active overlay xattr prefix
	links   map[uint64]string // inode -> first path written, for hardlinks
	stats   LayerStats
}

// writeEntry writes the tar entries of one manifest entry.
func (lw *layerWriter) writeEntry(e *Entry) error {
	switch {
	case e.Type == TypeSocket:
		return nil
	case lw.isWhiteout(e):
		return lw.writeWhiteout(e)
	}
	hdr, err := lw.header(e)
	if err != nil {
		return err
	}
	switch e.Type {
	case TypeDir:
		return lw.writeDir(e, hdr)
	case TypeFile:
		return lw.writeFile(e, hdr)
	}
	return lw.writeHeader(hdr)
}

// isWhiteout reports whether e marks a deleted lower object.
func (lw *layerWriter) isWhiteout(e *Entry) bool {
	if e.Type == TypeChar && e.RdevMajor == 0 && e.RdevMinor == 0 {
		return true
	}
	_, xwhiteout := e.Xattrs[lw.prefix+"whiteout"]
	return e.Type == TypeFile && e.Size == 0 && xwhiteout
}

// writeWhiteout writes "<dir>/.wh.<name>" as an empty regular file.
func (lw *layerWriter) writeWhiteout(e *Entry) error {
	dir, name := path.Split(e.Path)
	return lw.writeHeader(&tar.Header{
		Typeflag: tar.TypeReg,
		Name:     dir + whiteoutPrefix + name,
		Mode:     int64(e.Mode & 0o7777),
		Uid:      e.UID,
		Gid:      e.GID,
		ModTime:  mtime(e),
		Format:   tar.FormatPAX,
	})
}

// writeDir writes a directory and, when it is opaque, its opaque marker.
func (lw *layerWriter) writeDir(e *Entry, hdr *tar.Header) error {
	if err := lw.writeHeader(hdr); err != nil {
		return err
	}
	if string(e.Xattrs[lw.prefix+"opaque"]) != "y" {
		return nil // "x" (xwhiteouts inside) is not opaque
	}
	return lw.writeHeader(&tar.Header{
		Typeflag: tar.TypeReg,
		Name:     e.Path + "/" + opaqueMarker,
		Mode:     int64(e.Mode & 0o7777),
		Uid:      e.UID,
		Gid:      e.GID,
		ModTime:  mtime(e),
		Format:   tar.FormatPAX,
	})
}

// writeFile writes a regular file, or a hardlink to an earlier name of its inode.
func (lw *layerWriter) writeFile(e *Entry, hdr *tar.Header) error {
	if e.Nlink > 1 {
		if first, ok := lw.links[e.Inode]; ok {
			hdr.Typeflag, hdr.Linkname, hdr.PAXRecords = tar.TypeLink, first, nil
			return lw.writeHeader(hdr)
		}
		lw.links[e.Inode] = e.Path
	}
	if e.Data == "" {
		if e.Size != 0 {
			return fmt.Errorf("regular file of %d bytes has no data file", e.Size)
		}
		return lw.writeHeader(hdr)
	}
	f, err := openData(lw.dataDir, e)
	if err != nil {
		return err
	}
	defer f.Close()
	hdr.Size = e.Size
	if err := lw.writeHeader(hdr); err != nil {
		return err
	}
	n, err := io.Copy(lw.tw, io.LimitReader(f, e.Size))
	lw.stats.Bytes += n
	if err != nil {
		return fmt.Errorf("copy data %s: %w", e.Data, err)
	}
	if n != e.Size {
		return fmt.Errorf("data %s ended after %d of %d bytes", e.Data, n, e.Size)
	}
	return nil
}

// openData opens e's data file and checks its size.
func openData(dataDir string, e *Entry) (*os.File, error) {
	if e.Data == "." || e.Data == ".." || strings.ContainsAny(e.Data, "/\x00") {
		return nil, fmt.Errorf("invalid data file name %q", e.Data)
	}
	p := filepath.Join(dataDir, e.Data)
	fd, err := unix.Open(p, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open data: %w", &os.PathError{Op: "open", Path: p, Err: err})
	}
	f := os.NewFile(uintptr(fd), p)
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("stat data: %w", err)
	}
	if !st.Mode().IsRegular() || st.Size() != e.Size {
		f.Close()
		return nil, fmt.Errorf("data file %s has %d bytes (mode %v), manifest says %d", p, st.Size(), st.Mode(), e.Size)
	}
	return f, nil
}

// header builds the deterministic tar header of e (without size).
func (lw *layerWriter) header(e *Entry) (*tar.Header, error) {
	hdr := &tar.Header{
		Name:    e.Path,
		Mode:    int64(e.Mode & 0o7777),
		Uid:     e.UID,
		Gid:     e.GID,
		ModTime: mtime(e),
		Format:  tar.FormatPAX,
	}
	switch e.Type {
	case TypeFile:
		hdr.Typeflag = tar.TypeReg
	case TypeDir:
		hdr.Typeflag, hdr.Name = tar.TypeDir, e.Path+"/"
	case TypeSymlink:
		hdr.Typeflag, hdr.Linkname = tar.TypeSymlink, e.Link
	case TypeFifo:
		hdr.Typeflag = tar.TypeFifo
	case TypeChar, TypeBlock:
		hdr.Typeflag = tar.TypeChar
		if e.Type == TypeBlock {
			hdr.Typeflag = tar.TypeBlock
		}
		hdr.Devmajor, hdr.Devminor = int64(e.RdevMajor), int64(e.RdevMinor)
	default:
		return nil, fmt.Errorf("unsupported entry type %q", e.Type)
	}
	recs, err := xattrRecords(e.Xattrs)
	if err != nil {
		return nil, err
	}
	hdr.PAXRecords = recs
	return hdr, nil
}

// xattrRecords turns the xattrs a layer keeps into PAX records.
func xattrRecords(xattrs map[string][]byte) (map[string]string, error) {
	var recs map[string]string
	for name, val := range xattrs {
		if isOverlayXattr(name) {
			continue
		}
		if name == "" || strings.ContainsAny(name, "=\x00") {
			return nil, fmt.Errorf("xattr name %q cannot be stored in a tar PAX record", name)
		}
		if recs == nil {
			recs = map[string]string{}
		}
		recs["SCHILY.xattr."+name] = string(val)
	}
	return recs, nil
}

// isOverlayXattr reports overlayfs' private xattrs (either prefix).
func isOverlayXattr(name string) bool {
	return strings.HasPrefix(name, "trusted.overlay.") || strings.HasPrefix(name, "user.overlay.")
}

func (lw *layerWriter) writeHeader(hdr *tar.Header) error {
	if err := lw.tw.WriteHeader(hdr); err != nil {
		return fmt.Errorf("tar header %s: %w", hdr.Name, err)
	}
	lw.stats.Entries++
	return nil
}

func mtime(e *Entry) time.Time { return time.Unix(0, e.MtimeNS) }
