package contract

import (
	"fmt"
	"sort"
	"strconv"
	"strings"
)

// The consistency writer (testbin writer --dir D) keeps three invariants in
// D. Each tick it writes the same counter k, in place (pwrite at offset 0,
// fixed width, never a rename), to FileA then FileB, then stores it through
// a MAP_SHARED mapping of FileM and pwrites it to FileN, then rewrites pool
// file k mod P (PoolDir/NNNN, P files) in place with k at its start followed
// by new random content. So at every instant:
//
//   - files: B <= A <= B+1;
//   - mmap:  N <= M <= N+1 (M is only ever written through the mapping,
//     which fanotify never reports);
//   - pool:  A-P <= stamp <= A for every pool file (the pool holds the P
//     latest stamps, and A is written before the pool file of its tick).
//
// A capture taken while every task was frozen satisfies all three. A
// capture that read the files at different instants while the writer ticked
// breaks "pool" whatever order the directory lists them in (hash order on
// ext4), and breaks "files"/"mmap" when a tick falls between the reads of a
// pair; one that missed stores made through the mapping breaks "mmap".
const (
	FileA   = "inv-a"
	FileM   = "inv-m"
	PoolDir = "pool"
	FileB   = "inv-b"
	FileN   = "inv-n"
)

// CounterWidth is the fixed size of a counter record: 20 digits and '\n'.
const CounterWidth = 21

// MmapFileSize is the size of FileM (one page).
const MmapFileSize = 4096

// FormatCounter renders k as a fixed-width record.
func FormatCounter(k uint64) []byte { return fmt.Appendf(nil, "%020d\n", k) }

// ParseCounter reads a record written by FormatCounter at the start of b
// (what follows, such as the rest of FileM's page, is ignored).
func ParseCounter(b []byte) (uint64, error) {
	if len(b) < CounterWidth-1 {
		return 0, fmt.Errorf("counter record of %d bytes, want %d", len(b), CounterWidth)
	}
	s := strings.TrimSpace(string(b[:CounterWidth-1]))
	k, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("counter record %q: %w", s, err)
	}
	return k, nil
}

// PoolFile is the name, relative to the writer's directory, of pool file i.
func PoolFile(i int) string { return fmt.Sprintf("%s/%04d", PoolDir, i) }

// IsWriterFile reports whether name (relative to the writer's directory)
// takes part in an invariant.
func IsWriterFile(name string) bool {
	switch name {
	case FileA, FileB, FileM, FileN:
		return true
	}
	return strings.HasPrefix(name, PoolDir+"/")
}

// pair is one two-file invariant: second <= first <= second+1.
type pair struct{ name, first, second string }

var pairs = []pair{{"files", FileA, FileB}, {"mmap", FileM, FileN}}

// Verify checks the invariants on a capture of the writer's directory:
// files maps names relative to it (as IsWriterFile names them) to the
// start (at least CounterWidth bytes) of their captured content. It returns
// one message per broken invariant, each starting with the invariant's name
// and a colon.
func Verify(files map[string][]byte) []string {
	var out []string
	for _, p := range pairs {
		if err := p.check(files); err != nil {
			out = append(out, err.Error())
		}
	}
	if err := checkPool(files); err != nil {
		out = append(out, err.Error())
	}
	return out
}

func (p pair) check(files map[string][]byte) error {
	a, err := counterOf(files, p.first)
	if err != nil {
		return fmt.Errorf("%s: %w", p.name, err)
	}
	b, err := counterOf(files, p.second)
	if err != nil {
		return fmt.Errorf("%s: %w", p.name, err)
	}
	if b > a || a > b+1 {
		return fmt.Errorf("%s: %s=%d %s=%d breaks %s <= %s <= %s+1", p.name, p.first, a, p.second, b, p.second, p.first, p.second)
	}
	return nil
}

// checkPool checks A-P <= stamp <= A over the pool files present.
func checkPool(files map[string][]byte) error {
	a, err := counterOf(files, FileA)
	if err != nil {
		return fmt.Errorf("pool: %w", err)
	}
	var names []string
	for n := range files {
		if strings.HasPrefix(n, PoolDir+"/") {
			names = append(names, n)
		}
	}
	if len(names) == 0 {
		return fmt.Errorf("pool: no pool file in the capture")
	}
	sort.Strings(names)
	var bad []string
	for _, n := range names {
		s, err := ParseCounter(files[n])
		if err != nil {
			bad = append(bad, fmt.Sprintf("%s unreadable (%v)", n, err))
		} else if s > a || s+uint64(len(names)) < a {
			bad = append(bad, fmt.Sprintf("%s=%d", n, s))
		}
	}
	if len(bad) > 0 {
		return fmt.Errorf("pool: %d of %d stamps outside [%s-%d, %s=%d]: %s", len(bad), len(names), FileA, len(names), FileA, a, strings.Join(bad[:min(len(bad), 3)], ", "))
	}
	return nil
}

func counterOf(files map[string][]byte, name string) (uint64, error) {
	b, ok := files[name]
	if !ok {
		return 0, fmt.Errorf("%s missing from the capture", name)
	}
	k, err := ParseCounter(b)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", name, err)
	}
	return k, nil
}
