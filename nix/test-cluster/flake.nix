{
  # The PhotonCloud VM test cluster, kept where the seed keeps it. A flake of
  # its own: it consumes the top-level flake's library and roles
  # (photon-cluster) and a `photoncloud` input pointing at the PhotonCloud
  # monorepo, so that input can never break the top-level checks.
  #
  # Point it at your monorepo:
  #   nix run ./nix/test-cluster#cluster --override-input photoncloud path:/src/photoncloud -- fresh-smoke
  # or edit inputs.photoncloud.url and run `nix flake lock ./nix/test-cluster`.
  #
  # UNVERIFIED: needs nixpkgs and PhotonCloud, neither fetchable in CI (docs/nix.md).
  description = "PhotonCloud VM test cluster: six QEMU nodes validated by photon-cluster";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    photon-cluster = {
      url = "path:../..";
      inputs.nixpkgs.follows = "nixpkgs";
    };
    photoncloud = {
      url = "github:photoncloud/photoncloud";
      flake = true;
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  outputs = { self, nixpkgs, photon-cluster, photoncloud }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
      inherit (nixpkgs) lib;
      photonLib = photon-cluster.lib;
      driver = photon-cluster.packages.${system}.default;

      # PhotonCloud's services as NixOS modules (assumed: nixosModules.default
      # declares services.<name> for every service; docs/nix.md).
      photoncloudModules = [ photoncloud.nixosModules.default ];

      # A node: the shared base (photon-cluster's photon-common: addresses,
      # /etc/hosts, SSH keys from the config disk), this flake's common.nix and
      # the node's own file.
      modulesFor = node: photoncloudModules ++ [
        photon-cluster.nixosModules.photon-common
        ./common.nix
        (./. + "/${node.name}.nix")
      ];

      main = photonLib.mkNodeImages { inherit nixpkgs system modulesFor; clusterFile = ./cluster.toml; };
      storage = photonLib.mkNodeImages { inherit nixpkgs system modulesFor; clusterFile = ./storage-cluster.toml; };

      guestImage = module: (lib.nixosSystem { inherit system; modules = [ module ]; }).config.system.build.photonGuestImage;

      hasLanes = builtins.pathExists ../../checks/photoncloud;
      # The seed's entry point, with the driver and this cluster on hand.
      cluster = pkgs.writeShellScriptBin "photoncloud-cluster" ''
        export PATH=${lib.makeBinPath [ driver pkgs.qemu_kvm pkgs.openssh pkgs.e2fsprogs ]}:$PATH
        export PHOTONCLOUD_CLUSTER=''${PHOTONCLOUD_CLUSTER:-${./cluster.toml}}
        export PHOTONCLOUD_STORAGE_CLUSTER=''${PHOTONCLOUD_STORAGE_CLUSTER:-${./storage-cluster.toml}}
        ${lib.optionalString hasLanes "export PHOTONCLOUD_LANES=\${PHOTONCLOUD_LANES:-${../../checks/photoncloud}}"}
        exec ${pkgs.bash}/bin/bash ${./run-cluster.sh} "$@"
      '';

      # The PhotonCloud lanes present in checks/photoncloud/.
      laneNames = builtins.filter (lane: builtins.pathExists (../../checks/photoncloud + "/${lane}.toml"))
        [ "smoke" "matrix" "provider-vm-reality-proof" ];
      laneArgs = lane: {
        name = "photoncloud-${lane}";
        inherit driver;
        laneFile = ../../checks/photoncloud + "/${lane}.toml";
        cluster = ./cluster.toml;
        images = main.all;
        path = [ pkgs.qemu_kvm pkgs.openssh pkgs.e2fsprogs ];
        coreutils = pkgs.coreutils;
        shell = pkgs.runtimeShell;
      };
    in
    {
      nixosConfigurations = main.configurations // storage.configurations;

      # What the driver's Nix image provider builds, all nodes in one
      # `nix build --json`: nodeImages.<node> = { vmlinuz, initrd.img, cmdline, toplevel }
      # (booted from the store: nix/images.nix).
      nodeImages = main.nodeImages // storage.nodeImages;

      packages.${system} = {
        default = main.all;
        images = main.all;
        storage-images = storage.all;
        vm-guest-image = guestImage ./vm-guest-image.nix;
        vm-bench-guest-image = guestImage ./vm-bench-guest-image.nix;
        inherit cluster;
      };

      # nix run ./nix/test-cluster#cluster -- fresh-smoke
      apps.${system} = {
        cluster = { type = "app"; program = "${cluster}/bin/photoncloud-cluster"; };
        default = self.apps.${system}.cluster;
      };

      # The same lanes as hermetic checks, when checks/photoncloud/ has them;
      # a failed lane fails its check. hydraJobs: the same with keepFailed
      # (the evidence is kept, Hydra reads nix-support/failed).
      checks.${system} = lib.optionalAttrs hasLanes (builtins.listToAttrs (map
        (lane: { name = "photoncloud-${lane}"; value = photonLib.mkClusterCheck (laneArgs lane); })
        laneNames));
      hydraJobs = lib.optionalAttrs hasLanes (builtins.listToAttrs (map
        (lane: { name = "photoncloud-${lane}"; value.${system} = photonLib.mkHydraJob (laneArgs lane); })
        laneNames));

      # nix develop ./nix/test-cluster -c ./nix/test-cluster/run-cluster.sh smoke
      devShells.${system}.default = pkgs.mkShell {
        packages = [ driver pkgs.qemu_kvm pkgs.openssh pkgs.sshpass pkgs.curl pkgs.jq ];
      };
    };
}
