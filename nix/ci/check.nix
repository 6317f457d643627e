# The check derivation CI builds with Debian's nix-bin and nothing else
# (builtins only, no nixpkgs): the driver from `cargo build`, the images from
# the driver's Debian image build, QEMU, ssh-keygen and mkfs.ext4 from the
# host's /usr/bin and /usr/sbin (recorded as impure in result.json).
#
#   nix-build nix/ci/check.nix \
#     --arg driver "$PWD/target/debug/photon-cluster" \
#     --argstr images "$HOME/.photoncloud-test-cluster/images/<hash>" \
#     --option sandbox false \
#     --option system-features "kvm nixos-test benchmark big-parallel" \
#     --option build-users-group "" \
#     --out-link work/nix-fresh-smoke
#
# The builder is /bin/sh and coreutils (timeout, date, mkdir, chmod) come
# from the host's /usr/bin, listed as impure: the documented exemption of
# this builtins-only build (the flake passes nixpkgs' by store path).
#
# Add --arg keepFailed true to keep a failed lane's evidence (nix-support/failed),
# --arg laneFile ./some-lane.toml for a lane file, --argstr nonce "$(date +%s)"
# to rerun an identical derivation. See docs/nix.md. A test script instead
# of a lane (docs/scripts.md), with the host's python3:
#   --arg testScript ./my-test.py --argstr python /usr/bin
{ driver
, images
, lane ? "smoke"
, laneFile ? null
, cluster ? null
, profile ? "reference"
, keepFailed ? false
  # A Python test script (a path, or the script's text) instead of a lane,
  # the directory holding python3 (listed as impure unless in hostBin or
  # the store), and the script's deadline in seconds.
, testScript ? null
, python ? null
, testScriptDeadline ? 1800
, name ? (if testScript == null then "fresh-${lane}" else "test-script")
  # Host directories holding qemu-system-x86_64, qemu-img, ssh-keygen and
  # mkfs.ext4 (in /usr/sbin on Debian).
, hostBin ? [ "/usr/bin" "/bin" "/usr/sbin" "/sbin" ]
  # The directory holding timeout, date, mkdir and chmod.
, coreutils ? "/usr/bin"
  # true: copy the images into the store (a raw rootfs.img is ~3 GB there,
  # not sparse); false: use them in place, listed with --allow-impure.
, copyImages ? false
, timeout ? 3600
, killAfter ? 120
, nonce ? ""
, extraArgs ? [ ]
  # false: skip the eval-time check that the lane's targets exist in the cluster.
, validate ? true
}:
let
  lib = import ../lib { };
  inherit (lib.util) inStore;
  # A string outside the store becomes a path (copied into the store, so the
  # derivation changes when the file does); store paths and paths stay.
  tracked = p: if p == null || builtins.isPath p || inStore (toString p) then p else /. + p;
  imagesArg = if copyImages then tracked images else toString images;
  imagesImpure = if builtins.isPath imagesArg || inStore imagesArg then [ ] else [ imagesArg ];
  # A host directory not already listed: impure.
  extraImpure = d: if builtins.isString d && !(inStore d) && !(builtins.elem d hostBin) then [ d ] else [ ];
in
lib.mkClusterCheck {
  inherit name lane keepFailed profile timeout killAfter extraArgs validate coreutils;
  inherit testScript python testScriptDeadline;
  driver = tracked driver;
  laneFile = tracked laneFile;
  cluster = tracked cluster;
  images = imagesArg;
  path = hostBin;
  impurePaths = hostBin ++ extraImpure coreutils ++ extraImpure python ++ imagesImpure;
  env = if nonce == "" then { } else { inherit nonce; };
}
