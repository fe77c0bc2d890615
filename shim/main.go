package shim

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"strconv"

	"github.com/seamless-snapshot/seamless/internal/proc"
	"github.com/seamless-snapshot/seamless/watchdog"
)

// RoleShim is the value of the role variable (uploader.EnvRole) that makes a
// seamless binary run as a shim.
const RoleShim = "shim"

// EnvReadyFD names the fd on which the shim reports "ready" or an error line
// to the process that started it.
const EnvReadyFD = "_SEAMLESS_READY_FD"

// Main is the shim role's entry point: args[1] is the JSON config.
func Main(args []string) int {
	ready := readyPipe()
	report := func(msg string) {
		if ready != nil {
			fmt.Fprintln(ready, msg)
			ready.Close()
			ready = nil
		}
	}
	if len(args) < 2 {
		report("error: shim: missing config argument")
		return 2
	}
	cfg, err := DecodeConfig(args[1])
	if err != nil {
		report("error: " + err.Error())
		return 2
	}
	logger, closeLog := openLog(cfg)
	defer closeLog()
	if nice, err := proc.NiceFromEnv(); err != nil {
		logger.Printf("shim for %s: %v", cfg.ContainerID, err)
	} else if err := proc.NiceThreads(nice); err != nil {
		logger.Printf("shim for %s: %v", cfg.ContainerID, err)
	}
	exe, err := os.Executable()
	if err != nil {
		report("error: shim: " + err.Error())
		return 1
	}
	s, err := New(cfg, exe, logger)
	if err != nil {
		report("error: " + err.Error())
		return 1
	}
	wd, err := watchdog.ClientFromEnv()
	if err != nil {
		report("error: " + err.Error())
		return 1
	}
	if wd != nil {
		s.SetWatchdog(wd)
	}
	l, err := s.Listen()
	if errors.Is(err, ErrAlreadyRunning) {
		report("ready: already running")
		return 0
	}
	if err != nil {
		report("error: " + err.Error())
		return 1
	}
	report("ready")
	if wd != nil {
		if err := wd.Hello(); err != nil {
			logger.Printf("shim for %s: thaw watchdog unreachable, snapshots will fail: %v", cfg.ContainerID, err)
		}
	}
	if err := s.Run(context.Background(), l); err != nil {
		logger.Printf("shim for %s: %v", cfg.ContainerID, err)
		return 1
	}
	return 0
}

func readyPipe() *os.File {
	fd, err := strconv.Atoi(os.Getenv(EnvReadyFD))
	if err != nil || fd < 3 {
		return nil
	}
	os.Unsetenv(EnvReadyFD)
	return os.NewFile(uintptr(fd), "ready")
}

// openLog opens <run-dir>/<id>.log; on failure the shim logs nowhere.
func openLog(cfg *Config) (*log.Logger, func()) {
	if cfg.RunDir == "" || cfg.ContainerID == "" {
		return log.New(os.Stderr, "", log.LstdFlags|log.Lmicroseconds), func() {}
	}
	if err := os.MkdirAll(cfg.RunDir, 0o700); err != nil {
		return log.New(os.Stderr, "", log.LstdFlags), func() {}
	}
	f, err := os.OpenFile(filepath.Join(cfg.RunDir, cfg.ContainerID+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return log.New(os.Stderr, "", log.LstdFlags), func() {}
	}
	return log.New(f, "", log.LstdFlags|log.Lmicroseconds), func() { f.Close() }
}
