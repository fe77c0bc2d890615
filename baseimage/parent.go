package baseimage

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Environment variables that override what ParentContainerd infers.
const (
	EnvContainerdAddress   = "CONTAINERD_ADDRESS"
	EnvContainerdNamespace = "CONTAINERD_NAMESPACE"
)

// ShimArgs is what a containerd shim's command line says about its containerd.
type ShimArgs struct {
	Address   string
	Namespace string
	ID        string
}

// ParentContainerd infers containerd's address and namespace from the parent
// process when it is a containerd shim (containerd-shim-runc-v2 -namespace NS
// -id ID -address ADDR ...). CONTAINERD_ADDRESS and CONTAINERD_NAMESPACE
// override the inferred values. ok is false unless both are known.
func ParentContainerd() (address, namespace string, ok bool) {
	args, _ := readCmdline(os.Getppid())
	return resolveContainerd(args, os.Getenv)
}

// resolveContainerd combines a parent command line with environment overrides.
func resolveContainerd(parentArgs []string, getenv func(string) string) (address, namespace string, ok bool) {
	sa, _ := ParseShimCmdline(parentArgs)
	address, namespace = sa.Address, sa.Namespace
	if v := getenv(EnvContainerdAddress); v != "" {
		address = v
	}
	if v := getenv(EnvContainerdNamespace); v != "" {
		namespace = v
	}
	return address, namespace, address != "" && namespace != ""
}

// readCmdline returns the NUL-separated arguments of process pid.
func readCmdline(pid int) ([]string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return nil, fmt.Errorf("read command line of pid %d: %w", pid, err)
	}
	return SplitCmdline(b), nil
}

// SplitCmdline splits the content of /proc/<pid>/cmdline into arguments.
func SplitCmdline(b []byte) []string {
	b = bytes.TrimRight(b, "\x00")
	if len(b) == 0 {
		return nil
	}
	parts := bytes.Split(b, []byte{0})
	out := make([]string, len(parts))
	for i, p := range parts {
		out[i] = string(p)
	}
	return out
}

// ParseShimCmdline reads the -namespace, -address and -id flags of a containerd
// shim command line (args[0] must name a containerd-shim binary). Flags may be
// written -flag VALUE, --flag VALUE, -flag=VALUE or --flag=VALUE. ok reports
// whether args is a shim command line carrying both address and namespace.
func ParseShimCmdline(args []string) (sa ShimArgs, ok bool) {
	if len(args) == 0 || !strings.HasPrefix(filepath.Base(args[0]), "containerd-shim") {
		return ShimArgs{}, false
	}
	for i := 1; i < len(args); i++ {
		name, value, hasValue := splitFlag(args[i])
		var dst *string
		switch name {
		case "namespace":
			dst = &sa.Namespace
		case "address":
			dst = &sa.Address
		case "id":
			dst = &sa.ID
		default:
			continue
		}
		if !hasValue {
			if i+1 >= len(args) {
				break
			}
			i++
			value = args[i]
		}
		*dst = value
	}
	return sa, sa.Address != "" && sa.Namespace != ""
}

// splitFlag splits "-name=value" / "--name value" into its parts; name is
// empty when arg is not a flag.
func splitFlag(arg string) (name, value string, hasValue bool) {
	switch {
	case strings.HasPrefix(arg, "--"):
		arg = arg[2:]
	case strings.HasPrefix(arg, "-"):
		arg = arg[1:]
	default:
		return "", "", false
	}
	if arg == "" || arg[0] == '-' {
		return "", "", false
	}
	name, value, hasValue = strings.Cut(arg, "=")
	return name, value, hasValue
}
