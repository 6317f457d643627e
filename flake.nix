{
  # Thin wiring: the logic lives in builtins-only Nix under nix/lib (tested
  # in CI without nixpkgs: tests/nix_lib.rs). Everything here that needs
  # nixpkgs is unverified on CI machines, which cannot fetch it (docs/nix.md).
  description = "photon-cluster: boot clusters of QEMU VMs from prebuilt images and validate them in lanes";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
      photonLib = import ./nix/lib { inherit system; };

      photon-cluster = pkgs.callPackage ./nix/package.nix { };

      # All node images of a cluster, from one evaluation (nix/images.nix).
      mkNodeImages = clusterFile: import ./nix/images.nix {
        inherit nixpkgs system photonLib clusterFile;
      };
      reference = mkNodeImages ./profiles/reference.toml;
      referenceStorage = mkNodeImages ./profiles/reference-storage.toml;

      # One lane, one derivation (nix/lib/check.nix).
      check = args: photonLib.mkClusterCheck ({
        driver = photon-cluster;
        images = reference.all;
        # The tools `photon-cluster run` checks: qemu-system-x86_64, qemu-img,
        # ssh-keygen, mkfs.ext4 (the per-node config disk).
        path = [ pkgs.qemu_kvm pkgs.openssh pkgs.e2fsprogs ];
      } // args);
    in
    {
      lib = photonLib // {
        # { nixpkgs, system ? ..., clusterFile, extraModules ? [ ] } -> { configurations, nodeImages, all, ... }
        mkNodeImages = args: import ./nix/images.nix ({ inherit photonLib; } // args);
      };

      nixosModules = {
        photon-common = ./nix/roles/common.nix;
        photon-control = ./nix/roles/control.nix;
        photon-worker = ./nix/roles/worker.nix;
        photon-gateway = ./nix/roles/gateway.nix;
        photon-storage = ./nix/roles/storage.nix;
      };

      nixosConfigurations =
        builtins.listToAttrs (map (n: { name = "reference-${n}"; value = reference.configurations.${n}; })
          (builtins.attrNames reference.configurations))
        // builtins.listToAttrs (map (n: { name = "reference-${n}"; value = referenceStorage.configurations.${n}; })
          (builtins.attrNames referenceStorage.configurations));

      packages.${system} = {
        default = photon-cluster;
        inherit photon-cluster;
        # Every node image of a profile, one `nix build`.
        images-reference = reference.all;
        images-reference-storage = referenceStorage.all;
      };

      apps.${system} = {
        # nix run .#cluster -- smoke
        cluster = { type = "app"; program = "${photon-cluster}/bin/photon-cluster"; };
        default = self.apps.${system}.cluster;
      };

      checks.${system} = {
        # The driver's embedded lanes (checks/<lane>.toml), one derivation each.
        fresh-smoke = check { name = "fresh-smoke"; lane = "smoke"; };
        fresh-matrix = check { name = "fresh-matrix"; lane = "matrix"; };
        bench-storage = check { name = "bench-storage"; lane = "bench-storage"; timeout = 7200; };
        provider-vm-reality-proof = check { name = "provider-vm-reality-proof"; lane = "provider-vm-reality-proof"; };

        # Unit tests only: the integration tests boot VMs or need nix-bin.
        unit-tests = photon-cluster.overrideAttrs (old: {
          pname = "photon-cluster-unit-tests";
          doCheck = true;
          cargoTestFlags = [ "--lib" "--bins" ];
        });

        clippy = photon-cluster.overrideAttrs (old: {
          pname = "photon-cluster-clippy";
          nativeBuildInputs = old.nativeBuildInputs ++ [ pkgs.clippy ];
          buildPhase = ''
            runHook preBuild
            cargo clippy --offline --all-targets -- -D warnings
            runHook postBuild
          '';
          doCheck = false;
          installPhase = "touch $out";
          postInstall = "";
        });
      };

      devShells.${system}.default = pkgs.mkShell {
        inputsFrom = [ photon-cluster ];
        packages = with pkgs; [ cargo rustc clippy rustfmt qemu_kvm openssh e2fsprogs mmdebstrap ];
      };

      formatter.${system} = pkgs.nixpkgs-fmt;
    };
}
