// Package hook starts and stops the per-container shim, either from a runc
// invocation (the seamless-runc wrapper) or from an OCI hook's state.
package hook

import (
	"fmt"
	"strconv"
	"strings"
)

// RuncCall is what seamless needs to know of one runc command line.
type RuncCall struct {
	// Root is runc's state root (--root), "/run/runc" when not given.
	Root string
	// Log is runc's --log file, where wrapper warnings go.
	Log string
	// LogFormat is runc's --log-format (text or json).
	LogFormat string
	// Command is the runc sub-command (create, run, delete, ...), "" if none.
	Command string
	// ContainerID is the last positional argument of create/run/delete.
	ContainerID string
	// Bundle is create/run's --bundle, "" when the cwd is the bundle.
	Bundle string
	// Detach is run's --detach.
	Detach bool
	// PreserveFDs is create/run's --preserve-fds: extra fds passed to runc.
	PreserveFDs int
}

// DefaultRuncRoot is runc's state root when --root is not given.
const DefaultRuncRoot = "/run/runc"

// runc's global flags that take a value.
var globalValueFlags = map[string]bool{"root": true, "log": true, "log-format": true, "criu": true, "rootless": true}

// Sub-command flags that take a value (create, run, exec, delete, ...).
var commandValueFlags = map[string]bool{
	"bundle": true, "b": true, "console-socket": true, "pid-file": true, "preserve-fds": true,
	"process": true, "p": true, "cwd": true, "env": true, "e": true, "user": true, "u": true,
	"additional-gids": true, "g": true, "apparmor": true, "process-label": true, "cap": true, "c": true,
	"format": true, "f": true,
}

// ParseRuncArgs reads runc's argument list (without argv[0]). It never fails
// on flags it does not know: those pass through to runc untouched.
func ParseRuncArgs(args []string) (*RuncCall, error) {
	c := &RuncCall{Root: DefaultRuncRoot, LogFormat: "text"}
	i := 0
	for ; i < len(args); i++ {
		name, value, hasValue, isFlag := splitFlag(args[i])
		if !isFlag {
			break
		}
		if globalValueFlags[name] && !hasValue {
			if i+1 >= len(args) {
				return nil, fmt.Errorf("runc flag --%s needs a value", name)
			}
			i++
			value = args[i]
		}
		switch name {
		case "root":
			c.Root = value
		case "log":
			c.Log = value
		case "log-format":
			c.LogFormat = value
		}
	}
	if i >= len(args) {
		return c, nil
	}
	c.Command = args[i]
	rest := args[i+1:]
	var positional []string
	for j := 0; j < len(rest); j++ {
		name, value, hasValue, isFlag := splitFlag(rest[j])
		if !isFlag {
			positional = append(positional, rest[j])
			continue
		}
		if commandValueFlags[name] && !hasValue && j+1 < len(rest) {
			j++
			value = rest[j]
		}
		switch name {
		case "bundle", "b":
			c.Bundle = value
		case "detach", "d":
			c.Detach = true
		case "preserve-fds":
			n, err := strconv.Atoi(value)
			if err != nil || n < 0 {
				return nil, fmt.Errorf("runc --preserve-fds %q: not a count", value)
			}
			c.PreserveFDs = n
		}
	}
	if len(positional) > 0 {
		c.ContainerID = positional[0]
	}
	return c, nil
}

// splitFlag splits "--name=value", "--name" or "-n" into its parts.
func splitFlag(arg string) (name, value string, hasValue, isFlag bool) {
	if len(arg) < 2 || arg[0] != '-' || arg == "--" {
		return "", "", false, false
	}
	name = strings.TrimLeft(arg, "-")
	if k, v, ok := strings.Cut(name, "="); ok {
		return k, v, true, true
	}
	return name, "", false, true
}
