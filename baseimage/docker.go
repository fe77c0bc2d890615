package baseimage

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
)

// DefaultDockerHost is the Docker API socket when nothing else says where it is.
const DefaultDockerHost = "/var/run/docker.sock"

// DockerSocketPath turns a Docker host ("unix:///path", "/path") into a
// socket path; other schemes (tcp://, fd://, ssh://) give "".
func DockerSocketPath(host string) string {
	switch {
	case strings.HasPrefix(host, "unix://"):
		host = strings.TrimPrefix(host, "unix://")
	case strings.Contains(host, "://"):
		return ""
	}
	if !filepath.IsAbs(host) {
		return ""
	}
	return filepath.Clean(host)
}

// DockerHostFromCmdline returns the first unix socket dockerd listens on
// according to its command line (-H/--host, in any spelling); "" when the
// command line names none (dockerd then uses DefaultDockerHost, or a socket
// from daemon.json's "hosts" that this does not read).
func DockerHostFromCmdline(args []string) string {
	for i := 1; i < len(args); i++ {
		a := args[i]
		var v string
		switch {
		case a == "-H" || a == "--host":
			if i+1 >= len(args) {
				return ""
			}
			i++
			v = args[i]
		case strings.HasPrefix(a, "-H="), strings.HasPrefix(a, "--host="):
			_, v, _ = strings.Cut(a, "=")
		case strings.HasPrefix(a, "-H") && len(a) > 2 && a[2] != '-':
			v = a[2:]
		default:
			continue
		}
		if p := DockerSocketPath(v); p != "" {
			return p
		}
	}
	return ""
}

// dockerClient talks to the Docker Engine API over a unix socket.
type dockerClient struct {
	socket string
	http   *http.Client
}

func newDockerClient(host string) (*dockerClient, error) {
	socket := DockerSocketPath(host)
	if socket == "" {
		return nil, fmt.Errorf("docker host %q: want a unix socket (unix:///path)", host)
	}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		DisableKeepAlives: true,
	}
	return &dockerClient{socket: socket, http: &http.Client{Transport: tr, Timeout: DefaultTimeout}}, nil
}

// get decodes the JSON answer to GET path into v.
func (c *dockerClient) get(ctx context.Context, path string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://docker"+path, nil)
	if err != nil {
		return fmt.Errorf("docker API GET %s: %w", path, err)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("docker API at %s: %w", c.socket, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	if err != nil {
		return fmt.Errorf("docker API GET %s: %w", path, err)
	}
	if resp.StatusCode != http.StatusOK {
		var msg struct {
			Message string `json:"message"`
		}
		if json.Unmarshal(body, &msg) != nil || msg.Message == "" {
			msg.Message = strings.TrimSpace(string(body))
		}
		return &dockerAPIError{Status: resp.StatusCode, Msg: msg.Message}
	}
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("docker API GET %s: decode: %w", path, err)
	}
	return nil
}

// dockerAPIError is a non-200 answer of the Docker API.
type dockerAPIError struct {
	Status int
	Msg    string
}

func (e *dockerAPIError) Error() string {
	return fmt.Sprintf("docker API: %d %s: %s", e.Status, http.StatusText(e.Status), e.Msg)
}

// DockerImage asks the Docker API at host which image container id was
// created from: the reference it was created with, the image id, the image's
// repo digests and its layers' diff ids.
func DockerImage(ctx context.Context, host, id string) (*EngineImage, error) {
	c, err := newDockerClient(host)
	if err != nil {
		return nil, err
	}
	var ctr struct {
		Image  string `json:"Image"`
		Config struct {
			Image string `json:"Image"`
		} `json:"Config"`
	}
	if err := c.get(ctx, "/containers/"+url.PathEscape(id)+"/json", &ctr); err != nil {
		var apiErr *dockerAPIError
		if errors.As(err, &apiErr) && apiErr.Status == http.StatusNotFound {
			return nil, fmt.Errorf("docker at %s knows no container %s", c.socket, id)
		}
		return nil, fmt.Errorf("inspect docker container %s: %w", id, err)
	}
	if ctr.Image == "" {
		return nil, fmt.Errorf("docker container %s has no image", id)
	}
	var img struct {
		ID          string   `json:"Id"`
		RepoDigests []string `json:"RepoDigests"`
		RootFS      struct {
			Layers []string `json:"Layers"`
		} `json:"RootFS"`
	}
	if err := c.get(ctx, "/images/"+url.PathEscape(ctr.Image)+"/json", &img); err != nil {
		return nil, fmt.Errorf("inspect docker image %s of container %s: %w", ctr.Image, id, err)
	}
	return &EngineImage{Name: ctr.Config.Image, ID: img.ID, RepoDigests: img.RepoDigests, DiffIDs: img.RootFS.Layers}, nil
}

// DockerConfigImage reads the image reference a Docker container was
// created with from its config.v2.json in containerDir
// (<data-root>/containers/<id>), without asking the daemon.
func DockerConfigImage(containerDir string) (string, error) {
	b, err := os.ReadFile(filepath.Join(containerDir, "config.v2.json"))
	if err != nil {
		return "", fmt.Errorf("docker container config: %w", err)
	}
	var cfg struct {
		Config struct {
			Image string `json:"Image"`
		} `json:"Config"`
	}
	if err := json.Unmarshal(b, &cfg); err != nil {
		return "", fmt.Errorf("decode %s/config.v2.json: %w", containerDir, err)
	}
	return cfg.Config.Image, nil
}
