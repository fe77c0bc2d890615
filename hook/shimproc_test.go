package hook

import (
	"encoding/json"
	"testing"

	"github.com/seamless-snapshot/seamless/shim"
	"github.com/seamless-snapshot/seamless/uploader"
	"github.com/seamless-snapshot/seamless/watchdog"
)

// TestWatchdogArgs: the watchdog runs the shim with its config and role,
// hands it the ready fd, guards the container's cgroups and logs next to it.
func TestWatchdogArgs(t *testing.T) {
	cfg := &shim.Config{
		ContainerID: "c1", InitPID: 42, InitStart: 7, RunDir: "/run/x",
		CgroupPaths: map[string]string{"freezer": "/sys/fs/cgroup/freezer/c1", "": "/sys/fs/cgroup/unified/c1"},
	}
	args, err := watchdogArgs("/usr/bin/seamless-runc", cfg)
	if err != nil {
		t.Fatal(err)
	}
	if len(args) != 4 || args[1] != "/usr/bin/seamless-runc" || args[2] != "seamless-shim" {
		t.Fatalf("args %q", args)
	}
	var wc watchdog.Config
	if err := json.Unmarshal([]byte(args[0]), &wc); err != nil {
		t.Fatal(err)
	}
	if wc.InitPID != 42 || wc.InitStart != 7 || wc.CgroupPaths[""] != cfg.CgroupPaths[""] ||
		wc.ReadyEnv != shim.EnvReadyFD || wc.LogPath != "/run/x/c1.log" ||
		len(wc.ChildEnv) != 1 || wc.ChildEnv[0] != uploader.EnvRole+"="+shim.RoleShim {
		t.Errorf("watchdog config %+v", wc)
	}
	got, err := shim.DecodeConfig(args[3])
	if err != nil || got.ContainerID != "c1" {
		t.Errorf("shim config %+v %v", got, err)
	}
}
