package shim

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"

	"github.com/seamless-snapshot/seamless/snapshot"
)

// Client talks to a shim's control socket.
type Client struct {
	socket string
	http   *http.Client
}

// NewClient returns a client for the shim listening on socket.
func NewClient(socket string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
	}
	return &Client{socket: socket, http: &http.Client{Transport: tr}}
}

// APIError is an error answer of the shim.
type APIError struct {
	Status int
	Msg    string
	State  *snapshot.State
}

func (e *APIError) Error() string { return e.Msg }

// CreateSnapshot asks the shim for a snapshot and returns once it is captured.
func (c *Client) CreateSnapshot(ctx context.Context, req snapshot.Request) (*snapshot.State, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	var st snapshot.State
	if err := c.do(ctx, http.MethodPost, "/v1/snapshots", body, &st); err != nil {
		return nil, err
	}
	return &st, nil
}

// Info returns what the shim knows of its container.
func (c *Client) Info(ctx context.Context) (*Info, error) {
	var info Info
	if err := c.do(ctx, http.MethodGet, "/v1/info", nil, &info); err != nil {
		return nil, err
	}
	return &info, nil
}

func (c *Client) do(ctx context.Context, method, path string, body []byte, out any) error {
	req, err := http.NewRequestWithContext(ctx, method, "http://shim"+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("shim at %s: %w", c.socket, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("shim at %s: read answer: %w", c.socket, err)
	}
	if resp.StatusCode/100 != 2 {
		var e errorBody
		if json.Unmarshal(b, &e) != nil || e.Error == "" {
			e.Error = fmt.Sprintf("HTTP %d: %s", resp.StatusCode, bytes.TrimSpace(b))
		}
		return &APIError{Status: resp.StatusCode, Msg: e.Error, State: e.State}
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("shim at %s: decode answer: %w", c.socket, err)
	}
	return nil
}
