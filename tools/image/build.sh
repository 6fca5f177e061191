#!/usr/bin/env bash
# `make image`: build the Dockerfile with podman (no Docker engine needed) and tag it.
#   IMAGE         the tag (default localhost/kustody:dev)
#   PYTHON_IMAGE  the Dockerfile's base; unset, a stand-in made here from Debian packages
#                 (tools/image/base.sh) is used, so that no container registry is needed.
#                 With a registry: PYTHON_IMAGE=python:3.11-slim-bookworm make image
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
image=${IMAGE:-localhost/kustody:dev}
start=$(date +%s)
bash "$root/tools/image/podman-setup.sh"
if [ -z "${PYTHON_IMAGE:-}" ]; then
  bash "$root/tools/image/base.sh"
  PYTHON_IMAGE=localhost/python:3.11-bookworm
fi
# pip inside the build trusts what this machine trusts (a TLS-inspecting egress proxy's CA,
# say): the host's CA bundle and a pip.conf naming it are mounted for the RUN steps only,
# never copied into the image.
trust=()
bundle=/etc/ssl/certs/ca-certificates.crt
if [ -s "$bundle" ]; then
  pipconf=$(mktemp); trap 'rm -f "$pipconf"' EXIT
  printf '[global]\ncert = %s\n' "$bundle" > "$pipconf"; chmod 0644 "$pipconf"
  trust=(--volume "$bundle:$bundle:ro" --volume "$pipconf:/etc/pip.conf:ro")
fi
echo "podman build -t $image --build-arg PYTHON_IMAGE=$PYTHON_IMAGE $root"
podman build --network host "${trust[@]}" --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE" -t "$image" "$root"
echo "built $image in $(( $(date +%s) - start ))s: $(podman image inspect --format '{{.Id}} {{.Size}} bytes' "$image")"
