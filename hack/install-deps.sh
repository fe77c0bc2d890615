#!/usr/bin/env bash
# Installs the Debian packages seamless's demo and tests need, if missing.
set -euo pipefail
pkgs=(runc containerd docker-registry skopeo busybox-static attr xfsprogs ca-certificates)
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
