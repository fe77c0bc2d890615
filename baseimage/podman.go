package baseimage

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// PodmanContainersDir returns the containers/storage directory
// (<graphroot>/<driver>-containers) of a podman bundle
// (<graphroot>/<driver>-containers/<id>/userdata), or "" when bundle does
// not have that shape.
func PodmanContainersDir(bundle string) string {
	bundle = filepath.Clean(bundle)
	if filepath.Base(bundle) != "userdata" {
		return ""
	}
	dir := filepath.Dir(filepath.Dir(bundle))
	if !strings.HasSuffix(filepath.Base(dir), "-containers") {
		return ""
	}
	return dir
}

// storageContainer is an entry of containers/storage's containers.json.
type storageContainer struct {
	ID       string `json:"id"`
	Image    string `json:"image"`
	Metadata string `json:"metadata"`
}

// storageImage is an entry of containers/storage's images.json.
type storageImage struct {
	ID      string   `json:"id"`
	Digest  string   `json:"digest"`
	Digests []string `json:"digests"`
	Names   []string `json:"names"`
}

// PodmanImage reads, from podman's containers/storage (containersDir as
// PodmanContainersDir returns it), the image container id was created from:
// the name podman recorded, the image id, its registry references by digest
// (each name of the image with the manifest digest it was pulled with) and
// its layers' diff ids (from the image config, when readable). It reads the
// storage's JSON files and takes no lock.
func PodmanImage(containersDir, id string) (*EngineImage, error) {
	var ctrs []storageContainer
	if err := readJSON(filepath.Join(containersDir, "containers.json"), &ctrs); err != nil {
		return nil, fmt.Errorf("podman storage: %w", err)
	}
	var ctr *storageContainer
	for i := range ctrs {
		if ctrs[i].ID == id {
			ctr = &ctrs[i]
			break
		}
	}
	if ctr == nil {
		return nil, fmt.Errorf("podman storage %s has no container %s", containersDir, id)
	}
	if ctr.Image == "" {
		return nil, fmt.Errorf("podman container %s has no image", id)
	}
	var meta struct {
		ImageName string `json:"image-name"`
	}
	if ctr.Metadata != "" {
		_ = json.Unmarshal([]byte(ctr.Metadata), &meta) // the name is informative only
	}
	imagesDir := strings.TrimSuffix(containersDir, "-containers") + "-images"
	var imgs []storageImage
	if err := readJSON(filepath.Join(imagesDir, "images.json"), &imgs); err != nil {
		return nil, fmt.Errorf("podman storage: %w", err)
	}
	for _, img := range imgs {
		if img.ID != ctr.Image {
			continue
		}
		out := &EngineImage{Name: meta.ImageName, ID: img.ID, RepoDigests: repoDigests(img)}
		out.DiffIDs, _ = podmanDiffIDs(imagesDir, img.ID)
		return out, nil
	}
	return nil, fmt.Errorf("podman storage %s has no image %s (of container %s)", imagesDir, ctr.Image, id)
}

// PodmanImageName returns the image name podman recorded for container id,
// or "" when it cannot be read.
func PodmanImageName(containersDir, id string) string {
	img, err := PodmanImage(containersDir, id)
	if err != nil {
		return ""
	}
	return img.Name
}

// repoDigests pairs every name of img with each manifest digest it has.
func repoDigests(img storageImage) []string {
	digests := img.Digests
	if img.Digest != "" && !contains(digests, img.Digest) {
		digests = append([]string{img.Digest}, digests...)
	}
	var out []string
	for _, n := range img.Names {
		ref, err := name.ParseReference(n)
		if err != nil {
			continue
		}
		for _, d := range digests {
			out = append(out, ref.Context().Name()+"@"+d)
		}
	}
	return out
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// podmanDiffIDs reads the diff ids from the image's config, which
// containers/storage keeps as the big data item named after the image id.
func podmanDiffIDs(imagesDir, id string) ([]string, error) {
	b, err := os.ReadFile(filepath.Join(imagesDir, id, bigDataFileName("sha256:"+id)))
	if err != nil {
		return nil, fmt.Errorf("podman image config: %w", err)
	}
	cfg, err := v1.ParseConfigFile(bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("podman image config of %s: %w", id, err)
	}
	out := make([]string, len(cfg.RootFS.DiffIDs))
	for i, d := range cfg.RootFS.DiffIDs {
		out[i] = d.String()
	}
	if len(out) == 0 {
		return nil, errors.New("podman image config has no diff ids")
	}
	return out, nil
}

// bigDataFileName is how containers/storage names the file of a big data
// item: the key itself when it has only [a-z0-9.], else "=" + base64(key).
func bigDataFileName(key string) string {
	for _, r := range key {
		if r != '.' && (r < '0' || r > '9') && (r < 'a' || r > 'z') {
			return "=" + base64.StdEncoding.EncodeToString([]byte(key))
		}
	}
	return key
}

func readJSON(path string, v any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("decode %s: %w", path, err)
	}
	return nil
}
