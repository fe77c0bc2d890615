package testenv

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"time"
)

// RegistryOptions configures StartRegistry.
type RegistryOptions struct {
	// Dir is where the instance's temp dir is created; default os.TempDir().
	Dir string
	// Binary is the registry binary; default "docker-registry" (Debian).
	Binary string
	// StartTimeout bounds the wait for GET /v2/; default 30s.
	StartTimeout time.Duration
	// TLS serves HTTPS with a self-signed certificate for 127.0.0.1 and
	// localhost (Registry.CertPath), which no client trusts by default.
	TLS bool
	// Htpasswd, when not empty, requires HTTP basic auth with these users
	// (name → password), kept bcrypt-hashed in an htpasswd file.
	Htpasswd map[string]string
}

// Registry is a distribution registry (v2.8) on 127.0.0.1, started by
// StartRegistry.
type Registry struct {
	// Host is "127.0.0.1:PORT".
	Host string
	// Dir is the instance's private directory (removed by Close).
	Dir string
	// StorageDir is the registry's filesystem storage root.
	StorageDir string
	// LogPath receives the registry's application and access logs.
	LogPath string
	// PID is the registry's process id.
	PID int
	// Scheme is "https" with RegistryOptions.TLS, else "http".
	Scheme string
	// CertPath is the PEM certificate served with RegistryOptions.TLS (it
	// is its own CA: trust it, or skip verification).
	CertPath string

	opts      RegistryOptions
	d         *daemon
	client    *http.Client
	closeOnce sync.Once
	closeErr  error
}

// StartRegistry starts a registry with its own config on a free loopback
// port (no auth, deletes enabled) and waits until GET /v2/ answers 200.
func StartRegistry(ctx context.Context, opts RegistryOptions) (*Registry, error) {
	dir, err := os.MkdirTemp(opts.Dir, "sl-reg-")
	if err != nil {
		return nil, fmt.Errorf("registry dir: %w", err)
	}
	r := &Registry{
		Dir:        dir,
		StorageDir: filepath.Join(dir, "storage"),
		LogPath:    filepath.Join(dir, "registry.log"),
		Scheme:     "http",
		opts:       opts,
		client:     &http.Client{Timeout: 10 * time.Second},
	}
	var errs []error
	if err := r.prepareSecurity(); err != nil {
		return nil, fmt.Errorf("start registry: %w", errors.Join(err, os.RemoveAll(dir)))
	}
	// The free port can be taken between probing and binding: retry.
	for attempt := 0; attempt < 3; attempt++ {
		err := r.start(ctx, opts)
		if err == nil {
			return r, nil
		}
		errs = append(errs, err)
		if r.d != nil {
			errs = append(errs, r.d.stop(5*time.Second))
			r.d = nil
		}
		if !strings.Contains(err.Error(), "address already in use") {
			break
		}
	}
	errs = append(errs, os.RemoveAll(dir))
	return nil, fmt.Errorf("start registry: %w", errors.Join(errs...))
}

func (r *Registry) start(ctx context.Context, opts RegistryOptions) error {
	port, err := freePort()
	if err != nil {
		return err
	}
	r.Host = fmt.Sprintf("127.0.0.1:%d", port)
	cfg := filepath.Join(r.Dir, "config.yml")
	if err := os.WriteFile(cfg, []byte(r.config()), 0o644); err != nil {
		return fmt.Errorf("write config: %w", err)
	}
	return r.launch(ctx, opts)
}

// launch starts the registry process with the config already in Dir.
func (r *Registry) launch(ctx context.Context, opts RegistryOptions) error {
	cfg := filepath.Join(r.Dir, "config.yml")
	bin := opts.Binary
	if bin == "" {
		bin = "docker-registry"
	}
	d, err := startDaemon(bin, []string{"serve", cfg}, nil, r.LogPath)
	if err != nil {
		return err
	}
	r.d, r.PID = d, d.pid()
	rec := instanceRecord{Kind: "registry", OwnerPID: os.Getpid(), OwnerStart: processStartTime(os.Getpid()),
		PID: r.PID, PIDStart: processStartTime(r.PID)}
	if err := writeRecord(r.Dir, rec); err != nil {
		return err
	}
	timeout := opts.StartTimeout
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	return d.waitReady(ctx, timeout, r.ping)
}

func (r *Registry) config() string {
	return r.baseConfig() + r.securityConfig()
}

func (r *Registry) baseConfig() string {
	return fmt.Sprintf(`version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
`, r.StorageDir, r.Host)
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func (r *Registry) ping(ctx context.Context) error {
	resp, err := r.get(ctx, "/v2/")
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK && !(resp.StatusCode == http.StatusUnauthorized && len(r.opts.Htpasswd) > 0) {
		return fmt.Errorf("GET /v2/: %s", resp.Status)
	}
	return nil
}

func (r *Registry) get(ctx context.Context, path string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, r.Scheme+"://"+r.Host+path, nil)
	if err != nil {
		return nil, fmt.Errorf("request %s: %w", path, err)
	}
	r.authorize(req)
	resp, err := r.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", path, err)
	}
	return resp, nil
}

// Catalog returns the repositories in the registry (GET /v2/_catalog).
func (r *Registry) Catalog(ctx context.Context) ([]string, error) {
	resp, err := r.get(ctx, "/v2/_catalog?n=1000")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET /v2/_catalog: %s", resp.Status)
	}
	var body struct {
		Repositories []string `json:"repositories"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		return nil, fmt.Errorf("decode catalog: %w", err)
	}
	return body.Repositories, nil
}

// accessLine matches the request and status of a combined-format access
// log line: "PUT /v2/... HTTP/1.1" 201.
var accessLine = regexp.MustCompile(`"(PUT|POST) (\S+) HTTP/[0-9.]+" (\d{3}) `)

// BlobUploads counts the completed uploads of the blob with digest
// ("sha256:..."), from the access log: a PUT (or monolithic POST) on
// .../blobs/uploads/... with ?digest=<digest> answered 201. Cross-repo mounts
// are not uploads and are not counted.
func (r *Registry) BlobUploads(digest string) (int, error) {
	f, err := os.Open(r.LogPath)
	if err != nil {
		return 0, fmt.Errorf("open registry log: %w", err)
	}
	defer f.Close()
	n := 0
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		if isBlobUpload(sc.Text(), digest) {
			n++
		}
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("read registry log: %w", err)
	}
	return n, nil
}

func isBlobUpload(line, digest string) bool {
	m := accessLine.FindStringSubmatch(line)
	if m == nil || m[3] != "201" {
		return false
	}
	u, err := url.Parse(m[2])
	if err != nil || !strings.Contains(u.Path, "/blobs/uploads/") {
		return false
	}
	return u.Query().Get("digest") == digest
}

// Stop stops the registry process (SIGTERM, then SIGKILL), keeping its
// storage, config and port for Restart. Clients then get "connection
// refused".
func (r *Registry) Stop() error {
	if r.d == nil {
		return nil
	}
	err := r.d.stop(10 * time.Second)
	r.d = nil
	if err != nil {
		return fmt.Errorf("stop registry: %w", err)
	}
	return nil
}

// Restart starts the registry again on the same host and port, with the
// same storage and config, stopping it first if it runs, and waits until
// it answers. It fails if another process took the port meanwhile.
func (r *Registry) Restart(ctx context.Context) error {
	if err := r.Stop(); err != nil {
		return err
	}
	if err := r.launch(ctx, r.opts); err != nil {
		if r.d != nil {
			err = errors.Join(err, r.d.stop(5*time.Second))
			r.d = nil
		}
		return fmt.Errorf("restart registry: %w", err)
	}
	return nil
}

// Close stops the registry by PID and removes Dir. Later calls return the
// first call's result.
func (r *Registry) Close() error {
	r.closeOnce.Do(func() {
		var errs []error
		if r.d != nil {
			errs = append(errs, r.d.stop(10*time.Second))
		}
		errs = append(errs, os.RemoveAll(r.Dir))
		r.closeErr = errors.Join(errs...)
	})
	return r.closeErr
}
