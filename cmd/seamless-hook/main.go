// Command seamless-hook is an OCI hook for engines that run hooks but not a
// custom runtime (podman, CRI-O): registered for createRuntime it starts the
// container's seamless shim from the state on stdin, registered for poststop
// it stops it. It is idempotent with the seamless-runc wrapper: a container
// never gets two shims.
//
// Usage (in a hooks.d JSON file): seamless-hook [createRuntime|poststop]
// Without a stage argument, the stage is inferred from the state (a pid
// means createRuntime). The binary is also re-executed as the shim and the
// uploader.
package main

import (
	"fmt"
	"os"

	"github.com/seamless-snapshot/seamless/config"
	"github.com/seamless-snapshot/seamless/hook"
	"github.com/seamless-snapshot/seamless/internal/role"
)

func main() {
	role.Dispatch()
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	stage := ""
	switch len(args) {
	case 0:
	case 1:
		stage = args[0]
	default:
		fmt.Fprintln(os.Stderr, "usage: seamless-hook [createRuntime|poststop] < STATE")
		return 2
	}
	if stage == "-h" || stage == "--help" {
		fmt.Println("usage: seamless-hook [createRuntime|poststop] < STATE\n\nAn OCI hook: starts (createRuntime) or stops (poststop) the container's seamless shim.")
		return 0
	}
	st, err := hook.ReadOCIState(os.Stdin)
	if err != nil {
		fmt.Fprintf(os.Stderr, "seamless-hook: %v\n", err)
		return 1
	}
	exe, err := os.Executable()
	if err != nil {
		fmt.Fprintf(os.Stderr, "seamless-hook: %v\n", err)
		return 1
	}
	h := hook.OCIHook{Exe: exe, Dirs: config.FromEnv()}
	if err := h.Run(stage, st); err != nil {
		fmt.Fprintf(os.Stderr, "seamless-hook: %v\n", err)
		return 2
	}
	return 0
}
