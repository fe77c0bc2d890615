// Command testbin is a static helper copied into test images: busybox has no
// xattr tools. Usage: testbin setxattr PATH NAME VALUE | testbin getxattr PATH NAME
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
		return fmt.Errorf("usage: testbin setxattr PATH NAME VALUE | getxattr PATH NAME")
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
	}
	return fmt.Errorf("unknown command %q", args[0])
}
