// Command seamless snapshots running containers into registry images.
package main

import (
	"os"

	"github.com/seamless-snapshot/seamless/cli"
	"github.com/seamless-snapshot/seamless/internal/role"
)

func main() {
	role.Dispatch()
	os.Exit(cli.Main())
}
