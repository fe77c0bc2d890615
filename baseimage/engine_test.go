package baseimage

import (
	"context"
	"encoding/json"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

func TestRegistryRef(t *testing.T) {
	const d1 = "sha256:1111111111111111111111111111111111111111111111111111111111111111"
	const d2 = "sha256:2222222222222222222222222222222222222222222222222222222222222222"
	for _, tc := range []struct {
		name string
		img  EngineImage
		want string
	}{
		{"same repository wins", EngineImage{Name: "reg.example/b:1", RepoDigests: []string{"reg.example/a@" + d1, "reg.example/b@" + d2}}, "reg.example/b@" + d2},
		{"first otherwise", EngineImage{Name: "other:1", RepoDigests: []string{"reg.example/a@" + d1, "reg.example/b@" + d2}}, "reg.example/a@" + d1},
		{"podman localhost skipped", EngineImage{Name: "localhost/x:1", RepoDigests: []string{"localhost/x@" + d1, "127.0.0.1:5000/x@" + d2}}, "127.0.0.1:5000/x@" + d2},
		{"docker hub short names", EngineImage{Name: "busybox", RepoDigests: []string{"busybox@" + d1}}, "busybox@" + d1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.img.RegistryRef()
			if err != nil || got != tc.want {
				t.Fatalf("RegistryRef() = %q, %v; want %q", got, err, tc.want)
			}
		})
	}
	_, err := (&EngineImage{Name: "localhost/built:1", ID: "abc", RepoDigests: []string{"localhost/built@" + d1}}).RegistryRef()
	if err == nil || !strings.Contains(err.Error(), "localhost/built:1 (abc)") || !strings.Contains(err.Error(), "no registry digest") {
		t.Fatalf("local-only image: %v", err)
	}
}

func TestDockerHostFromCmdline(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"dockerd", "-H", "unix:///tmp/d.sock"}, "/tmp/d.sock"},
		{[]string{"dockerd", "--host=tcp://0.0.0.0:2375", "--host", "unix:///run/x.sock"}, "/run/x.sock"},
		{[]string{"dockerd", "-H=unix:///a/b.sock"}, "/a/b.sock"},
		{[]string{"dockerd", "-Hunix:///c.sock"}, "/c.sock"},
		{[]string{"dockerd", "-H", "fd://"}, ""},
		{[]string{"dockerd", "--data-root", "/x"}, ""},
		{[]string{"dockerd", "-H"}, ""},
	} {
		if got := DockerHostFromCmdline(tc.args); got != tc.want {
			t.Errorf("DockerHostFromCmdline(%q) = %q, want %q", tc.args, got, tc.want)
		}
	}
}

// fakeDocker serves the two Docker API calls DockerImage makes on a unix socket.
func fakeDocker(t *testing.T) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "docker.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /containers/{id}/json", func(w http.ResponseWriter, r *http.Request) {
		switch r.PathValue("id") {
		case "c1":
			w.Write([]byte(`{"Id":"c1","Image":"sha256:img1","Config":{"Image":"127.0.0.1:5000/app:1"}}`))
		case "c2":
			w.Write([]byte(`{"Id":"c2","Image":"sha256:gone","Config":{"Image":"gone:1"}}`))
		default:
			w.WriteHeader(http.StatusNotFound)
			w.Write([]byte(`{"message":"No such container: ` + r.PathValue("id") + `"}`))
		}
	})
	mux.HandleFunc("GET /images/{id}/json", func(w http.ResponseWriter, r *http.Request) {
		if r.PathValue("id") != "sha256:img1" {
			w.WriteHeader(http.StatusNotFound)
			w.Write([]byte(`{"message":"No such image"}`))
			return
		}
		json.NewEncoder(w).Encode(map[string]any{
			"Id": "sha256:img1", "RepoDigests": []string{"127.0.0.1:5000/app@sha256:aa"},
			"RootFS": map[string]any{"Type": "layers", "Layers": []string{"sha256:l1", "sha256:l2"}},
		})
	})
	srv := &httptest.Server{Listener: l, Config: &http.Server{Handler: mux}}
	srv.Start()
	t.Cleanup(srv.Close)
	return sock
}

func TestDockerImage(t *testing.T) {
	sock := fakeDocker(t)
	ctx := context.Background()
	img, err := DockerImage(ctx, "unix://"+sock, "c1")
	if err != nil {
		t.Fatal(err)
	}
	want := &EngineImage{Name: "127.0.0.1:5000/app:1", ID: "sha256:img1", RepoDigests: []string{"127.0.0.1:5000/app@sha256:aa"}, DiffIDs: []string{"sha256:l1", "sha256:l2"}}
	if !reflect.DeepEqual(img, want) {
		t.Fatalf("DockerImage = %+v, want %+v", img, want)
	}
	if _, err := DockerImage(ctx, sock, "nope"); err == nil || !strings.Contains(err.Error(), "knows no container nope") {
		t.Errorf("unknown container: %v", err)
	}
	if _, err := DockerImage(ctx, sock, "c2"); err == nil || !strings.Contains(err.Error(), "No such image") {
		t.Errorf("unknown image: %v", err)
	}
	if _, err := DockerImage(ctx, filepath.Join(t.TempDir(), "none.sock"), "c1"); err == nil || !strings.Contains(err.Error(), "docker API at") {
		t.Errorf("no daemon: %v", err)
	}
	if _, err := DockerImage(ctx, "tcp://127.0.0.1:2375", "c1"); err == nil || !strings.Contains(err.Error(), "unix socket") {
		t.Errorf("tcp host: %v", err)
	}
}

func TestDockerConfigImage(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "config.v2.json"), []byte(`{"ID":"x","Config":{"Image":"reg/app:2"},"Image":"sha256:1"}`), 0o600)
	if got, err := DockerConfigImage(dir); err != nil || got != "reg/app:2" {
		t.Fatalf("DockerConfigImage = %q, %v", got, err)
	}
	if _, err := DockerConfigImage(t.TempDir()); err == nil {
		t.Fatal("missing config.v2.json: no error")
	}
}

// writePodmanStorage lays out the containers/storage files PodmanImage reads,
// in the format podman 4.3 writes (observed).
func writePodmanStorage(t *testing.T, graph string, withConfig bool) {
	t.Helper()
	const imgID = "00d39dba8b8f01e942be506df470cd43e5eced7a21f21a1de0b003e60bd66410"
	ctrs := `[{"id":"c1","names":["pm1"],"image":"` + imgID + `","layer":"l1",
	  "metadata":"{\"image-name\":\"127.0.0.1:35123/probe/base:1\",\"image-id\":\"` + imgID + `\",\"name\":\"pm1\",\"created-at\":1}"}]`
	imgs := `[{"id":"` + imgID + `","digest":"sha256:04cba502280a1160282cc54527f78f178d907b09fea7d0b85bcc34835cfceb39",
	  "names":["127.0.0.1:35123/probe/base:1","localhost/probe:1"],"layer":"b8"}]`
	for _, d := range []string{"overlay-containers/c1/userdata", "overlay-images/" + imgID} {
		if err := os.MkdirAll(filepath.Join(graph, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(filepath.Join(graph, "overlay-containers/containers.json"), []byte(ctrs), 0o600)
	os.WriteFile(filepath.Join(graph, "overlay-images/images.json"), []byte(imgs), 0o600)
	if withConfig {
		cfg := `{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:b809c763f43bab53ee373d9a143706c34f523aed0694deecae016bc45136f89d"]}}`
		// The file name podman used for this image's config (observed).
		f := "=c2hhMjU2OjAwZDM5ZGJhOGI4ZjAxZTk0MmJlNTA2ZGY0NzBjZDQzZTVlY2VkN2EyMWYyMWExZGUwYjAwM2U2MGJkNjY0MTA="
		os.WriteFile(filepath.Join(graph, "overlay-images", imgID, f), []byte(cfg), 0o600)
	}
}

func TestPodmanImage(t *testing.T) {
	graph := t.TempDir()
	writePodmanStorage(t, graph, true)
	dir := PodmanContainersDir(filepath.Join(graph, "overlay-containers/c1/userdata"))
	if dir != filepath.Join(graph, "overlay-containers") {
		t.Fatalf("PodmanContainersDir = %q", dir)
	}
	img, err := PodmanImage(dir, "c1")
	if err != nil {
		t.Fatal(err)
	}
	if img.Name != "127.0.0.1:35123/probe/base:1" || len(img.DiffIDs) != 1 || !strings.HasPrefix(img.DiffIDs[0], "sha256:b809") {
		t.Fatalf("PodmanImage = %+v", img)
	}
	ref, err := img.RegistryRef()
	if err != nil || ref != "127.0.0.1:35123/probe/base@sha256:04cba502280a1160282cc54527f78f178d907b09fea7d0b85bcc34835cfceb39" {
		t.Fatalf("RegistryRef = %q, %v (repo digests %v)", ref, err, img.RepoDigests)
	}
	if PodmanImageName(dir, "c1") != img.Name {
		t.Error("PodmanImageName differs")
	}
	if _, err := PodmanImage(dir, "nope"); err == nil || !strings.Contains(err.Error(), "no container nope") {
		t.Errorf("unknown container: %v", err)
	}
	// Without a readable config the diff ids are unknown, not an error.
	graph2 := t.TempDir()
	writePodmanStorage(t, graph2, false)
	img2, err := PodmanImage(filepath.Join(graph2, "overlay-containers"), "c1")
	if err != nil || img2.DiffIDs != nil {
		t.Fatalf("without config: %+v, %v", img2, err)
	}
	for _, bad := range []string{"/x/rootfs", "/x/overlay/c1/userdata", "/"} {
		if got := PodmanContainersDir(bad); got != "" {
			t.Errorf("PodmanContainersDir(%q) = %q, want empty", bad, got)
		}
	}
}

func TestBigDataFileName(t *testing.T) {
	if got := bigDataFileName("manifest"); got != "manifest" {
		t.Errorf("manifest -> %q", got)
	}
	if got := bigDataFileName("sha256:00"); got != "=c2hhMjU2OjAw" {
		t.Errorf("sha256:00 -> %q", got)
	}
}

func TestFromRegistry(t *testing.T) {
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	host := strings.TrimPrefix(srv.URL, "http://")
	img, err := random.Image(512, 2)
	if err != nil {
		t.Fatal(err)
	}
	tag, _ := name.NewTag(host + "/base/img:1")
	if err := remote.Write(tag, img); err != nil {
		t.Fatal(err)
	}
	d, _ := img.Digest()
	byDigest := host + "/base/img@" + d.String()
	cfg, _ := img.ConfigFile()
	var diffIDs []string
	for _, h := range cfg.RootFS.DiffIDs {
		diffIDs = append(diffIDs, h.String())
	}
	ctx := context.Background()

	got, closer, err := FromRegistry(ctx, byDigest, RegistryOptions{DiffIDs: diffIDs})
	if err != nil {
		t.Fatal(err)
	}
	defer closer.Close()
	if gd, _ := got.Digest(); gd != d {
		t.Fatalf("digest %v, want %v", gd, d)
	}
	layers, _ := got.Layers()
	if len(layers) != 2 {
		t.Fatalf("%d layers", len(layers))
	}

	_, _, err = FromRegistry(ctx, byDigest, RegistryOptions{DiffIDs: diffIDs[:1]})
	t.Log(err)
	if err == nil || !strings.Contains(err.Error(), "not the") || !strings.Contains(err.Error(), "--base REF") {
		t.Fatalf("diff id mismatch: %v", err)
	}
	_, _, err = FromRegistry(ctx, host+"/base/missing:1", RegistryOptions{})
	t.Log(err)
	if err == nil || !strings.Contains(err.Error(), "--base REF") {
		t.Fatalf("missing image: %v", err)
	}
	if _, _, err := FromRegistry(ctx, "UPPER/case:1", RegistryOptions{}); err == nil || !strings.Contains(err.Error(), "--base REF") {
		t.Fatalf("invalid ref: %v", err)
	}
	var _ v1.Image = got
}
