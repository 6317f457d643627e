#!/usr/bin/env bash
# Installs the Debian packages photon-cluster needs on the host, and builds
# the S3 server the Debian image carries (s3s-fs, from crates.io: Debian
# packages no S3 server). Idempotent: installs and builds only what is
# missing. Needs root (or sudo) for the packages, and cargo. With --test,
# also what only the test suite needs (chromium, for the report's browser
# test; named-checkconf, nginx, promtool and haproxy, for the build-time
# checks nixpkgs runs on the rendered configuration, tests/nixpkgs_buildchecks.rs).
set -euo pipefail

# s3s-fs, pinned: 0.17 needs a newer rustc than this project's. The driver
# looks for it at the same path (src/image/debian.rs; PHOTON_S3_SERVER
# overrides it there).
S3S_VERSION=0.14.1
S3S_ROOT="${PHOTON_TOOLS_DIR:-$HOME/.cache/photon-cluster}/s3s-fs-$S3S_VERSION"
s3_server() {
    if [ -x "$S3S_ROOT/bin/s3s-fs" ]; then
        echo "host-deps: s3s-fs $S3S_VERSION present in $S3S_ROOT/bin"
        return
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        echo "host-deps: cargo is needed to build s3s-fs (install Rust: https://rustup.rs)" >&2
        exit 1
    fi
    echo "host-deps: building s3s-fs $S3S_VERSION into $S3S_ROOT (cargo install, a few minutes)"
    cargo install s3s-fs --version "$S3S_VERSION" --locked --features binary --root "$S3S_ROOT"
    echo "host-deps: built $S3S_ROOT/bin/s3s-fs"
}
need=()
if [ "${1:-}" = --test ]; then
    command -v chromium >/dev/null 2>&1 || need+=(chromium)
    # Only their binaries are wanted: policy-rc.d (below) keeps the daemons
    # from starting when they are installed.
    command -v named-checkconf >/dev/null 2>&1 || need+=(bind9-utils)
    [ -x /usr/sbin/named ] || need+=(bind9)
    [ -x /usr/sbin/nginx ] || need+=(nginx)
    command -v promtool >/dev/null 2>&1 || need+=(prometheus)
    [ -x /usr/sbin/haproxy ] || need+=(haproxy)
fi
have() { command -v "$1" >/dev/null 2>&1; }
have qemu-system-x86_64 || need+=(qemu-system-x86)
# Debian's qemu-system-x86 (7.2) conflicts with a backported qemu-utils:
# install both from the same suite in one command.
have qemu-img || need+=(qemu-utils)
have mmdebstrap || need+=(mmdebstrap)
have mkfs.ext4 || [ -x /sbin/mkfs.ext4 ] || need+=(e2fsprogs)
have ssh-keygen || need+=(openssh-client)
# Saved clusters' guest state is compressed with it (a raw save without).
have zstd || need+=(zstd)
have pkg-config || need+=(pkg-config)
have nix-instantiate || need+=(nix-bin)
# A static busybox: the Nix library tests build in a real sandbox with it.
[ -x /bin/busybox ] || [ -x /usr/bin/busybox ] || need+=(busybox-static)
[ -e /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
if [ ${#need[@]} -eq 0 ]; then
    echo "host-deps: every Debian package present"
    s3_server
    exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
if [[ " ${need[*]} " == *" qemu-system-x86 "* ]]; then
    # Pin qemu-utils to the suite's own version so apt can satisfy both.
    kept=()
    for p in "${need[@]}"; do [ "$p" = qemu-utils ] || kept+=("$p"); done
    need=("${kept[@]}")
    need+=("qemu-utils/$suite" "qemu-block-extra/$suite")
fi
echo "host-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
# No daemon may start on install (bind9, nginx, prometheus, haproxy are
# wanted for their checkers only): invoke-rc.d asks policy-rc.d, and 101
# means "not allowed". An existing policy is kept.
policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
fi
$SUDO apt-get install -y -q --no-install-recommends --allow-downgrades "${need[@]}"
[ -z "$policy" ] || $SUDO rm -f "$policy"
s3_server
