// Package role lets one seamless binary serve as the CLI or runtime wrapper
// and, re-executed, as a shim, its watchdog or an uploader.
package role

import (
	"os"

	"github.com/seamless-snapshot/seamless/shim"
	"github.com/seamless-snapshot/seamless/uploader"
	"github.com/seamless-snapshot/seamless/watchdog"
)

// Dispatch runs the role named by the role variable, if any, and exits; it
// returns when the process has no role and should run its own main.
func Dispatch() {
	switch os.Getenv(uploader.EnvRole) {
	case shim.RoleShim:
		os.Exit(shim.Main(os.Args))
	case watchdog.Role:
		os.Exit(watchdog.Main(os.Args))
	case uploader.RoleUploader:
		os.Exit(uploader.Main(os.Args))
	}
}
