#!/usr/bin/env bash
# The two podman settings this kind of machine needs, written into containers.conf ($1)
# unless already there: no default ulimits (runc otherwise fails "error setting rlimits ...
# operation not permitted", the defaults exceed the hard limits here), and runc as the OCI
# runtime (Debian's podman may come with crun, which refuses to run anything here: "cgroups
# in hybrid mode not supported"). Other settings in the file are kept.
set -euo pipefail
conf=${1:?usage: podman-conf.sh CONTAINERS_CONF}
mkdir -p "$(dirname "$conf")"
touch "$conf"
if ! grep -qs '^default_ulimits *= *\[\]' "$conf"; then
  if grep -qs '^default_ulimits *=' "$conf"; then
    sed -i 's/^default_ulimits *=.*/default_ulimits = []/' "$conf"
  elif grep -qs '^\[containers\]' "$conf"; then
    sed -i 's/^\[containers\]/[containers]\ndefault_ulimits = []/' "$conf"
  else
    printf '[containers]\ndefault_ulimits = []\n' >> "$conf"
  fi
  echo "podman: default_ulimits = [] in $conf"
fi
if ! grep -qs '^runtime *= *"runc"' "$conf"; then
  if grep -qs '^runtime *=' "$conf"; then
    sed -i 's/^runtime *=.*/runtime = "runc"/' "$conf"
  elif grep -qs '^\[engine\]' "$conf"; then
    sed -i 's/^\[engine\]/[engine]\nruntime = "runc"/' "$conf"
  else
    printf '[engine]\nruntime = "runc"\n' >> "$conf"
  fi
  echo "podman: runtime = \"runc\" in $conf"
fi
