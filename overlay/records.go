package overlay

import (
	"path"
	"sort"
	"strconv"
)

// record is what a pre-copy knows of one upper object: its manifest entry
// (Data names the staged content of a regular file) plus what a metadata
// rescan needs to tell whether the staged data may be stale.
type record struct {
	Entry
	ctimeNS int64 // status change time at the stat
	statNS  int64 // wall clock just before the stat (racy-timestamp check)
}

// tombKey names an unlinked name: the inode of its directory and the name.
type tombKey struct {
	dirIno uint64
	name   string
}

// store holds the records of a pre-copy, indexed for the resync, and the
// staged data files (one per inode, like Capture; rewritten in place).
type store struct {
	records  map[string]*record
	children map[string]map[string]struct{} // dir path -> paths of its recorded children
	byIno    map[uint64]map[string]struct{} // inode -> recorded paths (hardlinks)
	dataOf   map[uint64]string              // inode -> its data file
	dataIno  map[string]uint64              // data file -> inode, for every live data file
	free     []string                       // data files no inode uses: reused (rewritten in place)
	// tombs remembers the inodes of removed names of hardlinked files: a
	// write through a descriptor of such a name is reported under that name,
	// and must still dirty the inode's other names.
	tombs map[tombKey]map[uint64]struct{}
	// external holds the non-directory inodes with more links than recorded
	// names: links in the workdir (overlay's shared whiteout) or in excluded
	// dirs, whose changes raise no event that names a recorded path.
	external map[uint64]bool
	rootIno  uint64
	nextID   int
}

func newStore(rootIno uint64) *store {
	return &store{
		records:  map[string]*record{},
		children: map[string]map[string]struct{}{},
		byIno:    map[uint64]map[string]struct{}{},
		dataOf:   map[uint64]string{},
		dataIno:  map[string]uint64{},
		tombs:    map[tombKey]map[uint64]struct{}{},
		external: map[uint64]bool{},
		rootIno:  rootIno,
	}
}

// put records r (replacing the record at its path, not the path's subtree).
func (s *store) put(r *record) {
	p := r.Path
	if old := s.records[p]; old != nil && old.Inode != r.Inode {
		s.unlinkIno(old.Inode, p)
	}
	s.records[p] = r
	parent := parentPath(p)
	kids := s.children[parent]
	if kids == nil {
		kids = map[string]struct{}{}
		s.children[parent] = kids
	}
	kids[p] = struct{}{}
	names := s.byIno[r.Inode]
	if names == nil {
		names = map[string]struct{}{}
		s.byIno[r.Inode] = names
	}
	names[p] = struct{}{}
	s.checkExternal(r.Inode)
}

// checkExternal updates whether ino has links outside the recorded names.
func (s *store) checkExternal(ino uint64) {
	for p := range s.byIno[ino] {
		r := s.records[p]
		if r != nil && r.Type != TypeDir && int(r.Nlink) > len(s.byIno[ino]) {
			s.external[ino] = true
			return
		}
		break
	}
	delete(s.external, ino)
}

// anyName returns one recorded path of ino.
func (s *store) anyName(ino uint64) (string, bool) {
	for p := range s.byIno[ino] {
		return p, true
	}
	return "", false
}

// removeTree forgets p and everything recorded below it, calling removed (if
// not nil) with each record forgotten.
func (s *store) removeTree(p string, removed func(*record)) {
	for kid := range s.children[p] {
		s.removeTree(kid, removed)
	}
	delete(s.children, p)
	if r := s.records[p]; r != nil {
		s.remove(p)
		if removed != nil {
			removed(r)
		}
	}
}

// remove forgets the record at p (not its children).
func (s *store) remove(p string) {
	r := s.records[p]
	if r == nil {
		return
	}
	parent := parentPath(p)
	if r.Type == TypeFile && r.Nlink > 1 {
		s.bury(parent, path.Base(p), r.Inode)
	}
	delete(s.records, p)
	if kids := s.children[parent]; kids != nil {
		delete(kids, p)
		if len(kids) == 0 {
			delete(s.children, parent)
		}
	}
	s.unlinkIno(r.Inode, p)
}

// bury remembers that name in the directory at dir was a name of ino.
func (s *store) bury(dir, name string, ino uint64) {
	dirIno := s.rootIno
	if dir != "" {
		d := s.records[dir]
		if d == nil {
			return
		}
		dirIno = d.Inode
	}
	k := tombKey{dirIno: dirIno, name: name}
	if s.tombs[k] == nil {
		s.tombs[k] = map[uint64]struct{}{}
	}
	s.tombs[k][ino] = struct{}{}
}

// unlinkIno drops p from ino's names; an inode without names frees its data file.
func (s *store) unlinkIno(ino uint64, p string) {
	names := s.byIno[ino]
	delete(names, p)
	if len(names) > 0 {
		s.checkExternal(ino)
		return
	}
	delete(s.external, ino)
	delete(s.byIno, ino)
	if d, ok := s.dataOf[ino]; ok {
		delete(s.dataOf, ino)
		delete(s.dataIno, d)
		s.free = append(s.free, d)
	}
}

// dataFile returns the data file of ino, assigning one (a free one first).
func (s *store) dataFile(ino uint64) string {
	if d, ok := s.dataOf[ino]; ok {
		return d
	}
	var d string
	if n := len(s.free); n > 0 {
		d, s.free = s.free[n-1], s.free[:n-1]
	} else {
		s.nextID++
		d = strconv.Itoa(s.nextID)
	}
	s.dataOf[ino] = d
	s.dataIno[d] = ino
	return d
}

// names returns the recorded paths of ino.
func (s *store) names(ino uint64) map[string]struct{} { return s.byIno[ino] }

// entries returns the manifest entries, sorted by path like Capture's.
func (s *store) entries() []Entry {
	out := make([]Entry, 0, len(s.records))
	for _, r := range s.records {
		out = append(out, r.Entry)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Path < out[j].Path })
	return out
}

// unused lists data files that no entry references.
func (s *store) unused(entries []Entry) []string {
	used := make(map[string]bool, len(entries))
	for i := range entries {
		if entries[i].Data != "" {
			used[entries[i].Data] = true
		}
	}
	var out []string
	for d := range s.dataIno {
		if !used[d] {
			out = append(out, d)
		}
	}
	return append(out, s.free...)
}

// parentPath is the upper-relative path of p's directory ("" for the root).
func parentPath(p string) string {
	d := path.Dir(p)
	if d == "." {
		return ""
	}
	return d
}
