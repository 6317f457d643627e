# gateway: nginx as the API gateway in front of the control plane's load
# balancer; prometheus (nightlight) with the remote-write receiver; and the
# auth-integrated pair: prometheus (creditservice) authenticates to an
# endpoint that demands credentials (IAM: the node exporter behind basic
# auth, via its web config). The NixOS counterpart of
# images/debian/roles/gateway.sh. UNVERIFIED (needs nixpkgs; docs/nix.md).
{ config, lib, pkgs, ... }:
let
  inherit (config.photon) cluster nodeName;
  controls = cluster.roles.control or [ ];
  others = lib.remove nodeName cluster.nodeNames;
  webConfig = "/run/photon/iam-web.yml";
in
{
  services.nginx = {
    enable = true;
    upstreams.control_plane.servers =
      lib.listToAttrs (map (n: { name = "${cluster.byName.${n}.address}:80"; value = { }; }) controls);
    virtualHosts.gateway = {
      default = true;
      listen = [{ addr = "0.0.0.0"; port = 80; }];
      locations."= /healthz".return = "200 \"gateway ok\\n\"";
      locations."/metrics/".proxyPass = "http://127.0.0.1:9090/";
      locations."/".proxyPass = "http://control_plane";
    };
  };

  services.prometheus = {
    enable = true;
    port = 9090;
    retentionTime = "1d";
    extraFlags = [ "--web.enable-remote-write-receiver" ];
    globalConfig = {
      scrape_interval = "5s";
      evaluation_interval = "5s";
    };
    scrapeConfigs = [
      {
        job_name = "nodes";
        static_configs = [{ targets = map (n: "${n}:9100") others; }];
      }
      {
        job_name = "creditservice-iam";
        basic_auth = {
          username = "creditservice";
          password_file = "/run/photon/iam-secret";
        };
        static_configs = [{ targets = [ "${nodeName}:9100" ]; }];
      }
    ];
  };

  # IAM: the gateway's node exporter demands a password. The bcrypt hash is
  # made at boot from the per-cluster secret on the config disk.
  services.prometheus.exporters.node.extraFlags = [ "--web.config.file=${webConfig}" ];
  systemd.services.photon-iam-web = {
    description = "Basic auth web config for the node exporter (IAM)";
    after = [ "photon-firstboot.service" ];
    requires = [ "photon-firstboot.service" ];
    before = [ "prometheus-node-exporter.service" ];
    requiredBy = [ "prometheus-node-exporter.service" ];
    serviceConfig = { Type = "oneshot"; RemainAfterExit = true; };
    path = [ pkgs.apacheHttpd pkgs.coreutils ];
    script = ''
      set -eu
      hash=$(htpasswd -nbBC 5 creditservice "$(cat /run/photon/iam-secret)" | cut -d: -f2)
      printf "basic_auth_users:\n  creditservice: '%s'\n" "$hash" > ${webConfig}
      chmod 0644 ${webConfig}
      # prometheus reads the password file as its own user.
      chgrp prometheus /run/photon/iam-secret && chmod 0640 /run/photon/iam-secret
    '';
  };
}
