// Command seamless-runc is a runc-compatible runtime: it runs the real runc
// with the same arguments, stdio and exit code, and starts a seamless shim
// for every container it creates (stopping it on delete).
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/seamless-snapshot/seamless/config"
	"github.com/seamless-snapshot/seamless/hook"
	"github.com/seamless-snapshot/seamless/internal/role"
)

// EnvRunc names the real runc binary; otherwise "runc" is looked up in PATH.
const EnvRunc = "SEAMLESS_RUNC"

// shimStartTimeout bounds how long container creation waits for the shim.
const shimStartTimeout = 5 * time.Second

func main() {
	role.Dispatch()
	os.Exit(wrap(os.Args[1:]))
}

// wrap runs the real runc. Commands that need no shim work are exec'd, so the
// wrapper vanishes; create, run and delete run runc as a child.
func wrap(args []string) int {
	runc, err := findRunc()
	if err != nil {
		fmt.Fprintf(os.Stderr, "seamless-runc: %v\n", err)
		return 1
	}
	call, perr := hook.ParseRuncArgs(args)
	if perr != nil || (call.Command != "create" && call.Command != "run" && call.Command != "delete") {
		// Let runc itself judge arguments we cannot read.
		err := syscall.Exec(runc, append([]string{runc}, args...), os.Environ())
		fmt.Fprintf(os.Stderr, "seamless-runc: exec %s: %v\n", runc, err)
		return 1
	}
	dirs := config.FromEnv()
	switch call.Command {
	case "create":
		code := runChild(runc, args, call.PreserveFDs)
		if code == 0 {
			startShim(call, dirs)
		}
		return code
	case "run":
		started := make(chan struct{})
		go func() {
			defer close(started)
			if waitForState(call, 10*time.Second) {
				startShim(call, dirs)
			}
		}()
		code := runChild(runc, args, call.PreserveFDs)
		if call.Detach {
			<-started
		}
		return code
	default: // delete
		if err := hook.StopShim(dirs, call.ContainerID, 10*time.Second); err != nil {
			warn(call, err)
		}
		os.Remove(filepath.Join(dirs.Run, call.ContainerID+".log"))
		return runChild(runc, args, call.PreserveFDs)
	}
}

// runChild runs runc with our stdio (and the fds --preserve-fds passes on),
// forwards signals to it, and returns its exit code.
func runChild(runc string, args []string, preserveFDs int) int {
	cmd := exec.Command(runc, args...)
	cmd.Args[0] = runc
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	for i := 0; i < preserveFDs; i++ {
		cmd.ExtraFiles = append(cmd.ExtraFiles, os.NewFile(uintptr(3+i), fmt.Sprintf("fd%d", 3+i)))
	}
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs)
	defer signal.Stop(sigs)
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(os.Stderr, "seamless-runc: start %s: %v\n", runc, err)
		return 1
	}
	go func() {
		for sig := range sigs {
			if sig == syscall.SIGCHLD || sig == syscall.SIGURG {
				continue
			}
			cmd.Process.Signal(sig)
		}
	}()
	err := cmd.Wait()
	var exitErr *exec.ExitError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &exitErr):
		if ws, ok := exitErr.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return 128 + int(ws.Signal())
		}
		return exitErr.ExitCode()
	default:
		fmt.Fprintf(os.Stderr, "seamless-runc: %s: %v\n", runc, err)
		return 1
	}
}

// startShim starts the container's shim. A failure never fails the container:
// it is written to runc's log file.
func startShim(call *hook.RuncCall, dirs config.Dirs) {
	cfg, err := hook.ShimConfigFromRunc(call, dirs)
	if err != nil {
		warn(call, fmt.Errorf("no snapshots for this container: %w", err))
		return
	}
	exe, err := os.Executable()
	if err != nil {
		warn(call, fmt.Errorf("no snapshots for this container: %w", err))
		return
	}
	if _, err := hook.StartShim(exe, cfg, shimStartTimeout); err != nil {
		warn(call, fmt.Errorf("no snapshots for this container: %w", err))
	}
}

// waitForState waits for runc run to have created the container.
func waitForState(call *hook.RuncCall, timeout time.Duration) bool {
	path := filepath.Join(call.Root, call.ContainerID, "state.json")
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if _, err := os.Stat(path); err == nil {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return false
}

// warn appends a warning to runc's --log file in runc's own format, or to
// stderr when there is none.
func warn(call *hook.RuncCall, err error) {
	msg := "seamless: " + err.Error()
	if call.Log == "" {
		fmt.Fprintln(os.Stderr, msg)
		return
	}
	f, ferr := os.OpenFile(call.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if ferr != nil {
		fmt.Fprintln(os.Stderr, msg)
		return
	}
	defer f.Close()
	now := time.Now().UTC().Format(time.RFC3339Nano)
	if call.LogFormat == "json" {
		b, _ := json.Marshal(map[string]string{"level": "warning", "msg": msg, "time": now})
		fmt.Fprintf(f, "%s\n", b)
		return
	}
	fmt.Fprintf(f, "time=%q level=warning msg=%q\n", now, msg)
}

// defaultRuncDirs are searched after PATH: podman runs its runtime for
// kill, stop and delete with an environment that has no PATH.
const defaultRuncDirs = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// findRunc returns the real runc: $SEAMLESS_RUNC, else the first "runc" in
// PATH (then defaultRuncDirs) that is not this binary.
func findRunc() (string, error) {
	if p := os.Getenv(EnvRunc); p != "" {
		return p, nil
	}
	self, _ := os.Executable()
	selfReal, _ := filepath.EvalSymlinks(self)
	for _, dir := range filepath.SplitList(os.Getenv("PATH") + ":" + defaultRuncDirs) {
		if dir == "" {
			continue
		}
		cand := filepath.Join(dir, "runc")
		real, err := filepath.EvalSymlinks(cand)
		if err != nil || real == selfReal {
			continue
		}
		if fi, err := os.Stat(real); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return cand, nil
		}
	}
	return "", errors.New("real runc not found: set SEAMLESS_RUNC or put runc in PATH")
}
