package main

import (
	"encoding/hex"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// fill creates --files files of --size bytes under --dir, --per-dir to a
// sub-directory, with distinct random hex text (compresses about 2:1, like
// text and binaries in real layers, and never deduplicates across files).
func fill(args []string) error {
	fs := flag.NewFlagSet("fill", flag.ContinueOnError)
	dir := fs.String("dir", "", "directory to fill (created)")
	files := fs.Int("files", 0, "number of files")
	sizeArg := fs.String("size", "4k", "size of each file (suffixes k, M, G: powers of 1024)")
	perDir := fs.Int("per-dir", 100, "files per sub-directory")
	seed := fs.Uint64("seed", 1, "random seed")
	if err := fs.Parse(args); err != nil {
		return err
	}
	size, err := parseSize(*sizeArg)
	if err != nil {
		return fmt.Errorf("fill: --size: %w", err)
	}
	if *dir == "" || *files <= 0 || *perDir <= 0 {
		return fmt.Errorf("usage: testbin fill --dir D --files N>0 --size S [--per-dir K>0]")
	}
	f := &filler{rng: rand.New(rand.NewChaCha8(seedBytes(*seed))), chunk: min(size, 1<<20)}
	for i := range *files {
		sub := filepath.Join(*dir, fmt.Sprintf("d%05d", i / *perDir))
		if i%*perDir == 0 {
			if err := os.MkdirAll(sub, 0o755); err != nil {
				return fmt.Errorf("fill: %w", err)
			}
		}
		if err := f.writeFile(filepath.Join(sub, fmt.Sprintf("f%07d", i)), size); err != nil {
			return fmt.Errorf("fill: %w", err)
		}
	}
	return nil
}

// filler writes files of random hex text.
type filler struct {
	rng   *rand.Rand
	chunk int64
	raw   []byte
	text  []byte
}

func (f *filler) writeFile(path string, size int64) error {
	out, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	for left := size; left > 0; {
		n := min(left, f.chunk)
		if _, err := out.Write(f.next(n)); err != nil {
			out.Close()
			return err
		}
		left -= n
	}
	return out.Close()
}

// next returns n bytes of fresh random hex text (valid until the next call).
func (f *filler) next(n int64) []byte {
	half := (n + 1) / 2
	if int64(cap(f.raw)) < half {
		f.raw, f.text = make([]byte, half), make([]byte, 2*half)
	}
	raw := f.raw[:half]
	for i := 0; i < len(raw); i += 8 {
		v := f.rng.Uint64()
		for j := 0; j < 8 && i+j < len(raw); j++ {
			raw[i+j] = byte(v >> (8 * j))
		}
	}
	hex.Encode(f.text, raw)
	return f.text[:n]
}

func seedBytes(seed uint64) [32]byte {
	var b [32]byte
	for i := range 8 {
		b[i] = byte(seed >> (8 * i))
	}
	return b
}

// parseSize parses "4096", "4k", "256M", "1G" (powers of 1024).
func parseSize(s string) (int64, error) {
	mult := int64(1)
	switch {
	case strings.HasSuffix(s, "k"), strings.HasSuffix(s, "K"):
		mult = 1 << 10
	case strings.HasSuffix(s, "M"):
		mult = 1 << 20
	case strings.HasSuffix(s, "G"):
		mult = 1 << 30
	}
	if mult > 1 {
		s = s[:len(s)-1]
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil || v <= 0 {
		return 0, fmt.Errorf("invalid size %q", s)
	}
	return v * mult, nil
}
