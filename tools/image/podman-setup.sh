#!/usr/bin/env bash
# Podman, buildah, runc and debootstrap from Debian (apt-get when root), and the two podman
# settings this kind of machine needs: no default ulimits (runc otherwise fails "error setting
# rlimits ... operation not permitted", the defaults exceed the hard limits here), and runc as
# the OCI runtime (Debian's podman may come with crun, which refuses to run anything here:
# "cgroups in hybrid mode not supported").
set -euo pipefail
need=()
for cmd in podman buildah debootstrap; do command -v "$cmd" >/dev/null || need+=("$cmd"); done
[ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
[ -x /usr/bin/fuse-overlayfs ] || need+=(fuse-overlayfs)
command -v runc >/dev/null || need+=(runc)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "install ${need[*]} (Debian: apt-get install podman buildah runc debootstrap containernetworking-plugins fuse-overlayfs)" >&2
    exit 1
  fi
  echo "installing ${need[*]} with apt-get"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    podman buildah runc debootstrap containernetworking-plugins fuse-overlayfs slirp4netns \
    iptables uidmap >/dev/null
fi
if [ "$(id -u)" = 0 ]; then
  bash "$(dirname "$0")/podman-conf.sh" /etc/containers/containers.conf
fi
# kind mounts the host's /lib/modules into its nodes; a machine whose kernel ships no
# modules directory (a container or VM with a built-in-only kernel) needs an empty one.
if [ "$(id -u)" = 0 ] && [ ! -e /lib/modules ]; then
  mkdir -p /lib/modules
  echo "made an empty /lib/modules (kind mounts it into its nodes)"
fi
