package cli

import (
	"context"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/seamless-snapshot/seamless/uploader"
)

const gcUsage = `Usage: seamless gc --older-than DURATION [--dry-run] [--output text|json]

Removes the directories of snapshots that are done, failed or interrupted
and were last updated more than DURATION ago (e.g. 168h): their manifest,
state, log, and any capture data and spool left by a failure. A snapshot
whose uploader is running, or that is being captured, is never removed.
`

func (a *App) gc(ctx context.Context, args []string) error {
	fs := a.newFlagSet("gc", gcUsage)
	olderThan := fs.Duration("older-than", -1, "remove snapshots last updated longer ago than this (required), e.g. 24h")
	dryRun := fs.Bool("dry-run", false, "list what would be removed, remove nothing")
	output := fs.String("output", "text", "output format: text or json")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	switch {
	case len(pos) > 0:
		return usagef("gc takes no positional arguments (got %q)", pos)
	case *olderThan < 0:
		return usagef("--older-than DURATION is required (e.g. --older-than 168h)")
	}
	if err := checkOutput(*output); err != nil {
		return err
	}
	removed, err := uploader.Collect(a.store(), time.Now().Add(-*olderThan), *dryRun)
	if *output == "json" {
		if removed == nil {
			removed = []uploader.Collected{}
		}
		if perr := printJSON(a.Stdout, removed); perr != nil {
			return perr
		}
		return err
	}
	verb := "removed"
	if *dryRun {
		verb = "would remove"
	}
	tw := tabwriter.NewWriter(a.Stdout, 0, 4, 2, ' ', 0)
	var total int64
	for _, c := range removed {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", verb, c.ID, c.Phase, humanBytes(c.Bytes))
		total += c.Bytes
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintf(a.Stdout, "%s %d snapshot(s), %s\n", verb, len(removed), humanBytes(total))
	return err
}
