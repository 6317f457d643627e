# The layered lane CI builds with Debian's nix-bin (builtins only), as
# nix/ci/check.nix builds the monolithic one: <cluster>-ready, one
# <lane>-layer-<layer> per layer of laneFile, and the lane assembled.
#
#   nix-build nix/ci/layers.nix --arg driver "$PWD/target/debug/photon-cluster" \
#     --argstr images /path/to/images --arg cluster ./tests/fixtures/one-node.toml \
#     --arg laneFile ./tests/fixtures/layered.toml \
#     --option sandbox false --option build-users-group "" \
#     --option system-features "kvm nixos-test benchmark big-parallel"
#   (-A ready, -A layers.<layer> for one part)
{ driver
, images
, laneFile
, cluster
, name ? "layered"
, keepFailed ? false
, hostBin ? [ "/usr/bin" "/bin" "/usr/sbin" "/sbin" ]
, coreutils ? "/usr/bin"
, timeout ? 1800
, nonce ? ""
}:
let
  lib = import ../lib { };
  inherit (lib.util) inStore;
  tracked = p: if builtins.isPath p || inStore (toString p) then p else /. + p;
in
lib.mkLayeredCheck {
  inherit name keepFailed coreutils timeout laneFile;
  driver = tracked driver;
  cluster = tracked cluster;
  images = toString images;
  path = hostBin;
  impurePaths = hostBin ++ [ (toString images) ];
  env = if nonce == "" then { } else { inherit nonce; };
}
