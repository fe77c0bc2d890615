// Package cli implements the seamless command line: snapshot (commit),
// status, wait, retry, gc and list.
package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/seamless-snapshot/seamless/config"
)

// Exit codes.
const (
	ExitOK     = 0
	ExitFailed = 1
	ExitUsage  = 2
)

// usageError is a mistake in the command line: exit code 2.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error { return &usageError{fmt.Sprintf(format, args...)} }

// App holds the state of one CLI invocation.
type App struct {
	Stdout, Stderr io.Writer
	Dirs           config.Dirs
	// IsTerminal reports whether Stdout is a terminal (progress bars).
	IsTerminal bool
}

const mainUsage = `seamless snapshots the filesystem of a running container into an image in a
registry, pausing the container only for the capture.

Usage:
  seamless [--state-dir DIR] [--run-dir DIR] COMMAND [flags]

Commands:
  snapshot (commit)  snapshot a container: seamless snapshot --container ID --target REF [--wait]
  status [ID]        show one snapshot, or all of them
  wait ID            follow a snapshot until it is pushed or failed
  retry ID           continue a failed or interrupted upload: seamless retry ID [--wait]
  gc                 remove old finished snapshots: seamless gc --older-than 168h
  list               list the containers that can be snapshotted (those with a shim)

Global flags:
  --state-dir DIR    snapshot records (env SEAMLESS_STATE_DIR, default /var/lib/seamless)
  --run-dir DIR      shim sockets (env SEAMLESS_RUN_DIR, default /run/seamless)

Run 'seamless COMMAND --help' for a command's flags.
Exit codes: 0 ok, 1 failed, 2 bad usage.
`

// Run executes the command line args (without the program name) and returns the exit code.
func (a *App) Run(ctx context.Context, args []string) int {
	err := a.run(ctx, args)
	var ue *usageError
	switch {
	case err == nil:
		return ExitOK
	case errors.Is(err, flag.ErrHelp):
		return ExitOK
	case errors.As(err, &ue):
		fmt.Fprintf(a.Stderr, "seamless: %v\n", err)
		return ExitUsage
	case errors.Is(err, errReported):
		return ExitFailed
	default:
		fmt.Fprintf(a.Stderr, "seamless: %v\n", err)
		return ExitFailed
	}
}

// errReported is a failure already printed to the user.
var errReported = errors.New("failed")

func (a *App) run(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("seamless", flag.ContinueOnError)
	fs.SetOutput(a.Stderr)
	fs.Usage = func() { fmt.Fprint(a.Stderr, mainUsage) }
	stateDir := fs.String("state-dir", a.Dirs.State, "")
	runDir := fs.String("run-dir", a.Dirs.Run, "")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usagef("%v", err)
	}
	a.Dirs = config.Dirs{State: *stateDir, Run: *runDir}
	rest := fs.Args()
	if len(rest) == 0 {
		fmt.Fprint(a.Stderr, mainUsage)
		return usagef("no command given")
	}
	cmd, cmdArgs := rest[0], rest[1:]
	switch cmd {
	case "snapshot", "commit":
		return a.snapshot(ctx, cmdArgs)
	case "status":
		return a.status(ctx, cmdArgs)
	case "wait":
		return a.wait(ctx, cmdArgs)
	case "retry":
		return a.retry(ctx, cmdArgs)
	case "gc":
		return a.gc(ctx, cmdArgs)
	case "list", "ls":
		return a.list(ctx, cmdArgs)
	case "help":
		fmt.Fprint(a.Stdout, mainUsage)
		return nil
	}
	return usagef("unknown command %q (commands: snapshot, status, wait, retry, gc, list)", cmd)
}

// newFlagSet returns a flag set for a sub-command whose --help prints usage.
func (a *App) newFlagSet(name, usage string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(a.Stderr)
	fs.Usage = func() {
		fmt.Fprint(a.Stderr, usage)
		fmt.Fprintln(a.Stderr, "\nFlags:")
		fs.PrintDefaults()
	}
	return fs
}

// parse parses a sub-command's flags, allowing flags after positional args.
func parse(fs *flag.FlagSet, args []string) ([]string, error) {
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			return nil, usagef("%v", err)
		}
		args = fs.Args()
		if len(args) == 0 {
			return positional, nil
		}
		positional = append(positional, args[0])
		args = args[1:]
	}
}

func checkOutput(format string) error {
	if format != "text" && format != "json" {
		return usagef("--output %q: want text or json", format)
	}
	return nil
}

// stringList is a repeatable string flag.
type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

// Main runs the CLI with the process's arguments and environment.
func Main() int {
	fi, _ := os.Stdout.Stat()
	app := &App{
		Stdout: os.Stdout, Stderr: os.Stderr, Dirs: config.FromEnv(),
		IsTerminal: fi != nil && fi.Mode()&os.ModeCharDevice != 0,
	}
	ctx, stop := signalContext()
	defer stop()
	return app.Run(ctx, os.Args[1:])
}
