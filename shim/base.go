package shim

import (
	"context"
	"fmt"

	"github.com/seamless-snapshot/seamless/baseimage"
	"github.com/seamless-snapshot/seamless/snapshot"
)

// baseImage finds the image the container was started from.
func (s *Shim) baseImage(ctx context.Context) (snapshot.Base, error) {
	switch s.cfg.Engine {
	case "containerd":
		ref, err := baseimage.ContainerdImageName(ctx, s.cfg.ContainerdAddress, s.cfg.ContainerdNamespace, s.cfg.ContainerID)
		if err != nil {
			return snapshot.Base{}, fmt.Errorf("base image of %s: %w", s.cfg.ContainerID, err)
		}
		return snapshot.Base{
			Ref: ref, Source: "containerd",
			ContainerdAddress: s.cfg.ContainerdAddress, ContainerdNamespace: s.cfg.ContainerdNamespace,
		}, nil
	}
	return snapshot.Base{}, fmt.Errorf("base image of %s: unknown engine %q (seamless-runc must be run by containerd's runc v2 shim, or set CONTAINERD_ADDRESS)", s.cfg.ContainerID, s.cfg.Engine)
}
