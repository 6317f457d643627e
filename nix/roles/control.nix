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
  # Both are writable copies: secondaries transfer the zone, and the primary
  # takes RFC 2136 updates (its initial zone is copied from the store).
  zoneFile = "/run/named/db.${domain}";
  initialZone = pkgs.writeText "db.${domain}" (base.render "bind/db.zone");
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
  # The primary's TSIG key for dynamic updates (services/bind/primary.conf
  # includes it), from the config disk like Debian's roles/control.sh, and
  # its zone as a file named can write back.
  systemd.services.bind.preStart = lib.mkIf isPrimary (lib.mkBefore ''
    install -d -o named -g named /run/named /etc/bind
    test -e ${zoneFile} || install -o named -g named -m 644 ${initialZone} ${zoneFile}
    . /photon/node.env
    umask 027
    printf 'key "photon-update" { algorithm hmac-sha256; secret "%s"; };\n' "$DNS_TSIG_SECRET" \
      > /etc/bind/photon-update.key
    chgrp named /etc/bind/photon-update.key
  '');

  services.haproxy = {
    enable = true;
    config = svc.render "haproxy/haproxy.cfg";
  };
  # Listeners published at runtime (src/check/lb_listener.rs): haproxy also
  # loads /etc/haproxy/listeners.d, as on Debian (roles/control.sh).
  systemd.tmpfiles.rules = [ "d /etc/haproxy/listeners.d 0755 root root -" ];
  systemd.services.haproxy.serviceConfig.ExecStart = lib.mkForce
    "${pkgs.haproxy}/sbin/haproxy -Ws -f /etc/haproxy.cfg -f /etc/haproxy/listeners.d -p /run/haproxy/haproxy.pid -S /run/haproxy/haproxy-master.sock";

  # prismnet: the OVN databases and ovn-northd on the first control node,
  # reachable over TCP (6641/6642) as on Debian. nixpkgs has OVN as a
  # package but no module, so this is the unit Debian ships, by hand.
  systemd.services.ovn-northd = lib.mkIf isPrimary {
    description = "OVN databases and northd (prismnet part)";
    wantedBy = [ "multi-user.target" ];
    after = [ "network.target" ];
    serviceConfig = {
      Type = "forking";
      ExecStart = "${pkgs.ovn}/share/ovn/scripts/ovn-ctl start_northd --ovn-manage-ovsdb=yes --db-nb-create-insecure-remote=yes --db-sb-create-insecure-remote=yes";
      ExecStop = "${pkgs.ovn}/share/ovn/scripts/ovn-ctl stop_northd";
      RuntimeDirectory = "ovn";
      StateDirectory = "ovn";
    };
  };

  environment.systemPackages = [ pkgs.etcd pkgs.redis pkgs.ovn ];
}
