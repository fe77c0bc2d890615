package overlay

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"runtime"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// sharedMapping is one shared, writable file mapping of a process: stores
// through it change the file without any fanotify event.
type sharedMapping struct {
	pid      int
	addr     string // "start-end", the name under /proc/<pid>/map_files
	dev, ino uint64 // as maps shows them: the overlay's (user-visible) inode
	path     string // as maps shows it, without " (deleted)"
	deleted  bool
}

// procmapQuery is struct procmap_query (linux/fs.h, Linux 6.11+): one
// PROCMAP_QUERY ioctl on /proc/<pid>/maps finds the next VMA matching flags,
// filtered in the kernel instead of formatting every VMA as text.
type procmapQuery struct {
	Size, QueryFlags, QueryAddr, VMAStart, VMAEnd, VMAFlags, VMAPageSize, VMAOffset, Inode uint64
	DevMajor, DevMinor, VMANameSize, BuildIDSize                                           uint32
	VMANameAddr, BuildIDAddr                                                               uint64
}

// PROCMAP_QUERY = _IOWR('f', 17, struct procmap_query) and its query flags.
const (
	procmapQueryReq         = 3<<30 | uintptr(unsafe.Sizeof(procmapQuery{}))<<16 | 'f'<<8 | 17
	procmapWritable         = 0x02
	procmapShared           = 0x08
	procmapCoveringOrNext   = 0x10
	procmapFileBacked       = 0x20
	procmapSharedFileWrites = procmapCoveringOrNext | procmapWritable | procmapShared | procmapFileBacked
)

// mapsReader lists shared writable file mappings, with PROCMAP_QUERY when the
// kernel has it and by parsing the maps text otherwise.
type mapsReader struct {
	noQuery bool   // PROCMAP_QUERY is not supported
	name    []byte // heap buffer the kernel writes VMA names into
	text    []byte // buffer for the text format
	// held are maps files kept open by hold (pid -> fd); useHeld says read
	// may query them instead of opening the pid's maps afresh.
	held    map[int]int
	useHeld bool
}

// maxHeldMaps bounds the processes whose maps files hold keeps open (and
// compares pairwise with kcmp).
const maxHeldMaps = 64

// kcmpVM is KCMP_VM (linux/kcmp.h): do two processes share one address space?
const kcmpVM = 1

// hold opens and keeps the maps files of pids, so that a later read of the
// same processes costs one PROCMAP_QUERY ioctl per matching mapping instead
// of a procfs lookup, a ptrace access check and a close per process.
//
// An open maps file stays bound to the address space the process had at
// open time. When the process execs, that address space dies and the query
// fails with ESRCH (read then opens the maps afresh), unless another process
// still uses it: nothing is held when two of pids share an address space
// (vfork, clone(CLONE_VM)), and the caller must not use the held files when
// a process appeared since (enableHeld).
func (r *mapsReader) hold(pids []int) {
	r.release()
	if r.noQuery || len(pids) > maxHeldMaps {
		return
	}
	for i, a := range pids {
		for _, b := range pids[i+1:] {
			same, _, errno := unix.Syscall6(unix.SYS_KCMP, uintptr(a), uintptr(b), kcmpVM, 0, 0, 0)
			if errno != 0 && errno != unix.ESRCH {
				return // no kcmp: sharing cannot be ruled out
			}
			if errno == 0 && same == 0 {
				return
			}
		}
	}
	r.held = make(map[int]int, len(pids))
	for _, pid := range pids {
		if fd, err := openMaps(pid); err == nil {
			r.held[pid] = fd
		}
	}
}

// enableHeld lets read use the held maps files if every one of pids was
// there when they were opened (no process was created or moved in since).
func (r *mapsReader) enableHeld(pids []int) {
	r.useHeld = r.held != nil
	for _, pid := range pids {
		if _, ok := r.held[pid]; !ok {
			r.useHeld = false
			return
		}
	}
}

// release closes the held maps files.
func (r *mapsReader) release() {
	for _, fd := range r.held {
		unix.Close(fd)
	}
	r.held, r.useHeld = nil, false
}

// openMaps opens /proc/<pid>/maps.
func openMaps(pid int) (int, error) {
	return unix.Open("/proc/"+strconv.Itoa(pid)+"/maps", unix.O_RDONLY|unix.O_CLOEXEC, 0)
}

// read lists the shared writable file mappings of pid. A process that is
// gone has none.
func (r *mapsReader) read(pid int) ([]sharedMapping, error) {
	if fd, ok := r.held[pid]; ok && r.useHeld {
		out, err := r.query(pid, fd)
		if err == nil {
			return out, nil
		}
		if !errors.Is(err, unix.ESRCH) && !queryUnsupported(err) {
			return nil, fmt.Errorf("query maps of pid %d: %w", pid, err)
		}
		// The address space it was opened on is gone (exec, exit, pid
		// reused), or the query needs the text: look at the process afresh.
	}
	fd, err := openMaps(pid)
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("open maps of pid %d: %w", pid, err)
	}
	defer unix.Close(fd)
	if !r.noQuery {
		out, err := r.query(pid, fd)
		if err == nil {
			return out, nil
		}
		if errors.Is(err, unix.ESRCH) {
			return nil, nil // exited after the open
		}
		if !queryUnsupported(err) {
			return nil, fmt.Errorf("query maps of pid %d: %w", pid, err)
		}
		r.noQuery = !errors.Is(err, unix.ENAMETOOLONG)
	}
	return r.parseText(pid, fd)
}

// queryUnsupported reports whether a PROCMAP_QUERY error sends read to the
// text format: the kernel lacks the ioctl (ENOTTY, EINVAL), or a name did
// not fit the buffer (ENAMETOOLONG, for that process only).
func queryUnsupported(err error) bool {
	return errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENAMETOOLONG)
}

// query walks the matching VMAs of an open maps file with PROCMAP_QUERY.
func (r *mapsReader) query(pid, fd int) ([]sharedMapping, error) {
	if r.name == nil {
		r.name = make([]byte, unix.PathMax+len(" (deleted)")+1)
	}
	var out []sharedMapping
	for addr := uint64(0); ; {
		q := procmapQuery{
			Size: uint64(unsafe.Sizeof(procmapQuery{})), QueryFlags: procmapSharedFileWrites, QueryAddr: addr,
			VMANameSize: uint32(len(r.name)), VMANameAddr: uint64(uintptr(unsafe.Pointer(&r.name[0]))),
		}
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), procmapQueryReq, uintptr(unsafe.Pointer(&q)))
		runtime.KeepAlive(r.name)
		if errno == unix.ENOENT {
			return out, nil
		}
		if errno != 0 {
			return nil, errno
		}
		m := sharedMapping{
			pid: pid, addr: fmt.Sprintf("%x-%x", q.VMAStart, q.VMAEnd),
			dev: unix.Mkdev(q.DevMajor, q.DevMinor), ino: q.Inode, path: cString(r.name[:q.VMANameSize]),
		}
		if p, ok := strings.CutSuffix(m.path, " (deleted)"); ok {
			m.path, m.deleted = p, true
		}
		if m.ino != 0 {
			out = append(out, m)
		}
		addr = q.VMAEnd
	}
}

// parseText reads and parses the maps text of an open maps file.
func (r *mapsReader) parseText(pid, fd int) ([]sharedMapping, error) {
	if r.text == nil {
		r.text = make([]byte, 0, 256<<10)
	}
	b := r.text[:0]
	for {
		if len(b) == cap(b) {
			b = append(b, 0)[:len(b)]
		}
		n, err := unix.Read(fd, b[len(b):cap(b)])
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if errors.Is(err, unix.ESRCH) {
			return nil, nil
		}
		if err != nil {
			return nil, fmt.Errorf("read maps of pid %d: %w", pid, err)
		}
		if n == 0 {
			break
		}
		b = b[:len(b)+n]
	}
	r.text = b[:0]
	return parseMaps(pid, b)
}

// parseMaps extracts the shared writable file mappings of a maps text.
func parseMaps(pid int, b []byte) ([]sharedMapping, error) {
	var out []sharedMapping
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		m, ok, err := parseMapsLine(sc.Text())
		if err != nil {
			return nil, fmt.Errorf("maps of pid %d: %w", pid, err)
		}
		if ok {
			m.pid = pid
			out = append(out, m)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("parse maps of pid %d: %w", pid, err)
	}
	return out, nil
}

// parseMapsLine parses "start-end perms offset MAJ:MIN inode   path" and
// reports whether it is a shared, writable mapping of a file.
func parseMapsLine(line string) (sharedMapping, bool, error) {
	var f [5]string
	rest := line
	for i := range f {
		var ok bool
		f[i], rest, ok = strings.Cut(rest, " ")
		if !ok && i < len(f)-1 {
			return sharedMapping{}, false, fmt.Errorf("malformed maps line %q", line)
		}
	}
	perms := f[1]
	if len(perms) < 4 || perms[1] != 'w' || perms[3] != 's' {
		return sharedMapping{}, false, nil
	}
	ino, err := strconv.ParseUint(f[4], 10, 64)
	if err != nil {
		return sharedMapping{}, false, fmt.Errorf("maps line %q: inode: %w", line, err)
	}
	if ino == 0 {
		return sharedMapping{}, false, nil // anonymous shared memory
	}
	maj, min, ok := strings.Cut(f[3], ":")
	ma, err1 := strconv.ParseUint(maj, 16, 32)
	mi, err2 := strconv.ParseUint(min, 16, 32)
	if !ok || err1 != nil || err2 != nil {
		return sharedMapping{}, false, fmt.Errorf("maps line %q: bad device", line)
	}
	m := sharedMapping{addr: f[0], dev: unix.Mkdev(uint32(ma), uint32(mi)), ino: ino, path: strings.TrimLeft(rest, " ")}
	if p, ok := strings.CutSuffix(m.path, " (deleted)"); ok {
		m.path, m.deleted = p, true
	}
	return m, true, nil
}

// mappedPaths returns the upper-relative paths a mapping may name: the maps
// path is the merged mount's path when the process shares our mount
// namespace, and the container-relative path when it runs pivot_root'ed in
// its own. Newlines are shown as "\012".
func (p *Precopy) mappedPaths(m sharedMapping) []string {
	var cands []string
	raws := []string{m.path}
	if unescaped := strings.ReplaceAll(m.path, `\012`, "\n"); unescaped != m.path {
		raws = append(raws, unescaped)
	}
	for _, raw := range raws {
		for _, prefix := range p.mountPaths {
			if rel, ok := relUnder(prefix, raw); ok && rel != "" {
				cands = append(cands, rel)
			}
		}
		if rel, ok := strings.CutPrefix(raw, "/"); ok {
			cands = append(cands, rel)
		}
	}
	return cands
}

// confirmMapped reports whether rel, in the upper dir or seen through the
// merged mount, is the mapped file (same device and inode as maps shows:
// the upper inode for an upper-only file, the overlay's for a copied-up one).
func (p *Precopy) confirmMapped(rel string, m sharedMapping) bool {
	if !validRelPath(rel) {
		return false
	}
	if st, err := statBeneath(p.upperFd, rel); err == nil && st.Mode&unix.S_IFMT == unix.S_IFREG && st.Ino == m.ino {
		return true
	}
	if p.mountFd < 0 {
		return false
	}
	st, err := statBeneath(p.mountFd, rel)
	return err == nil && uint64(st.Dev) == m.dev && st.Ino == m.ino
}

// mappedNlink returns the link count of a mapping's file (0 once unlinked).
func mappedNlink(m sharedMapping) (uint64, error) {
	var st unix.Stat_t
	err := unix.Stat(fmt.Sprintf("/proc/%d/map_files/%s", m.pid, m.addr), &st)
	return uint64(st.Nlink), err
}

// statBeneath stats rel below dirfd without following symlinks or leaving
// the mount, and without opening the object itself.
func statBeneath(dirfd int, rel string) (*unix.Stat_t, error) {
	fd, err := openat2(dirfd, rel, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, err
	}
	return &st, nil
}

// mapScan is the result of scanning the frozen tasks' mappings.
type mapScan struct {
	paths      map[string]bool // upper paths to re-capture
	mappings   int             // shared writable mappings of the overlay seen
	unresolved string          // a mapping of the overlay that no upper path could be found for
}

// scanMappings finds the upper files that the given processes map shared and
// writable. A mapping of the overlay that cannot be tied to an upper path is
// reported in unresolved (the caller must then re-copy everything).
//
// The upper paths confirmed for a mapped file are remembered; with reuse
// they are taken as they are. Only pass reuse when no name in the upper dir
// changed since the last scan confirmed them (no event since the dirty set
// was taken before it): a path found by device and inode then still names
// that inode.
func (p *Precopy) scanMappings(pids []int, reuse bool) (mapScan, error) {
	res := mapScan{paths: map[string]bool{}}
	if p.mapped == nil || !reuse {
		p.mapped = map[mappedFile][]string{}
	}
	for _, pid := range pids {
		maps, err := p.maps.read(pid)
		if err != nil {
			return res, err
		}
		for _, m := range maps {
			if !p.ofOverlay(m) {
				continue // another filesystem: tmpfs, a volume, /dev/zero...
			}
			res.mappings++
			key := mappedFile{dev: m.dev, ino: m.ino, path: m.path}
			rels, known := p.mapped[key]
			if !known || m.deleted {
				rels = p.confirmedPaths(m)
				if !m.deleted && len(rels) > 0 {
					p.mapped[key] = rels
				}
			}
			for _, rel := range rels {
				res.paths[rel] = true
			}
			if len(rels) == 0 && !p.resolveUnlinked(m, res.paths) && res.unresolved == "" {
				res.unresolved = fmt.Sprintf("pid %d maps %q (dev %d:%d ino %d) shared+writable and it cannot be found in the upper dir",
					m.pid, m.path, unix.Major(m.dev), unix.Minor(m.dev), m.ino)
			}
		}
	}
	return res, nil
}

// mappedFile identifies a mapped file as maps shows it.
type mappedFile struct {
	dev, ino uint64
	path     string
}

// ofOverlay reports whether m maps a file of the overlay. Without its mount
// point, any overlayfs file counts.
func (p *Precopy) ofOverlay(m sharedMapping) bool {
	if p.ovlDev != 0 {
		return m.dev == p.ovlDev
	}
	var fs unix.Statfs_t
	err := unix.Statfs(fmt.Sprintf("/proc/%d/map_files/%s", m.pid, m.addr), &fs)
	return err != nil || fs.Type == unix.OVERLAYFS_SUPER_MAGIC
}

// confirmedPaths returns the upper paths (not excluded) that name the file
// m maps.
func (p *Precopy) confirmedPaths(m sharedMapping) []string {
	var rels []string
	for _, rel := range p.mappedPaths(m) {
		if _, excluded := p.excludedPath(rel); !excluded && p.confirmMapped(rel, m) {
			rels = append(rels, rel)
		}
	}
	return rels
}

// resolveUnlinked accounts for a mapping whose path names no upper file: an
// unlinked file is not in the capture, unless other recorded names of its
// inode remain (added to paths). It reports whether the file is accounted for.
func (p *Precopy) resolveUnlinked(m sharedMapping, paths map[string]bool) bool {
	if !m.deleted {
		return false
	}
	if n, err := mappedNlink(m); err == nil && n == 0 {
		return true
	}
	found := false
	for rel := range p.store.names(m.ino) {
		if r := p.store.records[rel]; r != nil && r.Type == TypeFile {
			paths[rel] = true
			found = true
		}
	}
	return found
}
