# Shared by every PhotonCloud test node, on top of photon-cluster's
# photon-common (addresses, /etc/hosts, SSH keys from the config disk, node
# exporter). Enables each role's PhotonCloud services; the nodeXX.nix files
# add what is particular to one node.
#
# UNVERIFIED: assumes the photoncloud input's nixosModules.default declares
# services.<name>.enable and a freeform services.<name>.settings for chainfire,
# flaredb, iam, prismnet, flashdns, fiberlb, plasmavmc, lightningstor,
# k8shost, coronafs, apigateway, nightlight and creditservice; ports are the
# test cluster's choice. Adjust to the monorepo's real options (docs/nix.md).
{ config, lib, pkgs, ... }:
let
  inherit (config.photon) cluster nodeName;
  node = cluster.byName.${nodeName};
  addr = n: cluster.byName.${n}.address;
  controls = cluster.roles.control or [ ];
  is = role: node.role == role;
  tc = config.photoncloud.testCluster;
in
{
  options.photoncloud.testCluster = lib.mkOption {
    type = lib.types.attrs;
    readOnly = true;
    description = "Addresses of the cluster's PhotonCloud endpoints, derived from the cluster definition.";
    default = {
      controlNodes = controls;
      chainfirePeers = map (n: "${n}=http://${addr n}:2380") controls;
      chainfireEndpoints = map (n: "http://${addr n}:2379") controls;
      flaredbPeers = map (n: "${n}=${addr n}:7000") controls;
      flaredbEndpoints = map (n: "${addr n}:7001") controls;
      iamEndpoint = "http://${addr (builtins.head controls)}:8443";
      controlApi = "http://${addr (builtins.head controls)}";
    };
  };

  config = lib.mkMerge [
    {
      system.stateVersion = "24.05";
      # Nested KVM inside workers (plasmavmc guests); harmless elsewhere.
      boot.kernelModules = [ "kvm-intel" "kvm-amd" ];
      boot.extraModprobeConfig = ''
        options kvm_intel nested=1
        options kvm_amd nested=1
      '';
      environment.systemPackages = with pkgs; [ curl jq socat ];
    }

    # Control plane: the 3-node formation of chainfire, flaredb and iam.
    (lib.mkIf (is "control") {
      services.chainfire = {
        enable = true;
        settings = { name = nodeName; listen = "${node.address}:2379"; peers = tc.chainfirePeers; };
      };
      services.flaredb = {
        enable = true;
        settings = { node_id = nodeName; listen = "${node.address}:7001"; peers = tc.flaredbPeers; chainfire = tc.chainfireEndpoints; };
      };
      services.iam = {
        enable = true;
        settings = { listen = "0.0.0.0:8443"; flaredb = tc.flaredbEndpoints; };
      };
    })

    # Workers: VM hosting and storage.
    (lib.mkIf (is "worker") {
      services.plasmavmc = {
        enable = true;
        settings = { role = "agent"; chainfire = tc.chainfireEndpoints; accel = "kvm"; };
      };
      services.lightningstor = {
        enable = true;
        settings = { role = "node"; chainfire = tc.chainfireEndpoints; };
      };
      services.coronafs = {
        enable = true;
        settings = { export = "node-local"; listen = "0.0.0.0:10809"; };
      };
      environment.systemPackages = [ pkgs.qemu_kvm ];
    })

    # Gateway: API gateway, NightLight metrics, minimal creditservice (talks to IAM).
    (lib.mkIf (is "gateway") {
      services.apigateway = {
        enable = true;
        settings = { listen = "0.0.0.0:8080"; upstream = tc.controlApi; iam = tc.iamEndpoint; };
      };
      services.nightlight = {
        enable = true;
        settings = { listen = "0.0.0.0:9090"; remote_write = true; };
      };
      services.creditservice = {
        enable = true;
        settings = { iam = tc.iamEndpoint; flaredb = tc.flaredbEndpoints; };
      };
    })

    # Storage nodes (storage-cluster.toml): CoronaFS exports and LightningStor.
    (lib.mkIf (is "storage") {
      services.coronafs = {
        enable = true;
        settings = { export = "node-local"; listen = "0.0.0.0:10809"; cache = "none"; aio = "io_uring"; };
      };
      services.lightningstor = {
        enable = true;
        settings = { role = "node"; s3_listen = "0.0.0.0:9000"; };
      };
      environment.systemPackages = [ pkgs.fio ];
    })
  ];
}
