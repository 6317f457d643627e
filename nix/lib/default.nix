# photon-cluster's Nix library. Builtins only: no nixpkgs, so CI evaluates
# and builds with Debian's nix-bin (docs/nix.md).
#
#   lib = import ./nix/lib { };          # or { system = "aarch64-linux"; }
#   lib.mkClusterCheck { name = "fresh-smoke"; driver = ...; images = ...; }
#   lib.mkClusterCheck { name = "failover"; testScript = ./failover.py;  # or the script's text
#                        python = pkgs.python3; driver = ...; images = ...; }
#     (a Python test script as the check's lane, like runNixOSTest; docs/scripts.md)
#   lib.mkLayeredCheck { name = "smoke"; laneFile = ./checks/smoke.toml; ... }
#     (the ready cluster, one derivation per layer, the lane assembled)
#   lib.clusterFromToml ./profiles/reference.toml
#   lib.laneFromToml ./checks/smoke.toml
{ system ? "x86_64-linux" }:
let
  util = import ./util.nix;
  cluster = import ./cluster.nix { inherit util; };
  check = import ./check.nix { inherit util; defs = cluster; defaultSystem = system; };
  layers = import ./layers.nix { inherit util check; defs = cluster; };
in
cluster // check // layers // {
  inherit util;
  # The repository's own definitions, parsed.
  profiles = {
    reference = cluster.clusterFromToml ../../profiles/reference.toml;
    reference-storage = cluster.clusterFromToml ../../profiles/reference-storage.toml;
  };
  lanes = {
    smoke = cluster.laneFromToml ../../checks/smoke.toml;
  };
}
