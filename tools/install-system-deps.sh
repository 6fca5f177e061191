#!/usr/bin/env bash
# Installs the system packages Kustody's demo and tests need: SoftHSM2 (the default token).
# Go is needed once to build the control-plane binaries; it is checked by `kustody dev build`.
set -euo pipefail

have_softhsm() {
  command -v softhsm2-util >/dev/null 2>&1 && [ -n "$(find_module)" ]
}
find_module() {
  for m in /usr/lib/softhsm/libsofthsm2.so /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so \
           /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so /usr/local/lib/softhsm/libsofthsm2.so; do
    [ -f "$m" ] && { echo "$m"; return; }
  done
}

if have_softhsm; then
  exit 0
fi
if [ "${EUID}" -ne 0 ]; then
  echo "SoftHSM2 is missing. Install it, then run this again:" >&2
  echo "    sudo apt-get install -y softhsm2        # Debian/Ubuntu" >&2
  echo "    sudo dnf install -y softhsm             # Fedora/RHEL" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "SoftHSM2 is missing and this system has no apt-get; install the softhsm2 package with your package manager." >&2
  exit 1
fi
echo "installing softhsm2 with apt-get ..."
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends softhsm2 >/dev/null
have_softhsm || { echo "softhsm2 installed but libsofthsm2.so was not found" >&2; exit 1; }
