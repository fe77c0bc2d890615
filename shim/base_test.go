package shim

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"github.com/seamless-snapshot/seamless/snapshot"
)

func TestBaseImageChoice(t *testing.T) {
	ctx := context.Background()
	const d = "sha256:1111111111111111111111111111111111111111111111111111111111111111"
	target := snapshot.Request{Target: "127.0.0.1:5000/t/snap:1", PlainHTTP: true}

	t.Run("sandbox refused", func(t *testing.T) {
		s := &Shim{cfg: &Config{ContainerID: "p1", Engine: EngineCRI, Annotations: map[string]string{
			AnnotationCRIContainerType: "sandbox", AnnotationCRISandboxName: "web", AnnotationCRISandboxNamespace: "prod",
		}}}
		_, err := s.baseImage(ctx, snapshot.Request{Target: target.Target, Base: "x:1"})
		var reqErr *RequestError
		if !errors.As(err, &reqErr) || !errors.Is(err, ErrSandbox) || !strings.Contains(err.Error(), "prod/web") {
			t.Fatalf("sandbox: %v", err)
		}
	})
	t.Run("--base wins, same registry keeps plain HTTP", func(t *testing.T) {
		s := &Shim{cfg: &Config{ContainerID: "c1", Engine: EngineDocker, Annotations: map[string]string{AnnotationBase: "other:1"}}}
		req := target
		req.Base = "127.0.0.1:5000/b@" + d
		b, err := s.baseImage(ctx, req)
		if err != nil || b.Source != "registry" || b.Ref != req.Base || !b.PlainHTTP || b.DiffIDs != nil {
			t.Fatalf("base = %+v, %v", b, err)
		}
		req.Base = "registry.example.com/b:1"
		if b, _ := s.baseImage(ctx, req); b.PlainHTTP {
			t.Errorf("plain HTTP carried to another registry: %+v", b)
		}
		req.Base = "Not A Ref"
		var reqErr *RequestError
		if _, err := s.baseImage(ctx, req); !errors.As(err, &reqErr) {
			t.Errorf("invalid --base: %v, want a request error", err)
		}
	})
	t.Run("annotation", func(t *testing.T) {
		s := &Shim{cfg: &Config{ContainerID: "c1", Annotations: map[string]string{AnnotationBase: "reg.example/b:2"}}}
		b, err := s.baseImage(ctx, target)
		if err != nil || b.Ref != "reg.example/b:2" || b.Source != "registry" {
			t.Fatalf("base = %+v, %v", b, err)
		}
	})
	t.Run("unknown engine names --base", func(t *testing.T) {
		s := &Shim{cfg: &Config{ContainerID: "c1"}}
		if _, err := s.baseImage(ctx, target); err == nil || !strings.Contains(err.Error(), "--base REF") {
			t.Fatalf("unknown engine: %v", err)
		}
	})
	t.Run("docker", func(t *testing.T) {
		sock := filepath.Join(t.TempDir(), "d.sock")
		l, err := net.Listen("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		repoDigests := `["127.0.0.1:5000/app@` + d + `"]`
		mux := http.NewServeMux()
		mux.HandleFunc("GET /containers/{id}/json", func(w http.ResponseWriter, r *http.Request) {
			w.Write([]byte(`{"Image":"sha256:i","Config":{"Image":"127.0.0.1:5000/app:1"}}`))
		})
		mux.HandleFunc("GET /images/{id}/json", func(w http.ResponseWriter, r *http.Request) {
			w.Write([]byte(`{"Id":"sha256:i","RepoDigests":` + repoDigests + `,"RootFS":{"Layers":["sha256:l1"]}}`))
		})
		srv := &httptest.Server{Listener: l, Config: &http.Server{Handler: mux}}
		srv.Start()
		defer srv.Close()
		s := &Shim{cfg: &Config{ContainerID: "c1", Engine: EngineDocker, DockerHost: sock}}
		b, err := s.baseImage(ctx, target)
		if err != nil || b.Ref != "127.0.0.1:5000/app@"+d || len(b.DiffIDs) != 1 || !b.PlainHTTP {
			t.Fatalf("base = %+v, %v", b, err)
		}
		repoDigests = `[]`
		_, err = s.baseImage(ctx, target)
		if err == nil || !strings.Contains(err.Error(), "no registry digest") || !strings.Contains(err.Error(), "--base REF") {
			t.Fatalf("image without digest: %v", err)
		}
	})
}
