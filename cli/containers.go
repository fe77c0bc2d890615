package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/seamless-snapshot/seamless/internal/proc"
	"github.com/seamless-snapshot/seamless/shim"
)

// shims returns the info of every shim whose socket answers, sorted by id.
func (a *App) shims(ctx context.Context) ([]shim.Info, error) {
	files, err := filepath.Glob(filepath.Join(a.Dirs.Run, "*.json"))
	if err != nil {
		return nil, err
	}
	var out []shim.Info
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		var info shim.Info
		if json.Unmarshal(b, &info) != nil || info.ContainerID == "" {
			continue
		}
		if _, err := os.Stat(a.Dirs.Socket(info.ContainerID)); err != nil {
			continue
		}
		if !pidAlive(info.ShimPID) {
			continue
		}
		out = append(out, info)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ContainerID < out[j].ContainerID })
	return out, nil
}

// findContainer resolves an id or unique id prefix to a shim, among the
// containers of every engine (all shims share the run dir).
func (a *App) findContainer(ctx context.Context, idOrPrefix string) (*shim.Info, error) {
	all, err := a.shims(ctx)
	if err != nil {
		return nil, err
	}
	var matches []shim.Info
	for _, info := range all {
		if info.ContainerID == idOrPrefix {
			return &info, nil
		}
		if strings.HasPrefix(info.ContainerID, idOrPrefix) {
			matches = append(matches, info)
		}
	}
	switch len(matches) {
	case 1:
		return &matches[0], nil
	case 0:
		ids := make([]string, len(all))
		for i, info := range all {
			ids[i] = info.ContainerID
		}
		known := "none"
		if len(ids) > 0 {
			known = strings.Join(ids, ", ")
		}
		return nil, usagef("no container %q among those with a seamless shim in %s (known: %s)", idOrPrefix, a.Dirs.Run, known)
	}
	ids := make([]string, len(matches))
	for i, info := range matches {
		ids[i] = info.ContainerID
		if info.Engine != "" {
			ids[i] += " (" + info.Engine + ")"
		}
	}
	return nil, usagef("container prefix %q is ambiguous: %s", idOrPrefix, strings.Join(ids, ", "))
}

const listUsage = `Usage: seamless list [PREFIX] [--output text|json]

Lists the containers that have a seamless shim, i.e. can be snapshotted,
whatever engine runs them (containerd, Kubernetes CRI, Docker, podman): id,
engine, containerd namespace, image and freezer. With PREFIX, only the
containers whose id starts with it.
`

func (a *App) list(ctx context.Context, args []string) error {
	fs := a.newFlagSet("list", listUsage)
	output := fs.String("output", "text", "output format: text or json")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 1 {
		return usagef("list takes at most one container id prefix")
	}
	if err := checkOutput(*output); err != nil {
		return err
	}
	all, err := a.shims(ctx)
	if err != nil {
		return err
	}
	if len(pos) == 1 {
		all = withPrefix(all, pos[0])
	}
	if *output == "json" {
		if all == nil {
			all = []shim.Info{}
		}
		return printJSON(a.Stdout, all)
	}
	tw := tabwriter.NewWriter(a.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "CONTAINER\tENGINE\tNAMESPACE\tIMAGE\tFREEZER\tSHIM PID\tSINCE")
	for _, info := range all {
		since := info.StartedAt
		if t, err := time.Parse(time.RFC3339Nano, info.StartedAt); err == nil {
			since = t.Local().Format("2006-01-02 15:04:05")
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%s\n", info.ContainerID, dash(info.Engine), dash(info.Namespace), dash(info.Image), info.Freezer, info.ShimPID, since)
	}
	return tw.Flush()
}

// withPrefix keeps the shims whose container id starts with prefix.
func withPrefix(all []shim.Info, prefix string) []shim.Info {
	var out []shim.Info
	for _, info := range all {
		if strings.HasPrefix(info.ContainerID, prefix) {
			out = append(out, info)
		}
	}
	return out
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// pidAlive reports whether pid is a running (not zombie) process.
func pidAlive(pid int) bool { return proc.Alive(pid, 0) }

func printJSON(w interface{ Write([]byte) (int, error) }, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}
