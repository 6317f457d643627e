# node02: control plane, member of the chainfire/flaredb/iam formation that
# node01 bootstraps (common.nix). UNVERIFIED (see common.nix).
{ ... }:
{
  services.chainfire.settings.bootstrap = false;
  services.flaredb.settings.bootstrap = false;
}
