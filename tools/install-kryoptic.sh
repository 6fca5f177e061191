#!/usr/bin/env bash
# Builds Kryoptic (a PKCS#11 soft token in Rust, crates.io) once and caches the module in
# ${XDG_CACHE_HOME:-~/.cache}/kustody/kryoptic/<version>/libkryoptic_pkcs11.so — Kustody's second,
# independent PKCS#11 implementation for the HSM test layer (docs/hsm.md, "Tested tokens").
#
# Kryoptic needs OpenSSL >= 3.2; Debian bookworm ships 3.0, so the module is built in Kryoptic's
# static mode, which compiles OpenSSL from a full source tree (the openssl-src crate's tree is
# trimmed and does not configure). The tree is Debian's own upstream tarball of OpenSSL 3.5 LTS,
# fetched with `apt-get source` from a private source list (nothing under /etc/apt changes) and
# checked against a pinned SHA-256. The crate comes from crates.io through cargo, built with the
# Cargo.lock it ships (--locked).
#
# Usage: tools/install-kryoptic.sh [--print-module]   (KUSTODY_SKIP_KRYOPTIC=1 skips)
set -euo pipefail

KRYOPTIC_VERSION=1.5.4
OPENSSL_DEB_VERSION=3.5.7-1~deb13u2
OPENSSL_UPSTREAM=3.5.7
OPENSSL_SHA256=a8c0d28a529ca480f9f36cf5792e2cd21984552a3c8e4aa11a24aa31aeac98e8
# `ossl/ossl-sys`: the static (non-`dynamic`) build must switch on the bindings crate itself.
FEATURES=standard,ossl/ossl-sys

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/kustody/kryoptic/${KRYOPTIC_VERSION}"
MODULE="$CACHE/libkryoptic_pkcs11.so"

if [ "${1:-}" = "--print-module" ]; then
  echo "$MODULE"
  exit 0
fi
if [ "${KUSTODY_SKIP_KRYOPTIC:-}" = 1 ]; then
  echo "KUSTODY_SKIP_KRYOPTIC=1: not building Kryoptic (HSM tests on it will be skipped)" >&2
  exit 0
fi
if [ -f "$MODULE" ]; then
  exit 0
fi

start=$(date +%s)
log() { echo "kryoptic: $*" >&2; }

need_pkgs=()
for pair in make:make perl:perl cc:gcc pkg-config:pkg-config; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || need_pkgs+=("$pkg")
done
dpkg-query -W -f='${Status}' libclang-dev 2>/dev/null | grep -q "install ok installed" \
  || need_pkgs+=(libclang-dev)
dpkg-query -W -f='${Status}' libsqlite3-dev 2>/dev/null | grep -q "install ok installed" \
  || need_pkgs+=(libsqlite3-dev)
command -v dpkg-source >/dev/null 2>&1 || need_pkgs+=(dpkg-dev)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "${EUID}" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "Building Kryoptic needs: ${need_pkgs[*]} (Debian names). Install them, or set" \
         "KUSTODY_SKIP_KRYOPTIC=1 to test on SoftHSM2 only." >&2
    exit 1
  fi
  log "apt-get install ${need_pkgs[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${need_pkgs[@]}" >/dev/null
fi
command -v cargo >/dev/null 2>&1 || {
  echo "Building Kryoptic needs cargo (Rust >= 1.80; https://rustup.rs)," \
       "or set KUSTODY_SKIP_KRYOPTIC=1" >&2
  exit 1
}

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
[ -f "$MODULE" ] && exit 0

work=$(mktemp -d "${TMPDIR:-/tmp}/kustody-kryoptic.XXXXXX")
trap 'rm -rf "$work"' EXIT

# 1. OpenSSL: Debian's upstream tarball, through apt with a private source list.
tarball="$CACHE/openssl_${OPENSSL_UPSTREAM}.orig.tar.gz"
if ! echo "$OPENSSL_SHA256  $tarball" | sha256sum -c --status 2>/dev/null; then
  log "fetching OpenSSL ${OPENSSL_UPSTREAM} source (Debian ${OPENSSL_DEB_VERSION})"
  mkdir -p "$work/apt/lists/partial"
  echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
    > "$work/apt/sources.list"
  apt_opts=(-o "Dir::Etc::SourceList=$work/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
            -o "Dir::State::Lists=$work/apt/lists" -o APT::Sandbox::User=root)
  apt-get "${apt_opts[@]}" -qq update
  (cd "$work" && apt-get "${apt_opts[@]}" -qq source --download-only "openssl=${OPENSSL_DEB_VERSION}")
  cp "$work/openssl_${OPENSSL_UPSTREAM}.orig.tar.gz" "$tarball"
  echo "$OPENSSL_SHA256  $tarball" | sha256sum -c --status || {
    echo "OpenSSL tarball checksum mismatch" >&2; rm -f "$tarball"; exit 1; }
fi
mkdir -p "$work/openssl"
tar -C "$work/openssl" --strip-components=1 -xzf "$tarball"

# 2. The crate, from crates.io through cargo.
log "fetching kryoptic ${KRYOPTIC_VERSION} from crates.io"
mkdir -p "$work/fetch/src"
cat > "$work/fetch/Cargo.toml" <<EOF
[package]
name = "kustody-kryoptic-fetch"
version = "0.0.0"
edition = "2021"
[dependencies]
kryoptic = "=${KRYOPTIC_VERSION}"
EOF
echo 'fn main() {}' > "$work/fetch/src/main.rs"
(cd "$work/fetch" && cargo fetch -q)
crate=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"kryoptic-${KRYOPTIC_VERSION}.crate" | head -1)
tar -C "$work" -xzf "$crate"

# 3. Build: static OpenSSL inside, no system OpenSSL needed at run time.
log "building (OpenSSL + Kryoptic; ~10-20 min on 2 cores)"
(
  cd "$work/kryoptic-${KRYOPTIC_VERSION}"
  KRYOPTIC_OPENSSL_SOURCES="$work/openssl" CARGO_TARGET_DIR="$work/target" \
    cargo build -q --release --locked --no-default-features --features "$FEATURES"
) > "$work/build.log" 2>&1 || { tail -40 "$work/build.log" >&2; exit 1; }
install -m 0755 "$work/target/release/libkryoptic_pkcs11.so" "$MODULE.tmp"
mv "$MODULE.tmp" "$MODULE"
log "cached $MODULE ($(( $(date +%s) - start ))s)"
