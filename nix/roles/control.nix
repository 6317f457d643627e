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
  # nixpkgs checks named's configuration at build time (services.bind.checkConfig,
  # on by default: `named-checkconf -z` in the build sandbox, docs/nix.md), so
  # every file the configuration names must exist in the store: the primary's
  # zone, in a directory of its own, and its TSIG key with a placeholder
  # secret. At run time the unit sees writable per-boot copies mounted over
  # both directories (BindPaths below): named writes dynamic updates, the
  # journal and its dumps next to the zone, and reads the cluster's real key.
  zoneName = "db.${domain}";
  zoneDir = pkgs.writeTextDir zoneName (base.render "bind/db.zone");
  keyDir = pkgs.writeTextDir "photon-update.key" (keyStatement placeholderSecret);
  # Not a secret: 32 zero bytes, base64, only ever seen by the build's check.
  placeholderSecret = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
  keyStatement = secret: ''
    key "photon-update" { algorithm hmac-sha256; secret "${secret}"; };
  '';
  # Where photon-named-files puts the run-time copies.
  runZone = "/run/photon-named/zone";
  runKey = "/run/photon-named/key";
  svc = import ./services.nix {
    inherit cluster nodeName;
    values = if isPrimary
      then { ZONE_FILE = "${zoneDir}/${zoneName}"; KEY_FILE = "${keyDir}/photon-update.key"; }
      # A secondary's zone is a transfer named writes: its RuntimeDirectory.
      else { ZONE_FILE = "/run/named/${zoneName}"; };
  };
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
  # nixpkgs' module runs named as `named` with ProtectSystem=strict, and its
  # own preStart (as `named`) makes /etc/bind/rndc.key in a
  # ConfigurationDirectory that systemd leaves owned by root. So what named
  # needs written is written by root, before it, in photon-named-files: the
  # rndc key, and on the primary the run-time copies of the zone and the
  # cluster's TSIG key (from the config disk, /photon, a nofail mount),
  # which bind's unit sees mounted over the store directories its checked
  # configuration names.
  systemd.services.bind = {
    serviceConfig = lib.mkIf isPrimary {
      BindPaths = [ "${runZone}:${zoneDir}" ];
      BindReadOnlyPaths = [ "${runKey}:${keyDir}" ];
    };
    after = [ "photon-named-files.service" ];
    requires = [ "photon-named-files.service" ];
  };
  systemd.services.photon-named-files = {
    description = "Files named reads but may not write: rndc key; zone and TSIG key on the primary";
    before = [ "bind.service" ];
    after = [ "photon-firstboot.service" ];
    unitConfig.RequiresMountsFor = lib.mkIf isPrimary "/photon";
    serviceConfig = { Type = "oneshot"; RemainAfterExit = true; };
    path = [ pkgs.coreutils pkgs.gnused config.services.bind.package ];
    script = ''
      set -eu
      install -d -m 755 /etc/bind
      test -f /etc/bind/rndc.key || rndc-confgen -c /etc/bind/rndc.key -a -A hmac-sha256 2>/dev/null
      chgrp named /etc/bind/rndc.key && chmod 640 /etc/bind/rndc.key
    '' + lib.optionalString isPrimary ''
      install -d -m 755 /run/photon-named
      install -d -m 755 -o named -g named ${runZone}
      test -e ${runZone}/${zoneName} || install -o named -g named -m 644 ${zoneDir}/${zoneName} ${runZone}/${zoneName}
      install -d -m 750 -o root -g named ${runKey}
      . /photon/node.env
      umask 027
      printf '%s' ${lib.escapeShellArg (keyStatement "@SECRET@")} | sed "s|@SECRET@|$DNS_TSIG_SECRET|" > ${runKey}/photon-update.key
      chgrp named ${runKey}/photon-update.key
    '';
  };

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
