# workers: a web backend behind the load balancer, a volume exported over NBD
# (coronafs), and qemu for nested guests (plasmavmc). The NixOS counterpart of
# images/debian/roles/worker.sh. UNVERIFIED (needs nixpkgs; docs/nix.md).
{ config, pkgs, ... }:
let
  inherit (config.photon) nodeName;
in
{
  imports = [ ./volume-export.nix ];

  services.nginx = {
    enable = true;
    virtualHosts.backend = {
      default = true;
      listen = [{ addr = "0.0.0.0"; port = 8080; }];
      locations."/healthz".return = "200 \"ok\\n\"";
      locations."/".return = "200 \"photon web backend ${nodeName}\\n\"";
    };
  };

  # Nested guests: KVM when the host passes it through, TCG otherwise.
  boot.kernelModules = [ "kvm-intel" "kvm-amd" ];
  virtualisation.libvirtd.enable = false;
  environment.systemPackages = [ pkgs.qemu_kvm ];
}
