# gateway: nginx as the API gateway in front of the control plane's load
# balancer; prometheus (nightlight) with the remote-write receiver; and the
# auth-integrated pair: prometheus (creditservice) authenticates to an
# endpoint that demands credentials (IAM: the node exporter behind basic
# auth, via its web config). The NixOS counterpart of
# images/debian/roles/gateway.sh: the configuration itself is services/,
# rendered by ./services.nix. UNVERIFIED (needs nixpkgs; docs/nix.md).
{ config, pkgs, ... }:
let
  inherit (config.photon) cluster nodeName;
  webConfig = "/run/photon/iam-web.yml";
  svc = import ./services.nix {
    inherit cluster nodeName;
    values = {
      IAM_SECRET_FILE = "/run/photon/iam-secret";
      IAM_WEB_CONFIG = webConfig;
      # The hash is made at boot from the per-cluster secret (below).
      IAM_HASH = "@IAM_HASH@";
    };
  };
in
{
  services.nginx = {
    enable = true;
    appendHttpConfig = svc.render "nginx/gateway.conf";
  };

  services.prometheus = {
    enable = true;
    configText = svc.render "prometheus/prometheus.yml";
    # The password file exists only at run time.
    checkConfig = "syntax-only";
    extraFlags = svc.words (svc.render "prometheus/prometheus.flags");
  };

  # IAM: the gateway's node exporter demands a password. The bcrypt hash is
  # made at boot from the per-cluster secret on the config disk.
  services.prometheus.exporters.node.extraFlags =
    svc.words (svc.render "prometheus/node-exporter-iam.flags");
  systemd.services.photon-iam-web = {
    description = "Basic auth web config for the node exporter (IAM)";
    after = [ "photon-firstboot.service" ];
    requires = [ "photon-firstboot.service" ];
    before = [ "prometheus-node-exporter.service" ];
    requiredBy = [ "prometheus-node-exporter.service" ];
    serviceConfig = { Type = "oneshot"; RemainAfterExit = true; };
    path = [ pkgs.apacheHttpd pkgs.coreutils pkgs.gnused ];
    script = ''
      set -eu
      hash=$(htpasswd -nbBC 5 creditservice "$(cat /run/photon/iam-secret)" | cut -d: -f2)
      sed "s|@IAM_HASH@|$hash|" ${pkgs.writeText "iam-web.yml" (svc.render "prometheus/iam-web.yml")} > ${webConfig}
      chmod 0644 ${webConfig}
      # prometheus reads the password file as its own user.
      chgrp prometheus /run/photon/iam-secret && chmod 0640 /run/photon/iam-secret
    '';
  };
}
