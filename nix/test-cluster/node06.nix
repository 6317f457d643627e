# node06: gateway. apigateway in front of the control plane, NightLight
# (remote-write receiver, forwarded to the host), creditservice connected to
# IAM (common.nix). UNVERIFIED (see common.nix).
{ ... }:
{
  services.creditservice.settings.iamClient = "creditservice";
  services.nightlight.settings.retention = "1d";
}
