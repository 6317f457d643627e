# mkClusterCheck: one validation lane as one derivation, shaped like a NixOS
# test (requiredSystemFeatures kvm + nixos-test, meta.timeout,
# driverInteractive). Builtins only: the derivation is a plain `derivation`
# whose builder is /bin/sh (there is no nixpkgs stdenv or bash here), so CI
# can instantiate and build it with Debian's nix-bin and nothing else.
{ util, defs, defaultSystem }:
let
  inherit (util) concatMap shellQuote shellWords pathString inStore underAny;

  # A PATH entry: a string is a directory; a derivation (or anything with an
  # outPath) contributes its bin/ like nixpkgs' lib.makeBinPath.
  pathEntry = p:
    if builtins.isAttrs p then "${p}/bin"
    else pathString p;

  # What the builder runs. Only shell builtins and the driver: /bin/sh in a
  # sandbox is a minimal busybox, outside it the host's dash.
  #   $0 = check name, "$@" = the arguments of `photon-cluster run` minus --out.
  builderScript = ''
    set -u
    if [ -d "$driver" ]; then exe="$driver/bin/photon-cluster"; else exe="$driver"; fi
    echo "photon-cluster check $0: $exe run --out $out $*"
    "$exe" run --out "$out" "$@"
    rc=$?
    case $rc in
      0)
        if [ ! -e "$out/nix-support/hydra-build-products" ]; then
          echo "photon-cluster check $0: the driver exited 0 but wrote no $out/nix-support/hydra-build-products" >&2
          exit 3
        fi
        if [ -e "$out/nix-support/failed" ]; then
          echo "photon-cluster check $0: lane $lane FAILED; outputs kept because keepFailed = true (nix-support/failed is set)" >&2
        fi
        exit 0 ;;
      1) echo "photon-cluster check $0: lane $lane failed (exit 1); evidence is discarded unless keepFailed = true" >&2 ;;
      2) echo "photon-cluster check $0: bad input (exit 2): refused before anything started (see the message above)" >&2 ;;
      3) echo "photon-cluster check $0: infrastructure error (exit 3): image, QEMU or boot" >&2 ;;
      *) echo "photon-cluster check $0: the driver exited $rc" >&2 ;;
    esac
    exit $rc
  '';

  # Writes $out/bin/<name> from $text. mkdir and chmod come from PATH: the
  # check's `path` entries, then the host's /bin and /usr/bin (present when
  # the build runs with sandbox = false, as in CI; inside a sandbox pass a
  # coreutils in `path`).
  writeScriptBuilder = ''
    set -u
    for tool in mkdir chmod; do
      command -v "$tool" >/dev/null 2>&1 || {
        echo "driverInteractive: no $tool on PATH ($PATH); add a coreutils to the check's path" >&2
        exit 1
      }
    done
    mkdir -p "$out/bin"
    printf '%s\n' "$text" > "$out/bin/$name"
    chmod 0555 "$out/bin/$name"
  '';
in
rec {
  mkClusterCheck =
    { name
      # The photon-cluster binary, or a directory with bin/photon-cluster
      # (a package). A Nix path is copied into the store; a string is used as is.
    , driver
      # An embedded lane name (checks/<lane>.toml in the driver).
    , lane ? "smoke"
      # A lane file instead of the embedded lane (passed as --lane-file).
    , laneFile ? null
      # A directory with vmlinuz, initrd.img and rootfs.img.
    , images
      # A cluster definition (TOML); null runs the embedded `profile`.
    , cluster ? null
    , profile ? "reference"
      # true: a failed lane still builds, with nix-support/failed (Hydra keeps the evidence).
    , keepFailed ? false
      # Paths outside the store the driver may use (each becomes --allow-impure).
    , impurePaths ? [ ]
      # PATH for the driver: directories (strings/paths) or packages (their bin/).
      # The driver finds qemu-system-x86_64, qemu-img, ssh-keygen and mkfs.ext4 here.
    , path ? [ ]
      # Seconds; meta.timeout for Hydra, and the `timeout` variable for the builder.
    , timeout ? 3600
    , system ? defaultSystem
      # Extra arguments for `photon-cluster run` (e.g. [ "--keep-going" ]).
    , extraArgs ? [ ]
      # Extra environment for the builder (strings), e.g. { nonce = "..."; }
      # to force a rebuild of an otherwise identical derivation in CI.
    , env ? { }
      # Check at eval time that the lane's targets exist in the cluster, when
      # both definitions are readable here (a path cluster or an embedded
      # profile, and a lane file or an embedded lane that nix/lib can see).
    , validate ? true
    }:
    let
      driverStr = pathString driver;
      imagesStr = pathString images;
      clusterStr = if cluster == null then null else pathString cluster;
      laneFileStr = if laneFile == null then null else pathString laneFile;
      pathEntries = map pathEntry path;

      # Hermeticity, as the driver will judge it, but at eval time and with
      # the fix in the message.
      outside = what: s:
        if inStore s || underAny impurePaths s then [ ]
        else [ "${what} ${s} is outside ${builtins.storeDir}: pass it as a Nix path (copied into the store) or list it in impurePaths (recorded in result.json as impure)" ];
      hermeticErrors =
        outside "images" imagesStr
        ++ concatMap (p: outside "path entry" p) pathEntries
        ++ (if clusterStr == null then [ ] else outside "cluster" clusterStr)
        ++ (if laneFileStr == null then [ ] else outside "laneFile" laneFileStr);

      # Eval-time lane validation against what nix/lib can read.
      repo = ../..;
      clusterDef =
        if cluster == null then
          (if builtins.pathExists (repo + "/profiles/${profile}.toml") then defs.clusterFromToml (repo + "/profiles/${profile}.toml") else null)
        else if builtins.isPath cluster then defs.clusterFromToml cluster
        else null;
      laneDef =
        if laneFile != null then (if builtins.isPath laneFile then defs.laneFromToml laneFile else null)
        else if builtins.pathExists (repo + "/checks/${lane}.toml") then defs.laneFromToml (repo + "/checks/${lane}.toml")
        else null;
      laneErrors =
        if !validate || clusterDef == null || laneDef == null then [ ]
        else clusterDef.errors ++ defs.validateLane clusterDef laneDef;

      errors = hermeticErrors ++ laneErrors;

      runArgs =
        (if laneFileStr != null then [ "--lane-file" laneFileStr ] else [ "--lane" lane ])
        ++ (if clusterStr != null then [ "--cluster" clusterStr ] else [ "--profile" profile ])
        ++ [ "--image-dir" imagesStr ]
        ++ (if keepFailed then [ "--keep-failed" ] else [ ])
        ++ concatMap (p: [ "--allow-impure" p ]) impurePaths
        ++ extraArgs;

      targetArgs = if clusterStr != null then [ "--cluster" clusterStr ] else [ "--profile" profile ];
      laneArgs = if laneFileStr != null then [ "--lane-file" laneFileStr ] else [ "--lane" lane ];
      driverExe = ''if [ -d ${shellQuote driverStr} ]; then exe=${shellQuote "${driverStr}/bin/photon-cluster"}; else exe=${shellQuote driverStr}; fi'';

      interactiveName = "${name}-driver-interactive";
      interactiveScript = builtins.concatStringsSep "\n" ([
        "#!/bin/sh"
        "# Interactive driver of the Nix check ${name} (lane ${if laneFileStr != null then laneFileStr else lane}),"
        "# outside the sandbox, with your HOME state directory and /dev/kvm:"
        "#   ${interactiveName}                fresh-smoke of the lane against the same cluster"
        "#   ${interactiveName} replay [DIR]   the check's own 'photon-cluster run' with its images (default DIR ./work/nix-${name})"
        "#   ${interactiveName} ARGS...        photon-cluster ARGS with the same cluster, e.g. start, status, ssh node04, stop"
        "set -eu"
      ]
      ++ (if pathEntries == [ ] then [ ] else [ "PATH=${shellQuote (builtins.concatStringsSep ":" pathEntries)}\${PATH:+:$PATH}" "export PATH" ])
      ++ [
        driverExe
        "case \"\${1:-}\" in"
        "  '') exec \"$exe\" ${shellWords targetArgs} fresh-smoke ${shellWords laneArgs} ;;"
        "  replay) out=\${2:-./work/nix-${name}}; exec \"$exe\" run --out \"$out\" ${shellWords runArgs} ;;"
        "  *) exec \"$exe\" ${shellWords targetArgs} \"$@\" ;;"
        "esac"
      ]);

      driverInteractive = derivation {
        name = interactiveName;
        inherit system;
        builder = "/bin/sh";
        args = [ "-c" writeScriptBuilder ];
        text = interactiveScript;
        PATH = builtins.concatStringsSep ":" (pathEntries ++ [ "/bin" "/usr/bin" ]);
        preferLocalBuild = true;
        allowSubstitutes = false;
      } // { meta.mainProgram = interactiveName; };

      drv = derivation (env // {
        inherit name system;
        builder = "/bin/sh";
        # sh -c SCRIPT NAME ARGS...: the run arguments are visible in the .drv.
        args = [ "-c" builderScript name ] ++ runArgs;
        driver = driverStr;
        images = imagesStr;
        inherit lane;
        keepFailed = if keepFailed then "1" else "";
        timeout = toString timeout;
        # No HOME in a builder: the driver's hermetic mode keeps state under $TMPDIR.
        PATH = builtins.concatStringsSep ":" pathEntries;
        requiredSystemFeatures = [ "kvm" "nixos-test" ];
        preferLocalBuild = false;
        allowSubstitutes = false;
      });
    in
    if errors != [ ] then throw "mkClusterCheck ${name}: ${builtins.concatStringsSep "; " errors}"
    else drv // {
      meta = {
        inherit timeout;
        description = "photon-cluster lane ${lane} (${if clusterStr != null then clusterStr else "profile ${profile}"})";
        # Hydra: a failed lane is a failed build unless keepFailed.
        requiredSystemFeatures = [ "kvm" "nixos-test" ];
      };
      # passthru, the nixpkgs way: attributes of the result, not of the .drv.
      inherit driverInteractive runArgs lane keepFailed;
      photonCluster = { inherit lane profile; cluster = clusterStr; images = imagesStr; driver = driverStr; };
    };

  # Several lanes over the same cluster and images:
  #   mkClusterChecks { lanes = { fresh-smoke = "smoke"; }; driver; images; ... }
  mkClusterChecks = { lanes, ... }@args:
    builtins.mapAttrs
      (checkName: laneName: mkClusterCheck ((removeAttrs args [ "lanes" ]) // { name = checkName; lane = laneName; }))
      lanes;
}
