#!/usr/bin/env bash
# Base images made here from Debian packages, for machines that reach no container registry:
#   localhost/debian:bookworm        debootstrap --variant=minbase bookworm, podman import
#   localhost/python:3.11-bookworm   Debian's python3 in a venv on PATH (what the Dockerfile's
#                                    python:3.11-slim-bookworm gives: python, pip, site-packages)
# The debootstrap tarball is cached in ${XDG_CACHE_HOME:-~/.cache}/kustody/image; each image is
# made only when podman does not have it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/kustody/image
mkdir -p "$cache"
base=localhost/debian:bookworm
python=localhost/python:3.11-bookworm

mirror() {
  # On Debian, the mirror apt already uses (deb822 or one-line sources); elsewhere Debian's.
  local uri
  if ! grep -qs '^ID=debian' /etc/os-release; then echo http://deb.debian.org/debian; return; fi
  uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=$(awk '/^deb / && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

if ! podman image exists "$base"; then
  tarball=$cache/debian-bookworm-minbase.tar
  if [ ! -s "$tarball" ]; then
    start=$(date +%s)
    root=$(mktemp -d "$cache/rootfs.XXXXXX")
    echo "debootstrap --variant=minbase bookworm (about a minute)"
    debootstrap --variant=minbase bookworm "$root" "$(mirror)" > "$cache/debootstrap.log" 2>&1 \
      || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
    # The same sources in the image as on this machine, apt lists dropped.
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
    tar --numeric-owner -C "$root" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$root"
    echo "debootstrap: $(( $(date +%s) - start ))s"
  fi
  podman import --change 'CMD ["/bin/bash"]' "$tarball" "$base" >/dev/null
  echo "made $base"
fi

if ! podman image exists "$python"; then
  podman build --network host -t "$python" -f "$here/Containerfile.python" "$here"
  echo "made $python"
fi
