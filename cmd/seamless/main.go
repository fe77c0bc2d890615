// Command seamless snapshots running containers into registry images.
package main

import (
	"os"

	"github.com/seamless-snapshot/seamless/cli"
	"github.com/seamless-snapshot/seamless/shim"
	"github.com/seamless-snapshot/seamless/uploader"
)

func main() {
	switch os.Getenv(uploader.EnvRole) {
	case shim.RoleShim:
		os.Exit(shim.Main(os.Args))
	case uploader.RoleUploader:
		os.Exit(uploader.Main(os.Args))
	}
	os.Exit(cli.Main())
}
