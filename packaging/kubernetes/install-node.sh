#!/bin/sh
# Installs seamless on a Kubernetes node that runs containerd: copies the
# binaries, adds the containerd runtime "seamless" (RuntimeClass handler
# "seamless") and restarts containerd. Running containers survive the
# restart (their runc v2 shims keep running). Idempotent; --uninstall undoes
# it.
#
#   install-node.sh [--from DIR] [--root DIR] [--prefix /usr/local]
#                   [--config /etc/containerd/config.toml]
#                   [--containerd-major N] [--no-restart] [--uninstall]
#
# --from      directory holding seamless, seamless-runc and seamless-hook
#             (default: this script's directory, the checkout's bin/, ./bin,
#             then PREFIX/bin, i.e. what `make install` put there)
# --root      install under this root instead of / (images, tests); paths
#             written into the config stay the ones seen from /
# --containerd-major  skip `containerd --version`
# --no-restart        do not restart containerd (do it yourself)
#
# containerd 1.x replaces whole plugin sections with those of imported
# files, so the runtime is appended to config.toml between marker lines.
# containerd >= 2.0 merges imports: the runtime goes to
# /etc/containerd/conf.d/seamless.toml, imported by config.toml.
set -eu

from="" root="" prefix=/usr/local config=/etc/containerd/config.toml major="" restart=1 uninstall=0
while [ $# -gt 0 ]; do
  case "$1" in
    --from) from=$2; shift 2 ;;
    --root) root=$2; shift 2 ;;
    --prefix) prefix=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --containerd-major) major=$2; shift 2 ;;
    --no-restart) restart=0; shift ;;
    --uninstall) uninstall=1; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    *) echo "install-node.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

bindir=$prefix/bin
cfg=$root$config
confd=$root$(dirname "$config")/conf.d
begin="# BEGIN seamless runtime (install-node.sh)"
end="# END seamless runtime"
bins="seamless seamless-runc seamless-hook"

if [ -z "$major" ]; then
  command -v containerd >/dev/null || { echo "install-node.sh: containerd not found; pass --containerd-major" >&2; exit 1; }
  major=$(containerd --version | sed -n 's/.* v\{0,1\}\([0-9][0-9]*\)\.[0-9][0-9]*\.[0-9].*/\1/p')
  [ -n "$major" ] || { echo "install-node.sh: cannot read containerd's version; pass --containerd-major" >&2; exit 1; }
fi

runtime_v2() {
  cat <<EOF
$begin
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.seamless]
  runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.seamless.options]
    BinaryName = "$bindir/seamless-runc"
$end
EOF
}

runtime_v3() {
  cat <<EOF
# Written by seamless install-node.sh.
version = 3

[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.seamless]
  runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.seamless.options]
    BinaryName = "$bindir/seamless-runc"
EOF
}

# remove_block deletes our marked block from the config, if there.
remove_block() {
  [ -f "$cfg" ] && grep -qF "$begin" "$cfg" || return 0
  tmp=$(mktemp "$cfg.XXXXXX")
  awk -v b="$begin" -v e="$end" '$0==b{skip=1;next} skip&&$0==e{skip=0;next} !skip' "$cfg" > "$tmp"
  chmod --reference="$cfg" "$tmp" 2>/dev/null || true
  mv "$tmp" "$cfg"
}

restart_containerd() {
  if [ "$restart" = 0 ] || [ -n "$root" ]; then
    echo "restart containerd to apply (running containers survive): systemctl restart containerd"
    return
  fi
  if command -v systemctl >/dev/null && systemctl is-active -q containerd; then
    systemctl restart containerd
    echo "containerd restarted"
  else
    echo "containerd is not a running systemd service: restart it yourself to apply" >&2
  fi
}

if [ "$uninstall" = 1 ]; then
  remove_block
  rm -f "$confd/seamless.toml"
  for b in $bins; do rm -f "$root$bindir/$b"; done
  echo "seamless removed from $cfg and $root$bindir"
  restart_containerd
  exit 0
fi

if [ -z "$from" ]; then
  here=$(cd "$(dirname "$0")" && pwd)
  for d in "$here" "$here/../../bin" ./bin "$root$bindir"; do
    [ -x "$d/seamless-runc" ] && { from=$d; break; }
  done
fi
[ -n "$from" ] && [ -x "$from/seamless-runc" ] || { echo "install-node.sh: no seamless-runc in ${from:-$(dirname "$0") or ./bin}; pass --from DIR" >&2; exit 1; }

mkdir -p "$root$bindir" "$(dirname "$cfg")"
for b in $bins; do
  [ -f "$from/$b" ] || continue
  install -m 0755 "$from/$b" "$root$bindir/$b.new"
  mv -f "$root$bindir/$b.new" "$root$bindir/$b"
done

if [ "$major" -ge 2 ]; then
  mkdir -p "$confd"
  runtime_v3 > "$confd/seamless.toml"
  if [ ! -f "$cfg" ]; then
    printf 'version = 3\nimports = ["%s/*.toml"]\n' "$(dirname "$config")/conf.d" > "$cfg"
  elif ! grep -q 'conf\.d' "$cfg"; then
    if grep -q '^[[:space:]]*imports[[:space:]]*=' "$cfg"; then
      echo "install-node.sh: $cfg has imports without conf.d: add \"$(dirname "$config")/conf.d/*.toml\" to them" >&2
      exit 1
    fi
    tmp=$(mktemp "$cfg.XXXXXX")
    { printf 'imports = ["%s/*.toml"]\n' "$(dirname "$config")/conf.d"; cat "$cfg"; } > "$tmp"
    chmod --reference="$cfg" "$tmp" 2>/dev/null || true
    mv "$tmp" "$cfg"
  fi
  echo "runtime seamless: $confd/seamless.toml"
else
  if [ -f "$cfg" ] && ! grep -q '^[[:space:]]*version[[:space:]]*=[[:space:]]*2' "$cfg"; then
    echo "install-node.sh: $cfg is not a version 2 config: add the runtime by hand (see packaging/containerd/seamless.toml)" >&2
    exit 1
  fi
  remove_block
  if [ -f "$cfg" ] && grep -q 'containerd\.runtimes\.seamless\]' "$cfg"; then
    echo "install-node.sh: $cfg already defines the runtime seamless; left as is" >&2
  else
    [ -f "$cfg" ] || echo "version = 2" > "$cfg"
    # Keep the file newline-terminated before appending.
    [ -s "$cfg" ] && [ -n "$(tail -c1 "$cfg")" ] && echo >> "$cfg"
    runtime_v2 >> "$cfg"
    echo "runtime seamless: appended to $cfg"
  fi
fi
restart_containerd
