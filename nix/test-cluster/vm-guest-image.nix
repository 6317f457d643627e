# The inner guest plasmavmc boots inside a worker (nested KVM, TCG when the
# host does not nest): a minimal NixOS with a serial console that prints a
# marker the lanes wait for. Builds system.build.photonGuestImage (qcow2).
# UNVERIFIED (needs nixpkgs; docs/nix.md).
{ config, lib, pkgs, modulesPath, ... }:
{
  imports = [
    (modulesPath + "/profiles/qemu-guest.nix")
    (modulesPath + "/profiles/minimal.nix")
  ];

  options.system.build.photonGuestImage = lib.mkOption {
    type = lib.types.package;
    description = "The guest disk image (qcow2).";
  };

  config = {
    system.stateVersion = "24.05";
    boot.loader.grub.device = "/dev/vda";
    boot.kernelParams = [ "console=ttyS0,115200" ];
    fileSystems."/" = { device = "/dev/disk/by-label/nixos"; fsType = "ext4"; };
    networking.hostName = "photon-guest";
    networking.useDHCP = true;
    services.getty.autologinUser = "root";
    systemd.services.photon-guest-ready = {
      wantedBy = [ "multi-user.target" ];
      serviceConfig.Type = "oneshot";
      script = "echo PHOTON-GUEST-READY > /dev/ttyS0";
    };
    documentation.enable = false;

    system.build.photonGuestImage = import (pkgs.path + "/nixos/lib/make-disk-image.nix") {
      inherit lib config pkgs;
      format = "qcow2";
      partitionTableType = "legacy";
      diskSize = "auto";
      additionalSpace = "256M";
    };
  };
}
