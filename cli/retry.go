package cli

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/seamless-snapshot/seamless/uploader"
)

const retryUsage = `Usage: seamless retry ID [--wait] [--retry-timeout DURATION] [--output text|json]

Continues the upload of a snapshot that failed or was interrupted (its
uploader was killed, the host rebooted): a new uploader reuses the layer
spool when it is complete and intact, and otherwise rebuilds the same layer
from the capture, then pushes. ID may be a unique prefix. A pushed snapshot
is left alone (exit 0); one whose uploader still runs is refused (exit 1).
`

func (a *App) retry(ctx context.Context, args []string) error {
	fs := a.newFlagSet("retry", retryUsage)
	wait := fs.Bool("wait", false, "wait until the image is pushed; exit 1 if the upload fails")
	retryTimeout := fs.Duration("retry-timeout", 0, "how long to retry transient registry errors (default: as first asked, else 10m)")
	output := fs.String("output", "text", "output format: text or json")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	switch {
	case len(pos) != 1:
		return usagef("retry takes one snapshot id")
	case *retryTimeout < 0:
		return usagef("--retry-timeout must not be negative")
	}
	if err := checkOutput(*output); err != nil {
		return err
	}
	store := a.store()
	st, err := store.Resolve(pos[0])
	if err != nil {
		return usagef("%v", err)
	}
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("retry %s: %w", st.ID, err)
	}
	pid, err := uploader.Resume(exe, a.Dirs.State, st.ID, *retryTimeout)
	switch {
	case errors.Is(err, uploader.ErrDone):
		if *output == "json" {
			return printJSON(a.Stdout, st)
		}
		fmt.Fprintf(a.Stdout, "snapshot %s is already pushed: %s\n", st.ID, st.PushedRef)
		return nil
	case errors.Is(err, uploader.ErrRunning):
		return fmt.Errorf("snapshot %s is being uploaded (uploader pid %d); follow it with: seamless wait %s", st.ID, st.UploaderPID, st.ID)
	case err != nil:
		return fmt.Errorf("retry %s: %w", st.ID, err)
	}
	if *output == "text" {
		fmt.Fprintf(a.Stdout, "snapshot %s: upload to %s restarted (uploader pid %d)\n", st.ID, st.Target, pid)
	}
	if !*wait {
		if *output == "json" {
			now, err := store.Load(st.ID)
			if err != nil {
				return err
			}
			return printJSON(a.Stdout, now)
		}
		fmt.Fprintf(a.Stdout, "follow with: seamless wait %s\n", st.ID)
		return nil
	}
	return a.follow(ctx, st.ID, *output)
}
