# node04: worker. plasmavmc agent (nested KVM guests from vm-guest-image.nix),
# lightningstor and coronafs node-local export (common.nix).
# UNVERIFIED (see common.nix).
{ ... }:
{
  services.plasmavmc.settings.guestImageDir = "/var/lib/plasmavmc/images";
  services.coronafs.settings.volume = "/var/lib/coronafs/node04.qcow2";
}
