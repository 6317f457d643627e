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

      # The driver's embedded lanes (checks/<lane>.toml) on the reference
      # cluster: one derivation each, in `checks` and, with keepFailed, in
      # `hydraJobs`.
      lanes = {
        fresh-smoke = { lane = "smoke"; };
        fresh-matrix = { lane = "matrix"; };
        bench-storage = { lane = "bench-storage"; timeout = 7200; };
        provider-vm-reality-proof = { lane = "provider-vm-reality-proof"; };
      };
      laneArgs = name: args: {
        inherit name;
        driver = photon-cluster;
        images = reference.all;
        # The tools `photon-cluster run` checks: qemu-system-x86_64, qemu-img,
        # ssh-keygen, mkfs.ext4 (the per-node config disk); zstd compresses
        # the guest state of a saved (ready) cluster to about a third.
        path = [ pkgs.qemu_kvm pkgs.openssh pkgs.e2fsprogs pkgs.zstd ];
        # The builders' own tools, by store path: nothing from /bin or /usr/bin.
        coreutils = pkgs.coreutils;
        shell = pkgs.runtimeShell;
      } // args;
      # The smoke lane as a layer graph (nix/lib/layers.nix): reference-ready
      # boots once; each layer restores it in a derivation of its own.
      # Beside fresh-smoke, not instead: a layer that needs an earlier
      # layer's state has no way to say so yet (issue 24, `after`).
      layeredSmoke = keepFailed: photonLib.mkLayeredCheck (laneArgs "layered-smoke" {
        laneFile = ./checks/smoke.toml;
        inherit keepFailed;
      });
      # Its Hydra jobs, named without evaluating nixpkgs: the lane, the ready
      # cluster and one job per layer.
      layeredSmokeJobs =
        let
          jobs = layeredSmoke true;
          layer = l: { name = "layered-smoke-layer-${l}"; value = { ${system} = jobs.layers.${l}; }; };
        in
        {
          layered-smoke.${system} = jobs;
          reference-ready.${system} = jobs.ready;
        } // builtins.listToAttrs (map layer (photonLib.laneLayerNames ./checks/smoke.toml));
    in
    {
      # mkClusterCheck, mkHydraJob, mkLayeredCheck and the TOML helpers
      # (nix/lib/default.nix); mkClusterCheck takes a lane, a lane file or a
      # Python `testScript` with `python = pkgs.python3` (docs/nix.md).
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

      # A failed lane fails its check: `nix flake check` and `nix build`
      # never see a kept failure as a success.
      checks.${system} = builtins.mapAttrs (name: args: photonLib.mkClusterCheck (laneArgs name args)) lanes // {
        layered-smoke = layeredSmoke false;

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

      # Hydra: the same lanes with keepFailed, so a failed or timed-out
      # lane keeps its evidence (node logs, result.json) as the output and
      # Hydra marks the job failed through nix-support/failed.
      hydraJobs = builtins.mapAttrs (name: args: { ${system} = photonLib.mkHydraJob (laneArgs name args); }) lanes // layeredSmokeJobs // {
        photon-cluster.${system} = photon-cluster;
      };

      devShells.${system}.default = pkgs.mkShell {
        inputsFrom = [ photon-cluster ];
        packages = with pkgs; [ cargo rustc clippy rustfmt qemu_kvm openssh e2fsprogs zstd mmdebstrap ];
      };

      # nixfmt (RFC 166), the formatter nixpkgs itself is formatted with;
      # nixpkgs-fmt was archived upstream (docs/nix.md, the table).
      formatter.${system} = pkgs.nixfmt;
    };
}
