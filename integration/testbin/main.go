// Command testbin is a static helper copied into test images: busybox has no
// xattr tools, and the pause benchmark needs a probe, a consistency writer
// and a fast way to fill a container's upper dir.
//
// Usage:
//
//	testbin setxattr PATH NAME VALUE
//	testbin getxattr PATH NAME
//	testbin probe [--out FILE] [--min-gap D] [--capacity N]   (see probe.go)
//	testbin writer --dir D [--rate N] [--pool P]              (see writer.go)
//	testbin fill --dir D --files N --size S [--per-dir K]      (see fill.go)
package main

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "testbin:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("usage: testbin setxattr PATH NAME VALUE | getxattr PATH NAME | probe | writer | fill")
	}
	switch args[0] {
	case "setxattr":
		if len(args) != 4 {
			return fmt.Errorf("usage: testbin setxattr PATH NAME VALUE")
		}
		return unix.Lsetxattr(args[1], args[2], []byte(args[3]), 0)
	case "getxattr":
		if len(args) != 3 {
			return fmt.Errorf("usage: testbin getxattr PATH NAME")
		}
		buf := make([]byte, 4096)
		n, err := unix.Lgetxattr(args[1], args[2], buf)
		if err != nil {
			return fmt.Errorf("getxattr %s %s: %w", args[1], args[2], err)
		}
		fmt.Printf("%s\n", buf[:n])
		return nil
	case "probe":
		return probe(args[1:])
	case "writer":
		return writer(args[1:])
	case "fill":
		return fill(args[1:])
	}
	return fmt.Errorf("unknown command %q", args[0])
}
