package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/seamless-snapshot/seamless/shim"
	"github.com/seamless-snapshot/seamless/snapshot"
	"github.com/seamless-snapshot/seamless/uploader"
)

const snapshotUsage = `Usage: seamless snapshot --container ID|PREFIX --target REF [flags]

Freezes the container for the capture of its filesystem changes (its overlay
upper dir), thaws it, and pushes base image + one new layer to REF in the
background. Without --wait it returns as soon as the capture is consistent.
'commit' is an alias.
`

func (a *App) snapshot(ctx context.Context, args []string) error {
	fs := a.newFlagSet("snapshot", snapshotUsage)
	container := fs.String("container", "", "container id or unique id prefix (required)")
	target := fs.String("target", "", "image reference to push to, e.g. registry.example.com/team/dev:1 (required)")
	wait := fs.Bool("wait", false, "wait until the image is pushed; exit 1 if the upload fails")
	plainHTTP := fs.Bool("plain-http", false, "talk to the registry over plain HTTP")
	insecure := fs.Bool("target-insecure", false, "do not verify the registry's TLS certificate")
	compression := fs.String("compression", "gzip", "layer compression: gzip or zstd")
	oci := fs.Bool("oci", false, "push OCI media types even when the base image has Docker ones (zstd implies it)")
	retryTimeout := fs.Duration("retry-timeout", 0, "how long to retry transient registry errors (default 10m, or $"+uploader.EnvRetryTimeout+" of the uploader)")
	base := fs.String("base", "", "registry reference of the container's base image, when its engine cannot tell (e.g. an image built locally)")
	output := fs.String("output", "text", "output format: text or json")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	switch {
	case len(pos) > 0:
		return usagef("snapshot takes no positional arguments (got %q); use --container and --target", pos)
	case *container == "":
		return usagef("--container is required")
	case *target == "":
		return usagef("--target is required")
	case *retryTimeout < 0:
		return usagef("--retry-timeout must not be negative")
	}
	if err := checkOutput(*output); err != nil {
		return err
	}
	info, err := a.findContainer(ctx, *container)
	if err != nil {
		return err
	}
	req := snapshot.Request{Target: *target, PlainHTTP: *plainHTTP, Insecure: *insecure, Compression: *compression, Base: *base,
		OCI: *oci, RetryTimeout: snapshot.Duration(*retryTimeout)}
	st, err := shim.NewClient(info.Socket).CreateSnapshot(ctx, req)
	if err != nil {
		var apiErr *shim.APIError
		if errors.As(err, &apiErr) && apiErr.Status == 400 {
			return usagef("%s", apiErr.Msg)
		}
		return fmt.Errorf("snapshot %s: %w", info.ContainerID, err)
	}
	if *output == "text" {
		a.printCaptured(st)
	}
	if !*wait {
		if *output == "json" {
			return printJSON(a.Stdout, st)
		}
		fmt.Fprintf(a.Stdout, "uploading to %s in the background; follow with: seamless wait %s\n", st.Target, st.ID)
		return nil
	}
	return a.follow(ctx, st.ID, *output)
}

func (a *App) printCaptured(st *snapshot.State) {
	fmt.Fprintf(a.Stdout, "snapshot %s of %s captured: %d entries, %s\n", st.ID, st.Container, st.Entries, humanBytes(st.Bytes))
	fmt.Fprintf(a.Stdout, "pause: %d µs (freeze %d µs, re-capture %d µs of %d dirty entries, thaw %d µs, %s freezer)\n",
		st.PauseUS, st.Pause.FreezeUS, st.Pause.CaptureUS, st.Capture.DirtyEntries, st.Pause.ThawUS, st.Freezer)
	if c := st.Capture; c.Strategy != "" {
		line := fmt.Sprintf("pre-copy: %d ms, %d round(s), data by %s", c.PrecopyMS, c.PrecopyRounds, dash(c.DataCopy))
		if c.MappedFiles > 0 {
			line += fmt.Sprintf("; %d file(s) mapped shared-writable copied again in the pause", c.MappedFiles)
		}
		if c.Fallback {
			line += "; dirty tracking unavailable, full rescan in the pause: " + c.FallbackReason
		}
		fmt.Fprintln(a.Stdout, line)
	}
}

const waitUsage = `Usage: seamless wait ID [--output text|json]

Follows a snapshot's upload until it is pushed (exit 0) or failed (exit 1).
ID may be a unique prefix.
`

func (a *App) wait(ctx context.Context, args []string) error {
	fs := a.newFlagSet("wait", waitUsage)
	output := fs.String("output", "text", "output format: text or json")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usagef("wait takes one snapshot id")
	}
	if err := checkOutput(*output); err != nil {
		return err
	}
	st, err := a.store().Resolve(pos[0])
	if err != nil {
		return usagef("%v", err)
	}
	return a.follow(ctx, st.ID, *output)
}

// follow polls a snapshot's state until it is final, showing progress.
func (a *App) follow(ctx context.Context, id, output string) error {
	store := a.store()
	p := newProgress(a.Stdout, a.IsTerminal && output == "text")
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		st, err := store.Load(id)
		if err != nil {
			return err
		}
		st = withLiveness(st)
		if output == "text" {
			p.show(st)
		}
		if st.Phase.Final() || st.Phase == phaseInterrupted {
			p.done()
			if output == "json" {
				if err := printJSON(a.Stdout, st); err != nil {
					return err
				}
			}
			if st.Phase == snapshot.PhaseDone {
				if output == "text" {
					fmt.Fprintf(a.Stdout, "pushed %s (digest %s)\n", st.Target, st.Digest)
				}
				return nil
			}
			if output == "text" {
				fmt.Fprintf(a.Stderr, "seamless: snapshot %s %s: %s\n", st.ID, st.Phase, st.Error)
			}
			return errReported
		}
		select {
		case <-ctx.Done():
			p.done()
			return fmt.Errorf("stopped waiting for %s (it continues in the background): %w", id, ctx.Err())
		case <-tick.C:
		}
	}
}

// phaseInterrupted is shown for a snapshot whose uploader died mid-way.
const phaseInterrupted = snapshot.PhaseInterrupted

// withLiveness marks a non-final snapshot whose uploader is gone (its pid
// is dead, or now another process's) as interrupted.
func withLiveness(st *snapshot.State) *snapshot.State {
	if !uploader.Interrupted(st) {
		return st
	}
	c := *st
	c.Phase = phaseInterrupted
	if c.Error == "" {
		c.Error = fmt.Sprintf("uploader (pid %d) exited before finishing; continue with: seamless retry %s", st.UploaderPID, st.ID)
	}
	return &c
}

const statusUsage = `Usage: seamless status [ID] [--output text|json]

Shows one snapshot (ID or a unique prefix) or, without ID, every snapshot
(as a JSON array with --output json).
`

func (a *App) status(ctx context.Context, args []string) error {
	fs := a.newFlagSet("status", statusUsage)
	output := fs.String("output", "text", "output format: text or json")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 1 {
		return usagef("status takes at most one snapshot id")
	}
	if err := checkOutput(*output); err != nil {
		return err
	}
	store := a.store()
	if len(pos) == 1 {
		st, err := store.Resolve(pos[0])
		if err != nil {
			return usagef("%v", err)
		}
		st = a.reload(store, st)
		if *output == "json" {
			return printJSON(a.Stdout, st)
		}
		return a.printState(st)
	}
	all, err := store.List()
	if err != nil {
		return err
	}
	for i, st := range all {
		all[i] = a.reload(store, st)
	}
	if *output == "json" {
		if all == nil {
			all = []*snapshot.State{}
		}
		return printJSON(a.Stdout, all)
	}
	tw := tabwriter.NewWriter(a.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tCONTAINER\tSTATE\tPAUSE\tTARGET\tDIGEST")
	for _, st := range all {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%dµs\t%s\t%s\n", st.ID, st.Container, st.Phase, st.PauseUS, st.Target, dash(short(st.Digest)))
	}
	return tw.Flush()
}

// reload applies the liveness check, re-reading the state once so that an
// uploader finishing between the read and the check is not misreported.
func (a *App) reload(store snapshot.Store, st *snapshot.State) *snapshot.State {
	checked := withLiveness(st)
	if checked.Phase != phaseInterrupted {
		return checked
	}
	if again, err := store.Load(st.ID); err == nil {
		return withLiveness(again)
	}
	return checked
}

func (a *App) printState(st *snapshot.State) error {
	tw := tabwriter.NewWriter(a.Stdout, 0, 4, 1, ' ', 0)
	row := func(k, v string) { fmt.Fprintf(tw, "%s:\t%s\n", k, v) }
	row("id", st.ID)
	row("container", st.Container)
	row("target", st.Target)
	row("state", string(st.Phase))
	if st.Progress.Total > 0 && !st.Phase.Final() {
		row("progress", fmt.Sprintf("%s / %s", humanBytes(st.Progress.Done), humanBytes(st.Progress.Total)))
	}
	row("captured at", st.CapturedAt.Local().Format(time.RFC3339Nano))
	row("pause", fmt.Sprintf("%d µs (freeze %d, capture %d, thaw %d; %s freezer)", st.PauseUS, st.Pause.FreezeUS, st.Pause.CaptureUS, st.Pause.ThawUS, st.Freezer))
	row("entries", fmt.Sprintf("%d (%s)", st.Entries, humanBytes(st.Bytes)))
	row("base", dash(st.Base.Ref))
	if st.LayerDigest != "" {
		row("layer", fmt.Sprintf("%s (%s, %s uncompressed)", st.LayerDigest, humanBytes(st.LayerSize), humanBytes(st.LayerUncompressedSize)))
	}
	if st.Upload.Runs > 0 {
		row("upload", uploadSummary(st))
	}
	row("digest", dash(st.Digest))
	if st.Error != "" {
		row("error", st.Error)
	}
	return tw.Flush()
}

// uploadSummary says how the upload went: runs, timings, bytes sent, retries.
func uploadSummary(st *snapshot.State) string {
	u := st.Upload
	s := fmt.Sprintf("build %d ms, push %d ms, %s sent", u.BuildMS, u.PushMS, humanBytes(u.PushedBytes))
	if !u.FinishedAt.IsZero() && !st.CapturedAt.IsZero() {
		s += fmt.Sprintf(", %.1f s after the capture", u.FinishedAt.Sub(st.CapturedAt).Seconds())
	}
	if u.SpoolReused {
		s += ", spool reused"
	}
	if u.Retries > 0 {
		s += fmt.Sprintf(", %d transient errors retried", u.Retries)
	}
	if u.Runs > 1 {
		s += fmt.Sprintf(", %d runs", u.Runs)
	}
	return s
}

func (a *App) store() snapshot.Store { return snapshot.Store{Root: a.Dirs.SnapshotsDir()} }

func short(digest string) string {
	if len(digest) > 19 {
		return digest[:19]
	}
	return digest
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// progress prints a snapshot's phase changes, as a bar on a terminal.
type progress struct {
	w        io.Writer
	terminal bool
	last     string
	lastLine time.Time
	bar      bool
}

func newProgress(w io.Writer, terminal bool) *progress { return &progress{w: w, terminal: terminal} }

func (p *progress) show(st *snapshot.State) {
	pct := ""
	if st.Progress.Total > 0 {
		pct = fmt.Sprintf(" %3d%% %s/%s", st.Progress.Done*100/st.Progress.Total, humanBytes(st.Progress.Done), humanBytes(st.Progress.Total))
	}
	if p.terminal {
		fmt.Fprintf(p.w, "\r\033[K%-9s%s%s", st.Phase, bar(st.Progress), pct)
		p.bar = true
		return
	}
	line := string(st.Phase) + pct
	if string(st.Phase) != p.last || time.Since(p.lastLine) > 2*time.Second && line != p.last {
		fmt.Fprintln(p.w, line)
		p.lastLine = time.Now()
	}
	p.last = string(st.Phase)
}

func (p *progress) done() {
	if p.bar {
		fmt.Fprintln(p.w)
		p.bar = false
	}
}

func bar(pr snapshot.Progress) string {
	if pr.Total <= 0 {
		return ""
	}
	const width = 30
	n := int(pr.Done * width / pr.Total)
	if n > width {
		n = width
	}
	return " [" + strings.Repeat("#", n) + strings.Repeat(".", width-n) + "]"
}

func signalContext() (context.Context, func()) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}
