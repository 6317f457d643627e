# workers: a web backend behind the load balancer, a volume exported over NBD
# (coronafs), and qemu for nested guests (plasmavmc). The NixOS counterpart of
# images/debian/roles/worker.sh: the web backend's configuration is
# services/nginx/backend.conf, rendered by ./services.nix. UNVERIFIED (needs
# nixpkgs; docs/nix.md).
{ config, pkgs, ... }:
let
  inherit (config.photon) cluster nodeName;
  svc = import ./services.nix { inherit cluster nodeName; };
  # The nested-guest kit, from the same init as the Debian image's: this
  # node's own kernel and a static busybox initramfs.
  nestedKit = import ../nested-kit.nix {
    inherit (pkgs.stdenv.hostPlatform) system;
    busybox = pkgs.pkgsStatic.busybox;
    kernel = "${config.boot.kernelPackages.kernel}/${config.system.boot.loader.kernelFile}";
  };
in
{
  imports = [ ./volume-export.nix ];

  services.nginx = {
    enable = true;
    appendHttpConfig = svc.render "nginx/backend.conf";
  };

  # Nested guests: KVM when the host passes it through, TCG otherwise.
  boot.kernelModules = [ "kvm-intel" "kvm-amd" ];
  virtualisation.libvirtd.enable = false;
  environment.systemPackages = [ pkgs.qemu_kvm pkgs.ovn ];

  # prismnet: Open vSwitch and ovn-controller, a chassis named like the node
  # tunnelling Geneve to the databases on the first control node (Debian:
  # roles/worker.sh and photon-ovn-chassis.service).
  virtualisation.vswitch.enable = true;
  systemd.services.ovn-controller = {
    description = "OVN chassis (prismnet part)";
    wantedBy = [ "multi-user.target" ];
    after = [ "ovs-vswitchd.service" ];
    requires = [ "ovs-vswitchd.service" ];
    path = [ pkgs.openvswitch ];
    preStart = ''
      ovs-vsctl --no-wait set open . external_ids:system-id=${nodeName} \
        external_ids:ovn-remote=tcp:${svc.scalars.PRIMARY_ADDR}:6642 \
        external_ids:ovn-encap-type=geneve external_ids:ovn-encap-ip=${svc.scalars.NODE_ADDR}
    '';
    serviceConfig = {
      ExecStart = "${pkgs.ovn}/bin/ovn-controller unix:/run/openvswitch/db.sock";
      # Its pid file and control socket go to /run/ovn, which nothing else
      # makes: nixpkgs' vswitch module makes /run/openvswitch only.
      RuntimeDirectory = "ovn";
    };
  };

  # k8shost: podman reads the Kubernetes YAML (src/check/kube_bundle.rs).
  virtualisation.podman.enable = true;
  # Where src/check/nested_guest.rs looks for the kit, as on Debian.
  systemd.tmpfiles.rules = [ "L+ /usr/local/share/photon/nested - - - - ${nestedKit}" ];
}
