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
# setting SECTION KEY VALUE: KEY = VALUE in [SECTION], replacing a KEY already set (each of
# these keys is in one section only) instead of adding it twice.
setting() {
  local section=$1 key=$2 value=$3
  grep -qsxF "$key = $value" "$conf" && return
  if grep -qs "^$key *=" "$conf"; then
    sed -i "s/^$key *=.*/$key = $value/" "$conf"
  elif grep -qs "^\[$section\]" "$conf"; then
    sed -i "s/^\[$section\]/[$section]\n$key = $value/" "$conf"
  else
    printf '[%s]\n%s = %s\n' "$section" "$key" "$value" >> "$conf"
  fi
  echo "podman: $key = $value in $conf"
}
setting containers default_ulimits '[]'
setting engine runtime '"runc"'
