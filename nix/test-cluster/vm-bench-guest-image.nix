# The guest for bench-storage: vm-guest-image.nix plus fio and a data disk
# mount point, for materialization-latency and I/O runs on CoronaFS volumes.
# UNVERIFIED (needs nixpkgs; docs/nix.md).
{ pkgs, ... }:
{
  imports = [ ./vm-guest-image.nix ];
  networking.hostName = pkgs.lib.mkForce "photon-bench-guest";
  environment.systemPackages = [ pkgs.fio ];
  fileSystems."/bench" = { device = "/dev/vdb"; fsType = "ext4"; autoFormat = true; options = [ "nofail" ]; };
}
