package overlay

import (
	"fmt"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// heldFile is an upper file mapped shared and writable, with its data file,
// both kept open from Prepare to the pause: stores through the mapping raise
// no event, so every pause copies it again, and with the descriptors at hand
// that is an fstat, a read and a write instead of path walks, opens and an
// xattr listing.
type heldFile struct {
	src, dst int         // the upper file (read-only) and its staged data file
	st       unix.Stat_t // the upper file when it was opened
}

// holdMapped opens the upper files at rels (Prepare's mapped files, just
// staged) and their data files, replacing what was held before. Files that
// cannot be held are left to the pause's ordinary re-capture.
func (p *Precopy) holdMapped(rels map[string]bool) {
	p.releaseHeld()
	for rel := range rels {
		r := p.store.records[rel]
		if r == nil || r.Type != TypeFile || r.Data == "" || len(p.store.names(r.Inode)) > 1 {
			continue // empty files and hardlinks take the ordinary path
		}
		src, st, err := openRegularBeneath(p.upperFd, rel)
		if err != nil {
			continue
		}
		if st.Ino != r.Inode {
			unix.Close(src)
			continue
		}
		dst, err := unix.Open(filepath.Join(p.dataDir, r.Data), unix.O_WRONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			unix.Close(src)
			continue
		}
		if p.held == nil {
			p.held = map[string]*heldFile{}
		}
		p.held[rel] = &heldFile{src: src, dst: dst, st: *st}
	}
}

// releaseHeld closes the held files.
func (p *Precopy) releaseHeld() {
	for _, h := range p.held {
		unix.Close(h.src)
		unix.Close(h.dst)
	}
	p.held = nil
}

// recopyHeld re-copies the held file at rel (frozen) and updates its record.
// It reports false, having changed nothing, when rel is not held or no longer
// holds what was opened (another inode, other metadata, more names): the
// caller then re-captures rel the ordinary way.
//
// Only call it for a rel that the pause's dirty set left alone: with no
// event on its names since the file was opened, rel still names that inode,
// and only what stores through a mapping change (data, mtime, ctime) can
// differ; anything else (chmod, chown, xattrs, links, truncate) raises an
// event, or is caught here by comparing the inode's status.
func (p *Precopy) recopyHeld(rel string, fs *FinishStats) (bool, error) {
	h := p.held[rel]
	r := p.store.records[rel]
	if h == nil || r == nil || r.Inode != h.st.Ino || len(p.store.names(r.Inode)) > 1 {
		return false, nil
	}
	statNS := time.Now().UnixNano()
	var st unix.Stat_t
	if err := unix.Fstat(h.src, &st); err != nil {
		return false, nil
	}
	if st.Ino != h.st.Ino || st.Mode != h.st.Mode || st.Uid != h.st.Uid || st.Gid != h.st.Gid ||
		st.Nlink != h.st.Nlink || uint32(st.Nlink) != r.Nlink || st.Size != r.Size {
		return false, nil
	}
	for _, fd := range []int{h.src, h.dst} {
		if _, err := unix.Seek(fd, 0, 0); err != nil {
			return false, nil
		}
	}
	n, _, err := p.copier.copySized(h.src, h.dst, st.Size, pausePlainCopy)
	if err == nil && n != st.Size {
		err = fmt.Errorf("copied %d bytes but the file has %d: %w", n, st.Size, errChanged)
	}
	if err != nil {
		return true, fmt.Errorf("capture %s: %w", rel, err)
	}
	nr := *r
	nr.MtimeNS, nr.ctimeNS, nr.statNS = st.Mtim.Nano(), st.Ctim.Nano(), statNS
	p.store.put(&nr)
	p.copiedData++
	fs.DirtyEntries++
	fs.MappedHeld++
	fs.Files++
	fs.Bytes += n
	return true, nil
}
