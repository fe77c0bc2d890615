#!/usr/bin/env bash
# Installs the Debian packages seamless's demo and tests need, if missing.
set -euo pipefail
pkgs=(runc containerd docker-registry skopeo busybox-static attr xfsprogs ca-certificates docker.io podman)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=900 update -qq
  apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v go >/dev/null || { echo "go is required (https://go.dev/dl/)" >&2; exit 1; }
# crictl (CRI tests) is not packaged for Debian 12: build it from the Go module proxy.
crictl_version=v1.34.0
if ! command -v crictl >/dev/null; then
  echo "installing crictl $crictl_version into /usr/local/bin (go install)"
  GOBIN=/usr/local/bin GOFLAGS=-buildvcs=false go install "sigs.k8s.io/cri-tools/cmd/crictl@$crictl_version"
fi
