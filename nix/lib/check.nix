# mkClusterCheck: one validation lane as one derivation, shaped like a NixOS
# test (requiredSystemFeatures kvm + nixos-test, meta.timeout, an enforced
# timeout, driverInteractive, passthru.nodes, override/overrideAttrs).
# Builtins only: the derivation is a plain `derivation` whose builder is a
# POSIX shell (`shell`, default /bin/sh: the sandbox's own, or the host's
# with the sandbox off); every other tool is named by absolute path from
# `coreutils` and `path`, so CI can instantiate and build it with Debian's
# nix-bin and nothing else, and the flake with nixpkgs' store paths only.
# With `testScript` (a Python file, or its text) the check's lane is the
# script alone, like runNixOSTest's testScript, and `python` goes on the
# driver's PATH.
{ util, defs, defaultSystem }:
let
  inherit (util) concatMap shellQuote shellWords pathString inStore underAny hasSuffix;

  # A PATH entry: a string is a directory; a derivation (or anything with an
  # outPath) contributes its bin/ like nixpkgs' lib.makeBinPath.
  pathEntry = p:
    if builtins.isAttrs p then "${p}/bin"
    else pathString p;

  # What the builder runs: shell builtins, the driver, and coreutils'
  # timeout, date and mkdir by absolute path ($coreutils is their directory).
  #   $0 = check name, "$@" = the arguments of `photon-cluster run` minus --out.
  # The driver enforces the timeout itself (`--timeout $timeout`): when it
  # expires it collects the evidence, writes the artifacts with status
  # "timeout", stops every VM and exits 124. Behind it, as a backstop for a
  # driver that hangs, coreutils' `timeout -s TERM -k $killAfter` fires
  # killAfter seconds later (the short forms of --signal and --kill-after,
  # which busybox accepts too); what has not stopped killAfter seconds
  # after TERM is killed. GNU timeout exits 124 (stopped by TERM) or 137
  # (needed KILL); busybox's passes the driver's own status on.
  builderScript = ''
    set -u
    if [ -d "$driver" ]; then exe="$driver/bin/photon-cluster"; else exe="$driver"; fi
    echo "photon-cluster check $0: $exe run --out $out $* (timeout ''${timeout}s, then KILL ''${killAfter}s after TERM)"
    started=$("$coreutils/date" +%s)
    if [ "$timeout" = 0 ]; then
      "$exe" run --out "$out" "$@"
    else
      "$coreutils/timeout" -s TERM -k "$killAfter" "$((timeout + killAfter))" "$exe" --timeout "$timeout" run --out "$out" "$@"
    fi
    rc=$?
    finished=$("$coreutils/date" +%s)

    # Hydra's view of a kept output: the whole tree as a browsable product
    # (node logs included), and the builder's own metrics.
    annotate() {
      "$coreutils/mkdir" -p "$out/nix-support" || exit 3
      listed=
      if [ -e "$out/nix-support/hydra-build-products" ]; then
        while read -r type subtype path rest; do
          if [ "$path" = "$out" ]; then listed=1; fi
        done < "$out/nix-support/hydra-build-products"
      fi
      if [ -z "$listed" ]; then
        # The tree opens at report.html (the driver writes it), else
        # report.md, else boot.json (a ready output whose boot failed has
        # no report), else at the tree itself.
        default=
        for f in report.html report.md boot.json; do
          if [ -z "$default" ] && [ -e "$out/$f" ]; then default=" $f"; fi
        done
        echo "report artifacts $out$default" >> "$out/nix-support/hydra-build-products"
      fi
      echo "lane-wall-time $((finished - started)) s" >> "$out/nix-support/hydra-metrics"
      echo "lane-timed-out $1" >> "$out/nix-support/hydra-metrics"
    }

    case $rc in
      0)
        if [ ! -e "$out/nix-support/hydra-build-products" ]; then
          echo "photon-cluster check $0: the driver exited 0 but wrote no $out/nix-support/hydra-build-products" >&2
          exit 3
        fi
        annotate 0
        if [ -e "$out/nix-support/failed" ]; then
          echo "photon-cluster check $0: lane $lane FAILED; outputs kept because keepFailed = true (nix-support/failed is set)" >&2
        fi
        exit 0 ;;
      124|137)
        if [ $rc = 124 ]; then
          echo "photon-cluster check $0: lane $lane TIMED OUT after ''${timeout}s (exit 124); the cluster was stopped and its evidence written (result.json status \"timeout\")" >&2
        else
          echo "photon-cluster check $0: lane $lane TIMED OUT after ''${timeout}s; the driver hung and did not stop within ''${killAfter}s of coreutils' TERM: killed (exit 137)" >&2
        fi
        if [ -n "$keepFailed" ] && [ -d "$out" ]; then
          annotate 1
          echo "timeout" > "$out/nix-support/failed"
          echo "photon-cluster check $0: outputs kept because keepFailed = true (nix-support/failed is set)" >&2
          exit 0
        fi
        exit $rc ;;
      1) echo "photon-cluster check $0: lane $lane failed (exit 1); evidence is discarded unless keepFailed = true" >&2 ;;
      2) echo "photon-cluster check $0: bad input (exit 2): refused before anything started (see the message above)" >&2 ;;
      3) echo "photon-cluster check $0: infrastructure error (exit 3): image, QEMU or boot" >&2 ;;
      130) echo "photon-cluster check $0: the driver was interrupted (exit 130)" >&2 ;;
      *) echo "photon-cluster check $0: the driver exited $rc" >&2 ;;
    esac
    exit $rc
  '';

  # Writes $out/bin/<name> from $text with coreutils' mkdir and chmod, by
  # absolute path: no PATH lookup, no /bin or /usr/bin fallback.
  writeScriptBuilder = ''
    set -u
    for tool in mkdir chmod; do
      if [ ! -x "$coreutils/$tool" ]; then
        echo "driverInteractive: no $coreutils/$tool; pass a coreutils (pkgs.coreutils, or a directory holding mkdir, chmod, date and timeout) to mkClusterCheck" >&2
        exit 1
      fi
    done
    "$coreutils/mkdir" -p "$out/bin"
    printf '%s\n' "$text" > "$out/bin/$name"
    "$coreutils/chmod" 0555 "$out/bin/$name"
  '';

  # `derivation` attributes: for build tools; everything else (passthru,
  # meta) lives on the result only.
  notDrvAttrs = [ "passthru" "meta" ];

  # f applied to the attributes, the way overrideAttrs does: a function of
  # the old attributes, or an attribute set, merged over them.
  applyOverride = attrs: f: attrs // (if builtins.isFunction f then f attrs else f);
in
rec {
  # The check as a function of its arguments only. mkClusterCheck wraps it
  # so that override and overrideAttrs recompute everything (the nixpkgs
  # lib.makeOverridable pattern, with builtins).
  checkParts =
    { name
      # The photon-cluster binary, or a directory with bin/photon-cluster
      # (a package). A Nix path is copied into the store; a string is used as is.
    , driver
      # An embedded lane name (checks/<lane>.toml in the driver).
    , lane ? "smoke"
      # A lane file instead of the embedded lane (passed as --lane-file).
    , laneFile ? null
      # A test script instead of a lane (docs/scripts.md): a Python file (a
      # Nix path, or a package such as pkgs.writeText "t.py" ...), or the
      # script's text (a string, as runNixOSTest's testScript). The check's
      # lane is then a generated lane file holding the script as its one
      # check; neither laneFile nor another lane may be given with it.
    , testScript ? null
      # Seconds the script may run (the script check's `deadline`, as
      # `photon-cluster script --deadline`). `timeout` still bounds the
      # whole lane, boot included.
    , testScriptDeadline ? 1800
      # A Python 3 for scripts: a package (its bin/ goes first on the
      # driver's PATH) or a directory holding python3. Required with
      # testScript, and with a lane file that has `kind = "script"` checks.
    , python ? null
      # A directory with vmlinuz, initrd.img and rootfs.img.
    , images
      # A cluster definition (TOML); null runs the embedded `profile`.
    , cluster ? null
    , profile ? "reference"
      # true: a failed (or timed-out) lane still builds, with
      # nix-support/failed, so Hydra keeps the evidence and shows the job
      # failed. Only for Hydra jobs (mkHydraJob): `nix flake check` and
      # `nix build` know nothing of nix-support/failed and would call the
      # lane a success.
    , keepFailed ? false
      # Paths outside the store the driver may use (each becomes --allow-impure).
    , impurePaths ? [ ]
      # PATH for the driver: directories (strings/paths) or packages (their bin/).
      # The driver finds qemu-system-x86_64, qemu-img, ssh-keygen and mkfs.ext4 here.
    , path ? [ ]
      # A coreutils: a package (its bin/) or a directory holding timeout,
      # date, mkdir and chmod. The builders call them by absolute path.
    , coreutils ? null
      # The builders' shell: a POSIX sh by absolute path, e.g.
      # pkgs.runtimeShell. The default is the sandbox's /bin/sh.
    , shell ? "/bin/sh"
      # Seconds the lane may run: the builder runs the driver under
      # coreutils' `timeout`, and Hydra's meta.timeout is this plus
      # killAfter plus a minute, so the check's own timeout (which keeps
      # the artifacts) always fires first. 0: no limit of the builder's own.
    , timeout ? 3600
      # Seconds between TERM (the driver tears down and writes its
      # artifacts) and KILL.
    , killAfter ? 120
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
      pythonBin = if python == null then null else pathEntry python;
      pathEntries = (if pythonBin == null then [ ] else [ pythonBin ]) ++ map pathEntry path;
      coreutilsBin = if coreutils == null then null else pathEntry coreutils;
      shellStr = pathString shell;

      # A file in the store with this text: written at eval time with
      # builtins.toFile, or, when the text refers to a derivation's output
      # (a package interpolated into the script, or a script that is a
      # package), which toFile cannot write, by a derivation of shell
      # builtins (printf) with `shell`.
      refersToOutputs = s: builtins.any (c: c ? outputs || (c.allOutputs or false)) (builtins.attrValues (builtins.getContext s));
      writeFile = fileName: text:
        if !(refersToOutputs text) then builtins.toFile fileName text
        else
          "${derivation {
            name = fileName;
            inherit system text;
            builder = shellStr;
            args = [ "-c" "printf '%s' \"$text\" > \"$out\"" ];
            PATH = "";
            preferLocalBuild = true;
          }}";

      # Hermeticity, as the driver will judge it, but at eval time and with
      # the fix in the message.
      outside = what: s:
        if inStore s || underAny impurePaths s then [ ]
        else [ "${what} ${s} is outside ${builtins.storeDir}: pass it as a Nix path (copied into the store) or list it in impurePaths (recorded in result.json as impure)" ];
      hermeticErrors =
        outside "images" imagesStr
        ++ concatMap (p: outside "path entry" p) (map pathEntry path)
        ++ (if pythonBin == null then [ ] else outside "python" pythonBin)
        ++ (if coreutilsBin == null then [ "coreutils is required: pass pkgs.coreutils (or a directory holding timeout, date, mkdir and chmod, listed in impurePaths)" ] else outside "coreutils" coreutilsBin)
        ++ (if shellStr == "/bin/sh" then [ ] else outside "shell" shellStr)
        ++ (if clusterStr == null then [ ] else outside "cluster" clusterStr)
        ++ (if laneFileStr == null then [ ] else outside "laneFile" laneFileStr);
      numberErrors =
        (if builtins.isInt timeout && timeout >= 0 then [ ] else [ "timeout must be a whole number of seconds >= 0, not ${builtins.toJSON timeout}" ])
        ++ (if builtins.isInt killAfter && killAfter > 0 then [ ] else [ "killAfter must be a whole number of seconds > 0, not ${builtins.toJSON killAfter}" ]);

      # Eval-time lane validation against what nix/lib can read.
      repo = ../..;
      clusterDef =
        if cluster == null then
          (if builtins.pathExists (repo + "/profiles/${profile}.toml") then defs.clusterFromToml (repo + "/profiles/${profile}.toml") else null)
        else if builtins.isPath cluster then defs.clusterFromToml cluster
        else null;
      # As the driver picks an embedded lane: `checks/<lane>.<cluster name>.toml`
      # when the lane has a form of its own for that cluster (bench-storage
      # on the reference cluster), else `checks/<lane>.toml`.
      clusterName = if clusterDef == null then profile else (if clusterDef.name == null then profile else clusterDef.name);
      ownForm = repo + "/checks/${lane}.${clusterName}.toml";
      # A test script's lane is generated: one check, no targets to validate.
      laneDef =
        if testScript != null then null
        else if laneFile != null then (if builtins.isPath laneFile then defs.laneFromToml laneFile else null)
        else if builtins.pathExists ownForm then defs.laneFromToml ownForm
        else if builtins.pathExists (repo + "/checks/${lane}.toml") then defs.laneFromToml (repo + "/checks/${lane}.toml")
        else null;
      laneErrors =
        if !validate || clusterDef == null || laneDef == null then [ ]
        else clusterDef.errors ++ defs.validateLane clusterDef laneDef;

      # The test script, as a file in the store, and the lane that runs it.
      hasScript = testScript != null;
      scriptIsText = builtins.isString testScript;
      scriptIsFile = builtins.isPath testScript || (builtins.isAttrs testScript && testScript ? outPath);
      # Its file name: a path's own, a package's name, <name>.py for text.
      scriptName =
        if scriptIsText then "${name}.py"
        else if builtins.isPath testScript then baseNameOf (toString testScript)
        else testScript.name or (baseNameOf (toString testScript));
      scriptStem = if hasSuffix ".py" scriptName then builtins.substring 0 (builtins.stringLength scriptName - 3) scriptName else scriptName;
      scriptFile = if scriptIsText then writeFile scriptName testScript else pathString testScript;
      # The shape of `photon-cluster script` (script_lane in src/cli/run.rs):
      # one layer, one check of kind script, its file by absolute store path.
      scriptLaneText = ''
        # Generated by mkClusterCheck ${name} from testScript ${scriptName}.
        [lane]
        name = ${builtins.toJSON name}
        description = ${builtins.toJSON "test script ${scriptName}"}

        [[layer]]
        name = "script"

        [[layer.check]]
        name = ${builtins.toJSON scriptStem}
        kind = "script"
        file = ${builtins.toJSON scriptFile}
        deadline = ${toString testScriptDeadline}
      '';
      scriptLaneFile = writeFile "${name}-lane.toml" scriptLaneText;

      # Checks of kind script in a lane file read here: they need python too.
      scriptChecks = if laneDef == null then [ ] else map (c: c.name) (builtins.filter (c: c.kind == "script") laneDef.checks);
      scriptErrors =
        if !hasScript then
          (if python == null && scriptChecks != [ ] then [ "${laneLabel} has script checks (${builtins.concatStringsSep ", " scriptChecks}), which need Python 3: pass python = pkgs.python3 (or a directory holding python3, listed in impurePaths)" ] else [ ])
        else if !(scriptIsText || scriptIsFile) then [ "testScript must be a Python file (a path or a package) or the script's text (a string), not ${builtins.typeOf testScript}" ]
        else
          (if laneFile != null then [ "testScript and laneFile are both set: the check runs one lane; drop laneFile, or drop testScript and put the script in the lane file as a check (kind = \"script\", file = \"${scriptName}\")" ] else [ ])
          ++ (if lane != "smoke" then [ "testScript and lane = \"${lane}\" are both set: the check runs one lane; drop lane, or drop testScript and put the script in a lane file as a check (kind = \"script\")" ] else [ ])
          ++ (if python == null then [ "testScript needs Python 3: pass python = pkgs.python3 (or a directory holding python3, listed in impurePaths)" ] else [ ])
          ++ (if builtins.isInt testScriptDeadline && testScriptDeadline > 0 then [ ] else [ "testScriptDeadline must be a whole number of seconds > 0, not ${builtins.toJSON testScriptDeadline}" ]);

      errors = hermeticErrors ++ numberErrors ++ laneErrors ++ scriptErrors;

      # The lane file the driver runs: the script's, or the one given.
      runLaneFile = if hasScript then scriptLaneFile else laneFileStr;

      # Names for people: the file's own name, not its store path.
      fileName = f: if builtins.isPath f then baseNameOf (toString f) else baseNameOf f;
      laneName =
        if hasScript then name
        else if laneFile == null then lane
        else if laneDef != null && laneDef.name != null then laneDef.name
        else fileName laneFile;
      laneLabel =
        if hasScript then "test script ${scriptName}"
        else if laneFile == null then "lane ${lane}"
        else "lane ${laneName} from lane file ${fileName laneFile}";
      clusterLabel = if cluster == null then "profile ${profile}" else "cluster ${fileName cluster}";

      runArgs =
        (if runLaneFile != null then [ "--lane-file" runLaneFile ] else [ "--lane" lane ])
        ++ (if clusterStr != null then [ "--cluster" clusterStr ] else [ "--profile" profile ])
        ++ [ "--image-dir" imagesStr ]
        ++ (if keepFailed then [ "--keep-failed" ] else [ ])
        ++ concatMap (p: [ "--allow-impure" p ]) impurePaths
        ++ extraArgs;

      targetArgs = if clusterStr != null then [ "--cluster" clusterStr ] else [ "--profile" profile ];
      laneArgs = if runLaneFile != null then [ "--lane-file" runLaneFile ] else [ "--lane" lane ];
      driverExe = ''if [ -d ${shellQuote driverStr} ]; then exe=${shellQuote "${driverStr}/bin/photon-cluster"}; else exe=${shellQuote driverStr}; fi'';

      interactiveName = "${name}-driver-interactive";
      interactiveScript = builtins.concatStringsSep "\n" ([
        "#!${shellStr}"
        "# Interactive driver of the Nix check ${name} (${laneLabel}, ${clusterLabel}),"
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
        builder = shellStr;
        args = [ "-c" writeScriptBuilder ];
        text = interactiveScript;
        coreutils = coreutilsBin;
        # Nothing is looked up on PATH; an empty one keeps the host's out.
        PATH = "";
        preferLocalBuild = true;
      } // { meta.mainProgram = interactiveName; };

      nodes =
        if clusterDef != null then clusterDef.nodeNames
        else throw "mkClusterCheck ${name}: nodes: the cluster ${toString clusterStr} cannot be read at eval time; pass it as a Nix path";

      passthru = {
        inherit driverInteractive runArgs keepFailed nodes;
        lane = laneName;
        photonCluster = {
          inherit profile;
          lane = laneName;
          laneFile = runLaneFile;
          testScript = if hasScript then scriptFile else null;
          python = pythonBin;
          cluster = clusterStr;
          images = imagesStr;
          driver = driverStr;
        };
      };
    in
    {
      inherit errors passthru;
      drvAttrs = env // {
        inherit name system;
        builder = shellStr;
        # sh -c SCRIPT NAME ARGS...: the run arguments are visible in the .drv.
        args = [ "-c" builderScript name ] ++ runArgs;
        driver = driverStr;
        images = imagesStr;
        lane = laneName;
        keepFailed = if keepFailed then "1" else "";
        timeout = toString timeout;
        killAfter = toString killAfter;
        coreutils = coreutilsBin;
        # No HOME in a builder: the driver's hermetic mode keeps state under $TMPDIR.
        PATH = builtins.concatStringsSep ":" pathEntries;
        # Where Nix reads it: a derivation attribute (not meta).
        requiredSystemFeatures = [ "kvm" "nixos-test" ];
        preferLocalBuild = false;
      };
      meta = {
        description = "photon-cluster ${laneLabel} on ${clusterLabel}";
      } // (if timeout == 0 then { } else {
        # Hydra's build timeout: a backstop behind the builder's own, long
        # enough for the driver's teardown after TERM.
        timeout = timeout + killAfter + 60;
      });
    };

  # The overridable result: the derivation, its passthru attributes (also
  # under .passthru) and meta, with
  #   .override { timeout = 60; }           new mkClusterCheck arguments (or old: { ... })
  #   .overrideAttrs (old: { ... })          new derivation attributes
  # both recomputing from scratch, so passthru, meta and earlier overrides
  # of the other kind survive. overrideAttrs may set passthru or meta too.
  mkOverridableCheck = args: attrOverrides:
    let
      parts = checkParts args;
      final = builtins.foldl' applyOverride
        (parts.drvAttrs // { inherit (parts) passthru meta; })
        attrOverrides;
      drv = derivation (removeAttrs final notDrvAttrs);
    in
    if parts.errors != [ ] then throw "mkClusterCheck ${args.name or "?"}: ${builtins.concatStringsSep "; " parts.errors}"
    else drv // final.passthru // {
      inherit (final) passthru meta;
      override = f: mkOverridableCheck (args // (if builtins.isFunction f then f args else f)) attrOverrides;
      overrideAttrs = f: mkOverridableCheck args (attrOverrides ++ [ f ]);
    };

  mkClusterCheck = args: mkOverridableCheck args [ ];

  # The same check for a Hydra jobset: keepFailed = true, so a failed or
  # timed-out lane keeps its evidence as the output and Hydra marks the job
  # failed through nix-support/failed. Never put these in `checks`.
  mkHydraJob = args: mkClusterCheck (args // { keepFailed = true; });

  # Several lanes over the same cluster and images:
  #   mkClusterChecks { lanes = { fresh-smoke = "smoke"; }; driver; images; coreutils; ... }
  mkClusterChecks = { lanes, ... }@args:
    builtins.mapAttrs
      (checkName: laneName: mkClusterCheck ((removeAttrs args [ "lanes" ]) // { name = checkName; lane = laneName; }))
      lanes;

  # Their Hydra jobs, in Hydra's <job>.<system> layout.
  mkHydraJobs = { lanes, system ? defaultSystem, ... }@args:
    builtins.mapAttrs
      (checkName: laneName: { ${system} = mkHydraJob ((removeAttrs args [ "lanes" ]) // { name = checkName; lane = laneName; }); })
      lanes;
}
