# Every node's NixOS image for one cluster definition, in one evaluation:
# one nixosSystem per [[node]] of the TOML (read with builtins.fromTOML via
# nix/lib), configured by nix/roles/<role>.nix. `all` builds them all with
# one `nix build`.
#
# Nodes boot the way nixpkgs' qemu-vm.nix boots a test VM: the system's
# kernel and initrd, the host's /nix/store shared read-only over 9p (tag
# `nix-store`), and a small blank disk for the node's state that the driver
# creates and NixOS formats at first boot (nix/roles/common.nix). No disk
# image is built per node.
#
# Output layout (`all`):
#   <node>/vmlinuz, <node>/initrd.img, <node>/cmdline (init=<toplevel>/init ...),
#   <node>/toplevel (the system's store path: its presence, with no
#   rootfs.img, makes the driver boot the node from the store, src/image/dir.rs)
#   vmlinuz, initrd.img: the first node's (the driver's KVM probe boots them).
#   `run --image-dir` boots each node from <node>/ and appends <node>/cmdline.
#
# UNVERIFIED: needs nixpkgs, which CI cannot fetch (docs/nix.md, "Open items").
{ nixpkgs
, system ? "x86_64-linux"
, photonLib ? import ./lib { inherit system; }
, clusterFile ? ../profiles/reference.toml
, extraModules ? [ ]
  # A node's modules; the default is the reference roles (nix/roles). The
  # PhotonCloud test cluster passes its own (nix/test-cluster/nodeXX.nix).
, modulesFor ? null
}:
let
  inherit (nixpkgs) lib;
  pkgs = nixpkgs.legacyPackages.${system};
  roles = import ./roles;
  cluster = photonLib.checkCluster (photonLib.clusterFromToml clusterFile);

  nixosFor = node: lib.nixosSystem {
    inherit system;
    modules =
      (if modulesFor == null then [ roles.common roles.roles.${node.role} ] else modulesFor node)
      ++ [{ photon = { inherit cluster; nodeName = node.name; }; }]
      ++ extraModules;
  };

  configurations = lib.listToAttrs (map (n: { name = n.name; value = nixosFor n; }) cluster.nodes);

  imageFor = name: nixos:
    let cfg = nixos.config; in
    pkgs.runCommand "photon-image-${name}" { } ''
      mkdir -p $out
      ln -s ${cfg.system.build.kernel}/${cfg.system.boot.loader.kernelFile} $out/vmlinuz
      ln -s ${cfg.system.build.initialRamdisk}/${cfg.system.boot.loader.initrdFile} $out/initrd.img
      echo "init=${cfg.system.build.toplevel}/init ${toString cfg.boot.kernelParams}" > $out/cmdline
      echo ${cfg.system.build.toplevel} > $out/toplevel
    '';

  nodeImages = builtins.mapAttrs imageFor configurations;
  first = nodeImages.${builtins.head cluster.nodeNames};
in
{
  inherit cluster configurations nodeImages;
  toplevels = builtins.mapAttrs (_: n: n.config.system.build.toplevel) configurations;
  all = pkgs.runCommand "photon-images-${cluster.name}" { } (''
    mkdir -p $out
    ln -s ${first}/vmlinuz $out/vmlinuz
    ln -s ${first}/initrd.img $out/initrd.img
    ln -s ${first}/rootfs.img $out/rootfs.img
  '' + lib.concatStrings (lib.mapAttrsToList (name: img: "ln -s ${img} $out/${name}\n") nodeImages));
}
