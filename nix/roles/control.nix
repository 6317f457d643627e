# control plane: etcd (chainfire), redis (flaredb), bind (flashdns), haproxy
# (fiberlb). The NixOS counterpart of images/debian/roles/control.sh, with
# nixpkgs' own service modules. UNVERIFIED (needs nixpkgs; docs/nix.md).
{ config, lib, pkgs, ... }:
let
  inherit (config.photon) cluster nodeName;
  addr = n: cluster.byName.${n}.address;
  self = addr nodeName;
  controls = cluster.roles.control or [ ];
  workers = cluster.roles.worker or [ ];
  primary = builtins.head controls;
  isPrimary = nodeName == primary;
  domain = cluster.domain;
  zone = pkgs.writeText "db.${domain}" (''
    $TTL 60
    @ IN SOA ${primary}.${domain}. hostmaster.${domain}. (1 60 30 600 60)
  '' + lib.concatMapStrings (n: "@ IN NS ${n}.${domain}.\n") controls
  + lib.concatMapStrings (n: "${n.name} IN A ${n.address}\n") cluster.nodes
  + "api IN A ${addr primary}\n");
in
{
  # etcd: one member of a raft cluster of every control node; generous
  # timeouts because guests may run under TCG on a shared CPU.
  services.etcd = {
    enable = true;
    name = nodeName;
    dataDir = "/var/lib/etcd/photon";
    listenPeerUrls = [ "http://${self}:2380" ];
    listenClientUrls = [ "http://0.0.0.0:2379" ];
    advertiseClientUrls = [ "http://${self}:2379" ];
    initialAdvertisePeerUrls = [ "http://${self}:2380" ];
    initialCluster = map (n: "${n}=http://${addr n}:2380") controls;
    initialClusterState = "new";
    initialClusterToken = "photon-${cluster.name}";
    extraConf = {
      HEARTBEAT_INTERVAL = "500";
      ELECTION_TIMEOUT = "5000";
    };
  };

  # redis: the first control node is the primary, the others replicate it.
  services.redis.servers."" = {
    enable = true;
    bind = null;
    port = 6379;
    settings.protected-mode = "no";
    slaveOf = lib.mkIf (!isPrimary) { ip = addr primary; port = 6379; };
  };
  systemd.services.redis.aliases = [ "redis-server.service" ];

  # bind: authoritative for the cluster domain; secondaries take transfers.
  services.bind = {
    enable = true;
    cacheNetworks = [ "127.0.0.0/8" cluster.subnet ];
    extraOptions = ''
      dnssec-validation no;
      recursion no;
    '';
    zones.${domain} =
      if isPrimary then {
        master = true;
        file = zone;
        slaves = [ "any" ];
        extraConfig = "also-notify { ${lib.concatMapStrings (n: "${addr n}; ") (lib.remove primary controls)}};";
      } else {
        master = false;
        file = "/run/named/db.${domain}";
        masters = [ (addr primary) ];
      };
  };
  systemd.services.bind.aliases = [ "named.service" ];

  # haproxy: the load balancer in front of the workers' web backends, with its
  # runtime API on a unix socket and on TCP 9999 for the lanes.
  services.haproxy = {
    enable = true;
    config = ''
      global
          stats socket /run/haproxy/admin.sock mode 660 level admin
          stats socket ipv4@0.0.0.0:9999 level admin
      defaults
          mode http
          timeout connect 5s
          timeout client 30s
          timeout server 30s
      frontend web
          bind :80
          default_backend workers
      backend workers
          balance roundrobin
          option httpchk GET /healthz
      ${lib.concatMapStrings (n: "    server ${n} ${addr n}:8080 check inter 2s\n") workers}
      listen stats
          bind :8404
          stats enable
          stats uri /stats
    '';
  };

  environment.systemPackages = [ pkgs.etcd pkgs.redis ];
}
