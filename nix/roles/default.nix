# The reference cluster's roles as NixOS modules, built from nixpkgs' own
# service modules. A node's configuration is common.nix plus its role's
# module, with photon.cluster / photon.nodeName set (nix/images.nix).
{
  options = ./options.nix;
  common = ./common.nix;
  roles = {
    control = ./control.nix;
    worker = ./worker.nix;
    gateway = ./gateway.nix;
    storage = ./storage.nix;
  };
}
