# control plane: etcd (chainfire), redis (flaredb), bind (flashdns), haproxy
# (fiberlb). The NixOS counterpart of images/debian/roles/control.sh: the
# configuration itself is services/, rendered by ./services.nix; this module
# only hands it to nixpkgs' service modules. UNVERIFIED (needs nixpkgs;
# docs/nix.md).
{ config, lib, pkgs, ... }:
let
  inherit (config.photon) cluster nodeName;
  domain = cluster.domain;
  base = import ./services.nix { inherit cluster nodeName; };
  inherit (base) isPrimary;
  zoneFile =
    if isPrimary then pkgs.writeText "db.${domain}" (base.render "bind/db.zone")
    else "/run/named/db.${domain}";
  svc = import ./services.nix { inherit cluster nodeName; values = { ZONE_FILE = "${zoneFile}"; }; };
  etcdEnv = svc.render "etcd/etcd.env";
in
{
  # etcd: the unit reads services/etcd/etcd.env as Debian's reads
  # /etc/default/etcd; systemd lets EnvironmentFile= override the module's
  # Environment=.
  services.etcd = {
    enable = true;
    dataDir = (svc.envVars etcdEnv).ETCD_DATA_DIR;
  };
  systemd.services.etcd.serviceConfig.EnvironmentFile = "${pkgs.writeText "etcd.env" etcdEnv}";

  # redis: services/redis/*.conf as the module's settings; `bind = null` so
  # the module adds no bind of its own.
  services.redis.servers."" = {
    enable = true;
    bind = null;
    settings = svc.settings (svc.render "redis/redis.conf"
      + lib.optionalString (!isPrimary) (svc.render "redis/replica.conf"));
  };
  systemd.services.redis.aliases = [ "redis-server.service" ];

  # bind: the zone statement and options from services/bind. Queries are
  # answered from anywhere, as Debian's named does (the lanes ask through the
  # host's UDP forward, from 10.0.2.2).
  services.bind = {
    enable = true;
    cacheNetworks = [ "any" ];
    extraOptions = svc.render "bind/options.conf";
    extraConfig = svc.render (if isPrimary then "bind/primary.conf" else "bind/secondary.conf");
  };
  systemd.services.bind.aliases = [ "named.service" ];

  services.haproxy = {
    enable = true;
    config = svc.render "haproxy/haproxy.cfg";
  };

  environment.systemPackages = [ pkgs.etcd pkgs.redis ];
}
