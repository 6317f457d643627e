#!/usr/bin/env bash
# Installs the Debian packages photon-cluster needs on the host. Idempotent:
# installs only what is missing. Needs root (or sudo). With --test, also
# what only the test suite needs (chromium, for the report's browser test).
set -euo pipefail
need=()
if [ "${1:-}" = --test ]; then
    command -v chromium >/dev/null 2>&1 || need+=(chromium)
fi
have() { command -v "$1" >/dev/null 2>&1; }
have qemu-system-x86_64 || need+=(qemu-system-x86)
# Debian's qemu-system-x86 (7.2) conflicts with a backported qemu-utils:
# install both from the same suite in one command.
have qemu-img || need+=(qemu-utils)
have mmdebstrap || need+=(mmdebstrap)
have mkfs.ext4 || [ -x /sbin/mkfs.ext4 ] || need+=(e2fsprogs)
have ssh-keygen || need+=(openssh-client)
have pkg-config || need+=(pkg-config)
have nix-instantiate || need+=(nix-bin)
# A static busybox: the Nix library tests build in a real sandbox with it.
[ -x /bin/busybox ] || [ -x /usr/bin/busybox ] || need+=(busybox-static)
[ -e /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
if [ ${#need[@]} -eq 0 ]; then
    echo "host-deps: everything present"
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
$SUDO apt-get install -y -q --no-install-recommends --allow-downgrades "${need[@]}"
