# Which cluster and node a NixOS configuration is. Set by nix/images.nix
# from a cluster TOML read with nix/lib (builtins.fromTOML).
{ lib, ... }:
{
  options.photon = {
    cluster = lib.mkOption {
      type = lib.types.attrs;
      description = "The cluster definition, as returned by nix/lib clusterFromToml.";
    };
    nodeName = lib.mkOption {
      type = lib.types.str;
      description = "This node's name in photon.cluster.";
    };
  };
}
