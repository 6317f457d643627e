# Every node: the NixOS counterpart of images/debian/customize.sh and
# roles/common.sh. Per-node identity that the cluster definition fixes
# (hostname, address, /etc/hosts, which servers run) is baked into the image;
# what the driver makes per run (SSH keys, host key, the IAM secret) still
# arrives on the config disk (/dev/vdb at /photon) and is applied by
# photon-firstboot before sshd starts, as in the Debian image.
#
# UNVERIFIED: needs nixpkgs, which CI cannot fetch (docs/nix.md).
{ config, lib, pkgs, modulesPath, ... }:
let
  inherit (config.photon) cluster nodeName;
  node = cluster.byName.${nodeName};
  prefixLength = lib.toInt (lib.last (lib.splitString "/" cluster.subnet));
  svcCommon = import ./services.nix { inherit cluster nodeName; };
in
{
  imports = [
    ./options.nix
    (modulesPath + "/profiles/qemu-guest.nix")
    (modulesPath + "/profiles/minimal.nix")
  ];

  system.stateVersion = "24.05";

  # Booted by QEMU -kernel/-initrd (src/machine/cmdline.rs): no bootloader;
  # the images add init=<toplevel>/init (nix/images.nix). As nixpkgs'
  # qemu-vm.nix: the system is the host's /nix/store, shared read-only over
  # 9p (the driver's `-virtfs ... mount_tag=nix-store,readonly=on`), and
  # /dev/vda is a blank disk the driver makes for this node's state, given a
  # file system here at first boot. No disk image per node.
  boot.loader.grub.enable = false;
  boot.initrd.availableKernelModules = [ "virtio_pci" "virtio_blk" "virtio_net" "ext4" "9p" "9pnet_virtio" ];
  boot.kernelParams = [ "console=ttyS0,115200" "net.ifnames=0" "panic=-1" ];
  fileSystems."/" = { device = "/dev/vda"; fsType = "ext4"; autoFormat = true; options = [ "noatime" ]; };
  fileSystems."/nix/store" = {
    device = "nix-store";
    fsType = "9p";
    neededForBoot = true;
    # x-systemd.requires: with the systemd initrd the mount must wait for the
    # 9p transport's module, as nixpkgs' own qemu-vm.nix has it (docs/nix.md).
    options = [ "trans=virtio" "version=9p2000.L" "msize=1048576" "cache=loose" "ro" "x-systemd.requires=modprobe@9pnet_virtio.service" ];
  };
  # The store is read-only and never registered: no Nix daemon in the guests.
  nix.enable = false;
  fileSystems."/photon" = { device = "/dev/vdb"; fsType = "ext4"; options = [ "ro" "nofail" "x-systemd.device-timeout=0" ]; };

  networking.hostName = nodeName;
  networking.domain = cluster.domain;
  networking.usePredictableInterfaceNames = false;
  networking.useDHCP = false;
  # The driver's NICs (src/machine/cmdline.rs): first QEMU's user network
  # (SSH and the forwards; DHCP), second the cluster's shared segment.
  networking.interfaces.eth0.useDHCP = true;
  networking.interfaces.eth1.ipv4.addresses = [{ address = node.address; inherit prefixLength; }];
  networking.firewall.enable = false;
  networking.hosts = lib.listToAttrs (map
    (n: { name = n.address; value = [ "${n.name}.${cluster.domain}" n.name ]; })
    cluster.nodes);

  services.openssh = {
    enable = true;
    settings = {
      PermitRootLogin = "prohibit-password";
      PasswordAuthentication = false;
      UseDns = false;
    };
    # The host key comes from the config disk, so the driver knows it in advance.
    hostKeys = [{ path = "/etc/ssh/ssh_host_ed25519_key"; type = "ed25519"; }];
  };
  # The lanes ask for Debian's unit names (profiles/reference.toml).
  systemd.services.sshd.aliases = [ "ssh.service" ];

  systemd.services.photon-firstboot = {
    description = "Apply this node's keys and secrets from the config disk";
    wantedBy = [ "multi-user.target" ];
    before = [ "sshd.service" "prometheus.service" "prometheus-node-exporter.service" ];
    requiredBy = [ "sshd.service" ];
    unitConfig.RequiresMountsFor = "/photon";
    serviceConfig = { Type = "oneshot"; RemainAfterExit = true; };
    path = [ pkgs.coreutils ];
    script = ''
      set -eu
      C=/photon
      install -d -m 700 /root/.ssh
      install -m 600 "$C/authorized_keys" /root/.ssh/authorized_keys
      install -m 600 "$C/ssh_host_ed25519_key" /etc/ssh/ssh_host_ed25519_key
      install -m 644 "$C/ssh_host_ed25519_key.pub" /etc/ssh/ssh_host_ed25519_key.pub
      install -d -m 755 /run/photon
      if [ -f "$C/node.env" ]; then
        . "$C/node.env"
        umask 077
        printf '%s' "''${IAM_SECRET:-}" > /run/photon/iam-secret
      fi
    '';
  };

  # The driver's control channel: the same agent as the Debian image's
  # (src/agent/ built by nix/agent.nix, images/debian/customize.sh) on the
  # virtio-serial port org.photon.agent, up before the network and sshd.
  boot.kernelModules = [ "virtio_console" ];
  systemd.services.photon-agent = {
    description = "photon driver control channel (virtio-serial org.photon.agent)";
    wantedBy = [ "sysinit.target" ];
    before = [ "sysinit.target" "network-pre.target" "sshd.service" "shutdown.target" ];
    after = [ "systemd-udevd.service" ];
    conflicts = [ "shutdown.target" ];
    unitConfig.DefaultDependencies = false;
    # The agent's commands run as they would over SSH: with the system's tools.
    path = [ "/run/current-system/sw" ];
    serviceConfig = {
      ExecStart = "${pkgs.callPackage ../agent.nix { }}/bin/photon-agent";
      # What a command started in the background outlives a restart of the
      # agent, as it outlives an SSH session's end.
      KillMode = "process";
      Restart = "always";
      RestartSec = "100ms";
    };
  };

  # The agent's units watch reads systemd's signals on the system bus
  # (src/agent/units.rs). NixOS's systemd module turns D-Bus on already
  # (UNVERIFIED at the pin, docs/nix.md); said here so that it is not left to that.
  services.dbus.enable = true;

  # Every role runs a node exporter (roles/common.sh).
  services.prometheus.exporters.node = {
    enable = true;
    # services/prometheus/node-exporter.flags (the gateway adds its own).
    extraFlags = svcCommon.words (svcCommon.render "prometheus/node-exporter.flags");
    port = 9100;
    listenAddress = "0.0.0.0";
  };

  # What the lanes run inside guests: etcdctl, redis-cli, socat, curl.
  environment.systemPackages = with pkgs; [ curl socat jq ];

  # A short-lived test guest: no docs, no timers that steal CPU under TCG.
  documentation.enable = false;
  services.logrotate.enable = false;
  systemd.timers.fstrim.enable = false;
}
