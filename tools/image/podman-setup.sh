#!/usr/bin/env bash
# Podman, buildah and debootstrap from Debian (apt-get when root), and the one podman setting
# this kind of machine needs: no default ulimits (runc otherwise fails "error setting rlimits
# ... operation not permitted", the defaults exceed the hard limits here).
set -euo pipefail
need=()
for cmd in podman buildah debootstrap; do command -v "$cmd" >/dev/null || need+=("$cmd"); done
[ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
[ -x /usr/bin/fuse-overlayfs ] || need+=(fuse-overlayfs)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "install ${need[*]} (Debian: apt-get install podman buildah debootstrap containernetworking-plugins fuse-overlayfs)" >&2
    exit 1
  fi
  echo "installing ${need[*]} with apt-get"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    podman buildah debootstrap containernetworking-plugins fuse-overlayfs slirp4netns \
    iptables uidmap >/dev/null
fi
if [ "$(id -u)" = 0 ]; then
  conf=/etc/containers/containers.conf
  if ! grep -qs '^default_ulimits *= *\[\]' "$conf"; then
    mkdir -p /etc/containers
    if grep -qs '^\[containers\]' "$conf"; then
      sed -i 's/^\[containers\]/[containers]\ndefault_ulimits = []/' "$conf"
    else
      printf '[containers]\ndefault_ulimits = []\n' >> "$conf"
    fi
    echo "podman: default_ulimits = [] in $conf"
  fi
fi
# kind mounts the host's /lib/modules into its nodes; a machine whose kernel ships no
# modules directory (a container or VM with a built-in-only kernel) needs an empty one.
if [ "$(id -u)" = 0 ] && [ ! -e /lib/modules ]; then
  mkdir -p /lib/modules
  echo "made an empty /lib/modules (kind mounts it into its nodes)"
fi
