# Pure evaluation tests of nix/lib, builtins only:
#
#   nix-instantiate --eval --strict --json nix/lib/tests.nix
#
# prints { total, passed, failures = [ { name, expected, actual } ], names }.
# tests/nix_lib.rs runs it and fails on any failure. Evaluating a drvPath
# instantiates the .drv (writes it to the store); nothing is built.
let
  system = "x86_64-linux";
  lib = import ./. { inherit system; };
  inherit (lib.util) hasPrefix hasSuffix;

  reference = lib.clusterFromToml ../../profiles/reference.toml;
  storage = lib.clusterFromToml ../../profiles/reference-storage.toml;
  smoke = lib.laneFromToml ../../checks/smoke.toml;
  smokeLayers = lib.laneLayerNames ../../checks/smoke.toml;
  layeredJobs = [ "layered-smoke" "reference-ready" ] ++ map (l: "layered-smoke-layer-${l}") smokeLayers;

  # Stand-ins: store paths made with builtins.toFile, never built or run.
  fakeDriver = builtins.toFile "photon-cluster" "#!/bin/sh\nexit 3\n";
  fakeImages = builtins.toFile "images" "stand-in for a directory with vmlinuz, initrd.img, rootfs.img\n";
  fakeCoreutils = builtins.toFile "coreutils" "stand-in for a directory with timeout, date, mkdir, chmod\n";
  fakeShell = builtins.toFile "sh" "stand-in for a POSIX shell\n";

  mk = args: lib.mkClusterCheck ({ name = "fresh-smoke"; driver = fakeDriver; images = fakeImages; coreutils = fakeCoreutils; } // args);
  check = mk { };
  kept = mk { name = "kept"; keepFailed = true; impurePaths = [ "/usr/bin" ]; path = [ "/usr/bin" ]; timeout = 600; };
  withFiles = mk { name = "files"; cluster = ../../profiles/reference.toml; laneFile = ../../checks/smoke.toml; };

  # Does `xs` contain `a` immediately followed by `b`?
  hasPair = a: b: xs:
    let n = builtins.length xs; in
    builtins.any (i: builtins.elemAt xs i == a && builtins.elemAt xs (i + 1) == b)
      (builtins.genList (i: i) (if n < 2 then 0 else n - 1));

  # Does evaluating (and forcing) x throw?
  throws = x: !(builtins.tryEval (builtins.deepSeq x x)).success;
  evaluates = x: (builtins.tryEval (builtins.deepSeq x x)).success;

  bad = lib.clusterFromToml {
    cluster.name = "bad";
    node = [
      { name = "a"; role = "control"; address = "10.0.0.1"; }
      { name = "a"; role = "wrker"; address = "10.0.0.1"; depends_on = [ "zz" ]; }
      { role = "worker"; address = "10.0.0.3"; }
    ];
  };

  # The top-level flake's outputs function with nixpkgs that throws when
  # touched: the library and the output names must not need it.
  flake = (import ../../flake.nix).outputs { self = flake; nixpkgs = throw "nixpkgs is not available to CI"; };

  # The same flake with a stand-in nixpkgs: store paths as strings (never
  # built) for the few packages the checks name, so the checks and
  # hydraJobs evaluate to .drv files here. NixOS images are not reachable.
  fakeStorePath = n: "${builtins.storeDir}/00000000000000000000000000000000-${n}";
  fakePkg = n: { outPath = fakeStorePath n; name = n; };
  stubPkgs = {
    callPackage = _fn: _args: fakePkg "photon-cluster";
    runCommand = n: _env: _script: fakePkg n;
    coreutils = fakePkg "coreutils";
    runtimeShell = "${fakeStorePath "bash"}/bin/bash";
    qemu_kvm = fakePkg "qemu";
    openssh = fakePkg "openssh";
    e2fsprogs = fakePkg "e2fsprogs";
    zstd = fakePkg "zstd";
  };
  stubNixpkgs = {
    outPath = fakeStorePath "nixpkgs";
    legacyPackages.${system} = stubPkgs;
    lib = {
      nixosSystem = _: throw "no NixOS in the pure tests";
      inherit (builtins) listToAttrs;
      concatStrings = builtins.concatStringsSep "";
      mapAttrsToList = f: a: map (n: f n a.${n}) (builtins.attrNames a);
    };
  };
  stubbed = (import ../../flake.nix).outputs { self = stubbed; nixpkgs = stubNixpkgs; };
  flakeLanes = [ "bench-storage" "fresh-matrix" "fresh-smoke" "provider-vm-reality-proof" ];

  # nix/package.nix with stand-ins for the few nixpkgs names its eval-time
  # Rust assertion touches (nothing is built; src and postInstall stay lazy).
  stubLib = {
    assertMsg = pred: msg: pred || throw msg;
    versionAtLeast = a: b: builtins.compareVersions a b >= 0;
  };
  packageWith = rustcVersion: import ../package.nix {
    lib = stubLib;
    rustPlatform.buildRustPackage = attrs: attrs;
    rustc.version = rustcVersion;
    pkg-config = null; openssl = null; zlib = null; makeWrapper = null;
    qemu_kvm = null; openssh = null; e2fsprogs = null; zstd = null; mmdebstrap = null;
  };
  pinnedRust = builtins.fromJSON (builtins.readFile ../nixpkgs-rust.json);

  # The NixOS worker role as a plain function of stand-in config and pkgs:
  # its nested-guest kit (a builtins derivation, instantiated, not built).
  worker = import ../roles/worker.nix {
    config = {
      photon = { cluster = reference; nodeName = "node04"; };
      boot.kernelPackages.kernel = fakePkg "linux";
      system.boot.loader.kernelFile = "bzImage";
    };
    pkgs = stubPkgs // { pkgsStatic.busybox = fakePkg "busybox"; stdenv.hostPlatform.system = system; };
  };
  workerKit = builtins.head (builtins.match "L\\+ /usr/local/share/photon/nested - - - - (.*)"
    (builtins.head worker.systemd.tmpfiles.rules));

  tests = {
    # --- nix/package.nix refuses a nixpkgs whose Rust is older than Cargo.toml's rust-version
    package-pinned-rust = { expr = (packageWith pinnedRust.rustc).pname; expected = "photon-cluster"; };
    package-old-rust-refused = { expr = throws (packageWith "1.79.0").pname; expected = true; };

    # --- the NixOS worker role carries the nested-guest kit, from the Debian image's init
    worker-nested-kit-linked = { expr = hasSuffix "-photon-nested-kit" workerKit; expected = true; };
    worker-nested-kit-inputs = {
      expr = let k = import ../nested-kit.nix { busybox = fakePkg "busybox"; kernel = "${fakeStorePath "linux"}/bzImage"; }; in
        [ k.outPath (builtins.baseNameOf k.init) k.kernel k.busybox ];
      expected = [ workerKit "init" "${fakeStorePath "linux"}/bzImage" "${fakeStorePath "busybox"}/bin/busybox" ];
    };
    worker-nested-kit-same-init = {
      expr = builtins.readFile (import ../nested-kit.nix { busybox = "/x"; kernel = "/k"; }).init;
      expected = builtins.readFile ../../images/nested/init;
    };

    # --- clusterFromToml on profiles/reference.toml
    reference-name = { expr = reference.name; expected = "reference"; };
    reference-nodes = { expr = reference.nodeNames; expected = [ "node01" "node02" "node03" "node04" "node05" "node06" ]; };
    reference-roles = {
      expr = reference.roles;
      expected = { control = [ "node01" "node02" "node03" ]; worker = [ "node04" "node05" ]; gateway = [ "node06" ]; };
    };
    reference-valid = { expr = reference.errors; expected = [ ]; };
    reference-domain = { expr = [ reference.domain reference.subnet ]; expected = [ "photon.test" "10.77.0.0/24" ]; };
    reference-node04 = {
      expr = { inherit (reference.byName.node04) role address memoryMiB dependsOn; };
      expected = { role = "worker"; address = "10.77.0.14"; memoryMiB = 1024; dependsOn = [ "node01" "node02" "node03" ]; };
    };
    reference-udp-forward = {
      expr = builtins.filter (f: f.proto == "udp") reference.byName.node01.forwards;
      expected = [{ name = "dns"; guest = 53; proto = "udp"; host = null; }];
    };
    reference-via-lib = { expr = lib.profiles.reference.nodeNames; expected = reference.nodeNames; };

    # --- profiles/reference-storage.toml
    storage-roles = {
      expr = storage.roles;
      expected = { storage = [ "storage-node01" "storage-node02" "storage-node03" "storage-node04" "storage-node05" ]; };
    };
    storage-suffix = { expr = storage.stateSuffix; expected = "storage"; };

    # --- validation of a broken definition
    bad-errors = {
      expr = bad.errors;
      expected = [
        "node[2].name: missing"
        "duplicate node name \"a\""
        "duplicate node address \"10.0.0.1\""
        "node a: unknown role \"wrker\" (expected one of: control, worker, gateway, storage)"
        "node a: depends_on names unknown node \"zz\""
      ];
    };
    bad-check-throws = { expr = throws (lib.checkCluster bad); expected = true; };
    reference-check-passes = { expr = (lib.checkCluster reference).name; expected = "reference"; };

    # --- laneFromToml on checks/smoke.toml
    smoke-name = { expr = smoke.name; expected = "smoke"; };
    smoke-layers = { expr = smoke.layerNames; expected = [ "image" "boot" "protocols" "replicated" "nested" "entrypoints" "auth" ]; };
    smoke-first-check = {
      expr = builtins.head smoke.checks;
      expected = { layer = "image"; name = "image"; kind = "image"; targets = null; };
    };
    smoke-valid-on-reference = { expr = lib.validateLane reference smoke; expected = [ ]; };
    smoke-invalid-on-storage = {
      expr = builtins.elem
        "layer protocols, check etcd-health: targets: target \"role:control\": cluster reference-storage has no control nodes"
        (lib.validateLane storage smoke);
      expected = true;
    };
    smoke-check-lane-throws-on-storage = { expr = throws (lib.checkLane storage smoke); expected = true; };

    # --- targets
    targets-role = { expr = lib.resolveTargets reference "role:worker"; expected = [ "node04" "node05" ]; };
    targets-all = { expr = builtins.length (lib.resolveTargets reference "all"); expected = 6; };
    targets-list-in-driver-order = {
      # like src/lane.rs expand_targets: item by item, each in cluster order, no repeats
      expr = lib.resolveTargets reference [ "node06" "role:control" "node01" ];
      expected = [ "node06" "node01" "node02" "node03" ];
    };
    targets-unknown-node = { expr = throws (lib.resolveTargets reference "node99"); expected = true; };
    targets-unknown-role = {
      expr = (lib.resolveTargetsChecked reference "role:database").errors;
      expected = [ "target \"role:database\": unknown role \"database\"" ];
    };
    lane-checks-per-node = {
      expr = let ids = map (c: c.id) (lib.laneChecks reference smoke); in
        map (id: builtins.elem id ids) [ "image" "etcd-health@node01" "etcd-health@node03" "web@node05" "etcd-members@node01" "gateway@node06" "inner-guest@node04" "etcd-members" "gateway" ];
      expected = [ true true true true true true true false false ];
    };
    lane-checks-single-target = {
      # one target node still names the node, as the driver does
      expr = builtins.filter (c: c.name == "etcd-members") (lib.laneChecks reference smoke);
      expected = [{ id = "etcd-members@node01"; layer = "replicated"; name = "etcd-members"; kind = "exec"; target = "node01"; }];
    };
    lane-checks-untargeted = {
      expr = builtins.head (lib.laneChecks reference smoke);
      expected = { id = "image"; layer = "image"; name = "image"; kind = "image"; target = null; };
    };
    lane-checks-unique = {
      expr = let ids = map (c: c.id) (lib.laneChecks reference smoke); in builtins.length ids == builtins.length (lib.util.unique ids);
      expected = true;
    };
    lane-members-not-read = {
      # members belong to the replicated_kv kind: the driver's to read, not validated here
      expr = lib.validateLane reference (lib.laneFromToml {
        lane.name = "t";
        layer = [{ name = "x"; check = [{ name = "kv"; kind = "replicated_kv"; targets = "node01"; members = [ "role:nothing" ]; }]; }];
      });
      expected = [ ];
    };
    lane-checks-count = { expr = builtins.length (lib.laneChecks reference smoke); expected = 56; };
    lane-nodes = { expr = lib.laneNodes reference smoke; expected = reference.nodeNames; };

    # --- mkClusterCheck: the derivation
    check-type = { expr = check.type; expected = "derivation"; };
    check-name = { expr = check.name; expected = "fresh-smoke"; };
    check-system = { expr = check.system; expected = system; };
    check-builder = { expr = check.builder; expected = "/bin/sh"; };
    check-args-shell = { expr = builtins.elemAt check.args 0; expected = "-c"; };
    check-args-name = { expr = builtins.elemAt check.args 2; expected = "fresh-smoke"; };
    check-args-run = {
      expr = builtins.genList (i: builtins.elemAt check.args (i + 3)) 6;
      expected = [ "--lane" "smoke" "--profile" "reference" "--image-dir" fakeImages ];
    };
    check-run-args = { expr = check.runArgs; expected = [ "--lane" "smoke" "--profile" "reference" "--image-dir" fakeImages ]; };
    check-script-runs-driver = {
      expr = builtins.any (a: builtins.match ".*\"\\$exe\" run --out \"\\$out\" \"\\$@\".*" a != null) check.args;
      expected = true;
    };
    check-features = { expr = check.requiredSystemFeatures; expected = [ "kvm" "nixos-test" ]; };
    check-meta-timeout = { expr = check.meta.timeout; expected = 3600 + 120 + 60; };
    check-timeout-env = { expr = check.timeout; expected = "3600"; };
    check-driver = { expr = check.driver; expected = fakeDriver; };
    check-not-kept = { expr = [ check.keepFailed (builtins.elem "--keep-failed" check.args) ]; expected = [ false false ]; };
    check-drv-path = {
      expr = hasSuffix ".drv" check.drvPath && hasPrefix (builtins.storeDir + "/") check.drvPath;
      expected = true;
    };
    check-out-path = { expr = hasPrefix (builtins.storeDir + "/") check.outPath && hasSuffix "-fresh-smoke" check.outPath; expected = true; };
    check-no-home = { expr = check ? HOME; expected = false; };

    kept-flag = { expr = builtins.elem "--keep-failed" kept.args; expected = true; };
    kept-impure = { expr = hasPair "--allow-impure" "/usr/bin" kept.args; expected = true; };
    kept-path = { expr = kept.PATH; expected = "/usr/bin"; };
    kept-timeout = { expr = [ kept.meta.timeout kept.timeout ]; expected = [ 780 "600" ]; };

    files-cluster = {
      expr = let i = builtins.length withFiles.runArgs; in
        hasPair "--cluster" (builtins.elemAt withFiles.runArgs 3) withFiles.runArgs
        && hasPrefix (builtins.storeDir + "/") (builtins.elemAt withFiles.runArgs 3)
        && hasSuffix "-reference.toml" (builtins.elemAt withFiles.runArgs 3);
      expected = true;
    };
    files-lane-file = {
      expr = [ (builtins.elemAt withFiles.runArgs 0) (hasSuffix "-smoke.toml" (builtins.elemAt withFiles.runArgs 1)) (builtins.elem "--lane" withFiles.runArgs) ];
      expected = [ "--lane-file" true false ];
    };

    path-package-bin = {
      expr = (mk { path = [ (builtins.toFile "qemu" "") ]; }).PATH;
      expected = "${builtins.toFile "qemu" ""}";
    };
    path-attrs-bin = {
      expr = hasSuffix "/bin" (mk { path = [ { outPath = builtins.toFile "pkg" ""; } ]; }).PATH;
      expected = true;
    };

    # --- driverInteractive
    interactive-type = { expr = check.driverInteractive.type; expected = "derivation"; };
    interactive-name = { expr = check.driverInteractive.name; expected = "fresh-smoke-driver-interactive"; };
    interactive-builder = { expr = check.driverInteractive.builder; expected = "/bin/sh"; };
    interactive-drv = { expr = hasSuffix ".drv" check.driverInteractive.drvPath; expected = true; };
    interactive-fresh-smoke = {
      expr = builtins.match ".*'--profile' 'reference' fresh-smoke '--lane' 'smoke'.*" check.driverInteractive.text != null;
      expected = true;
    };
    interactive-shebang = { expr = builtins.substring 0 10 check.driverInteractive.text; expected = "#!/bin/sh\n"; };
    interactive-main-program = { expr = check.driverInteractive.meta.mainProgram; expected = "fresh-smoke-driver-interactive"; };

    # --- refusals at eval time
    refuse-impure-images = { expr = throws (mk { images = "/srv/images"; }).drvPath; expected = true; };
    allow-impure-images = { expr = evaluates (mk { images = "/srv/images"; impurePaths = [ "/srv" ]; }).drvPath; expected = true; };
    refuse-impure-path = { expr = throws (mk { path = [ "/usr/bin" ]; }).drvPath; expected = true; };
    refuse-prefix-lookalike = { expr = throws (mk { images = "/srv2/images"; impurePaths = [ "/srv" ]; }).drvPath; expected = true; };
    refuse-lane-on-wrong-profile = { expr = throws (mk { profile = "reference-storage"; }).drvPath; expected = true; };
    validate-off = { expr = evaluates (mk { profile = "reference-storage"; validate = false; }).drvPath; expected = true; };
    unknown-lane-not-validated = { expr = hasPair "--lane" "no-such-lane" (mk { lane = "no-such-lane"; }).args; expected = true; };

    # --- the enforced timeout, sandbox-clean builders, substitution
    check-timeout-wrapper = {
      expr = builtins.match ".*\"\\$coreutils/timeout\" -s TERM -k \"\\$killAfter\" \"\\$\\(\\(timeout \\+ killAfter\\)\\)\" \"\\$exe\" --timeout \"\\$timeout\" run --out \"\\$out\" \"\\$@\".*" (builtins.elemAt check.args 1) != null;
      expected = true;
    };
    check-timeout-exit-codes = {
      expr = map (c: builtins.match ".*\n *${c}\\).*" (builtins.elemAt check.args 1) != null) [ "0" "124\\|137" "1" "2" "3" "130" ];
      expected = [ true true true true true true ];
    };
    check-kill-after = { expr = [ check.killAfter (mk { killAfter = 5; }).killAfter ]; expected = [ "120" "5" ]; };
    check-coreutils = { expr = check.coreutils; expected = "${fakeCoreutils}"; };
    check-coreutils-package = { expr = (mk { coreutils = { outPath = fakeCoreutils; }; }).coreutils; expected = "${fakeCoreutils}/bin"; };
    check-short-timeout = { expr = [ (mk { timeout = 5; }).timeout (mk { timeout = 5; }).meta.timeout ]; expected = [ "5" 185 ]; };
    check-no-timeout = { expr = [ (mk { timeout = 0; }).timeout ((mk { timeout = 0; }).meta ? timeout) ]; expected = [ "0" false ]; };
    refuse-negative-timeout = { expr = throws (mk { timeout = -1; }).drvPath; expected = true; };
    refuse-missing-coreutils = { expr = throws (mk { coreutils = null; }).drvPath; expected = true; };
    refuse-impure-coreutils = { expr = throws (mk { coreutils = "/usr/bin"; }).drvPath; expected = true; };
    allow-impure-coreutils = { expr = evaluates (mk { coreutils = "/usr/bin"; impurePaths = [ "/usr/bin" ]; }).drvPath; expected = true; };
    check-shell = { expr = [ (mk { shell = fakeShell; }).builder (mk { shell = fakeShell; }).driverInteractive.builder ]; expected = [ "${fakeShell}" "${fakeShell}" ]; };
    refuse-impure-shell = { expr = throws (mk { shell = "/usr/bin/bash"; }).drvPath; expected = true; };
    # No tool by /bin or /usr/bin in either builder script (the builder itself
    # is `shell`; /bin/sh only by default, the sandbox's own).
    builders-name-no-bin = {
      expr = map (script: builtins.match ".*[^a-zA-Z_$}](/usr)?/s?bin([/:\" ]|$).*" script)
        [ (builtins.elemAt check.args 1) (builtins.elemAt check.driverInteractive.args 1) ];
      expected = [ null null ];
    };
    interactive-coreutils = {
      expr = [ check.driverInteractive.coreutils check.driverInteractive.PATH ];
      expected = [ "${fakeCoreutils}" "" ];
    };
    interactive-absolute-tools = {
      expr = builtins.match ".*\"\\$coreutils/mkdir\" -p.*\"\\$coreutils/chmod\" 0555.*" (builtins.elemAt check.driverInteractive.args 1) != null;
      expected = true;
    };
    substitutes-allowed = { expr = [ (check ? allowSubstitutes) (check.driverInteractive ? allowSubstitutes) ]; expected = [ false false ]; };
    features-not-in-meta = { expr = check.meta ? requiredSystemFeatures; expected = false; };

    # --- description, passthru
    description-lane = { expr = check.meta.description; expected = "photon-cluster lane smoke on profile reference"; };
    description-lane-file = {
      expr = withFiles.meta.description;
      expected = "photon-cluster lane smoke from lane file smoke.toml on cluster reference.toml";
    };
    description-unvalidated-lane-file = {
      expr = (mk { laneFile = "/srv/lanes/mine.toml"; impurePaths = [ "/srv" ]; }).meta.description;
      expected = "photon-cluster lane mine.toml from lane file mine.toml on profile reference";
    };
    passthru-nodes = { expr = [ check.nodes check.passthru.nodes withFiles.nodes ]; expected = [ reference.nodeNames reference.nodeNames reference.nodeNames ]; };
    passthru-nodes-storage = { expr = (mk { profile = "reference-storage"; validate = false; }).nodes; expected = storage.nodeNames; };
    passthru-nodes-unreadable = {
      expr = let c = mk { cluster = fakeStorePath "cluster.toml"; }; in [ (evaluates c.drvPath) (throws c.nodes) ];
      expected = [ true true ];
    };
    passthru-driver-interactive = { expr = check.passthru.driverInteractive.name; expected = "fresh-smoke-driver-interactive"; };
    passthru-names = {
      expr = builtins.attrNames check.passthru;
      expected = [ "driverInteractive" "keepFailed" "lane" "nodes" "photonCluster" "runArgs" ];
    };
    passthru-not-in-drv = {
      # meta and passthru change nothing in the .drv
      expr = (check.overrideAttrs (old: { meta = old.meta // { maintainers = [ "x" ]; }; passthru = old.passthru // { extra = 1; }; })).drvPath;
      expected = check.drvPath;
    };
    passthru-lane-file = { expr = [ withFiles.lane withFiles.photonCluster.lane ]; expected = [ "smoke" "smoke" ]; };

    # --- overrides keep passthru and meta
    override-args = {
      expr = let c = check.override { timeout = 60; }; in
        [ c.timeout c.meta.timeout c.nodes c.driverInteractive.name (c.drvPath != check.drvPath) ];
      expected = [ "60" 240 reference.nodeNames "fresh-smoke-driver-interactive" true ];
    };
    override-function = { expr = (check.override (old: { name = old.name + "-again"; })).driverInteractive.name; expected = "fresh-smoke-again-driver-interactive"; };
    override-attrs = {
      expr = let c = check.overrideAttrs (old: { preferLocalBuild = true; nonce = old.name; }); in
        [ c.preferLocalBuild c.nonce c.nodes c.meta.description (c ? override) (c.drvPath != check.drvPath) ];
      expected = [ true "fresh-smoke" reference.nodeNames "photon-cluster lane smoke on profile reference" true true ];
    };
    override-attrs-set = { expr = (check.overrideAttrs { nonce = "1"; }).nonce; expected = "1"; };
    override-chain = {
      expr = let c = ((check.overrideAttrs (_: { nonce = "1"; })).override { timeout = 60; }).overrideAttrs (_: { preferLocalBuild = true; }); in
        [ c.nonce c.timeout c.preferLocalBuild c.passthru.nodes ];
      expected = [ "1" "60" true reference.nodeNames ];
    };
    override-keep-failed = {
      expr = let c = check.override { keepFailed = true; }; in [ c.keepFailed c.passthru.keepFailed (builtins.elem "--keep-failed" c.args) ];
      expected = [ true true true ];
    };

    # --- Hydra jobs
    hydra-job = {
      expr = let j = lib.mkHydraJob { name = "fresh-smoke"; driver = fakeDriver; images = fakeImages; coreutils = fakeCoreutils; }; in
        [ j.keepFailed j.keepFailed (builtins.elem "--keep-failed" j.args) ];
      expected = [ true true true ];
    };
    hydra-jobs-layout = {
      expr = let js = lib.mkHydraJobs { lanes = { fresh-smoke = "smoke"; }; driver = fakeDriver; images = fakeImages; coreutils = fakeCoreutils; }; in
        [ (builtins.attrNames js) (builtins.attrNames js.fresh-smoke) js.fresh-smoke.${system}.keepFailed ];
      expected = [ [ "fresh-smoke" ] [ system ] true ];
    };
    hydra-script-keeps-timeout = {
      # a timed-out lane with keepFailed keeps $out and marks it failed
      expr = builtins.match ".*124\\|137\\).*-n \"\\$keepFailed\".*nix-support/failed.*exit 0.*" (builtins.elemAt check.args 1) != null;
      expected = true;
    };
    hydra-script-products-and-metrics = {
      expr = map (re: builtins.match re (builtins.elemAt check.args 1) != null) [
        ".*for f in report.html report.md boot.json.*report artifacts \\$out\\$default.*nix-support/hydra-build-products.*"
        ".*lane-wall-time .* s.*nix-support/hydra-metrics.*"
      ];
      expected = [ true true ];
    };

    # --- the flake with a stand-in nixpkgs
    stub-flake-checks-fail-failed-lanes = {
      expr = map (n: let c = stubbed.checks.${system}.${n}; in [ c.keepFailed (builtins.elem "--keep-failed" c.args) ]) flakeLanes;
      expected = map (_: [ false false ]) flakeLanes;
    };
    stub-flake-hydra-jobs = {
      expr = builtins.attrNames stubbed.hydraJobs;
      expected = builtins.sort builtins.lessThan (flakeLanes ++ layeredJobs ++ [ "photon-cluster" ]);
    };
    # The layer graph: every layer restores the one ready output, runs its
    # layer only (keeping its output when it fails), and the lane assembles
    # them in the lane file's order.
    stub-flake-layered = {
      expr =
        let
          lane = stubbed.checks.${system}.layered-smoke;
          readyPath = lane.ready.outPath;
          layerOk = l: let d = lane.layers.${l}; in
            [ d.name d.keepFailed (builtins.elem readyPath d.args) (builtins.elem "--layer" d.args) (hasSuffix ".drv" d.drvPath) ];
          assembled = builtins.filter (a: builtins.elem a (map (l: lane.layers.${l}.outPath) smokeLayers)) lane.args;
        in
        [ lane.ready.name (builtins.elem "--ready" lane.ready.args) (map layerOk smokeLayers) (assembled == map (l: lane.layers.${l}.outPath) smokeLayers) lane.keepFailed ];
      expected = [ "reference-ready" true (map (l: [ "layered-smoke-layer-${l}" true true true true ]) smokeLayers) true false ];
    };
    # A layer's own lane file holds that layer alone, as TOML the driver reads.
    layer-lane-file = {
      expr =
        let
          raw = builtins.fromTOML (builtins.readFile ../../checks/smoke.toml);
          auth = builtins.head (builtins.filter (l: l.name == "auth") raw.layer);
        in
        builtins.fromTOML (lib.layerLaneToml raw auth) == { lane = raw.lane; layer = [ auth ]; };
      expected = true;
    };
    stub-flake-hydra-jobs-keep-failed = {
      expr = map (n: let j = stubbed.hydraJobs.${n}.${system}; in [ j.keepFailed (builtins.elem "--keep-failed" j.args) (hasSuffix ".drv" j.drvPath) ]) flakeLanes;
      expected = map (_: [ true true true ]) flakeLanes;
    };
    stub-flake-store-tools = {
      expr = let c = stubbed.checks.${system}.fresh-smoke; in
        [ c.builder c.coreutils c.driverInteractive.builder c.driverInteractive.coreutils c.PATH (hasSuffix ".drv" c.drvPath) ];
      expected = [
        "${fakeStorePath "bash"}/bin/bash"
        "${fakeStorePath "coreutils"}/bin"
        "${fakeStorePath "bash"}/bin/bash"
        "${fakeStorePath "coreutils"}/bin"
        "${fakeStorePath "qemu"}/bin:${fakeStorePath "openssh"}/bin:${fakeStorePath "e2fsprogs"}/bin:${fakeStorePath "zstd"}/bin"
        true
      ];
    };
    stub-flake-bench-timeout = {
      expr = let c = stubbed.checks.${system}.bench-storage; in [ c.timeout c.meta.timeout ];
      expected = [ "7200" (7200 + 120 + 60) ];
    };
    stub-flake-interactive-shebang = {
      expr = builtins.substring 0 (builtins.stringLength "#!${fakeStorePath "bash"}/bin/bash\n") stubbed.checks.${system}.fresh-smoke.driverInteractive.text;
      expected = "#!${fakeStorePath "bash"}/bin/bash\n";
    };

    # --- flake.nix wiring, evaluated lazily without nixpkgs
    flake-lib = { expr = flake.lib.profiles.reference.nodeNames; expected = reference.nodeNames; };
    flake-lib-mk = { expr = builtins.isFunction flake.lib.mkClusterCheck && builtins.isFunction flake.lib.mkNodeImages; expected = true; };
    flake-checks = {
      expr = builtins.attrNames flake.checks.x86_64-linux;
      expected = [ "bench-storage" "clippy" "fresh-matrix" "fresh-smoke" "layered-smoke" "provider-vm-reality-proof" "unit-tests" ];
    };
    flake-hydra-jobs = { expr = builtins.attrNames flake.hydraJobs; expected = builtins.sort builtins.lessThan (flakeLanes ++ layeredJobs ++ [ "photon-cluster" ]); };
    flake-apps = { expr = builtins.elem "cluster" (builtins.attrNames flake.apps.x86_64-linux); expected = true; };
    flake-packages = { expr = builtins.elem "default" (builtins.attrNames flake.packages.x86_64-linux); expected = true; };
    flake-modules = {
      expr = builtins.attrNames flake.nixosModules;
      expected = [ "photon-common" "photon-control" "photon-gateway" "photon-storage" "photon-worker" ];
    };

    # --- mkLayeredCheck: `after` continues from the earlier layer's end state
    layered-after = {
      expr =
        let
          g = lib.mkLayeredCheck { name = "la"; laneFile = ../../tests/fixtures/layered-after.toml; driver = fakeDriver; images = fakeImages; coreutils = fakeCoreutils; };
          has = l: a: builtins.elem a g.layers.${l}.args;
        in
        [ (has "mark" "--save-end") (has "continued" "${g.layers.mark}/end") (has "continued" "--save-end") (has "fresh" "${g.ready}") (has "continued" "${g.ready}") ];
      expected = [ true true false true false ];
    };

    # --- testScript: a Python script as the check's lane (docs/scripts.md)
    test-script-text = {
      expr = let c = mk { testScript = "start_all()\n"; python = fakePkg "python3"; }; in
        [ (hasPair "--lane-file" c.photonCluster.laneFile c.args) (builtins.elem "--lane" c.args)
          (hasSuffix "-fresh-smoke-lane.toml" c.photonCluster.laneFile) (hasSuffix "-fresh-smoke.py" c.photonCluster.testScript)
          c.lane c.meta.description c.PATH ];
      expected = [ true false true true "fresh-smoke" "photon-cluster test script fresh-smoke.py on profile reference" "${fakeStorePath "python3"}/bin" ];
    };
    test-script-file = {
      expr = let c = mk { name = "s"; testScript = ../../tests/fixtures/scripts/passes.py; python = fakePkg "python3"; path = [ "/usr/bin" ]; impurePaths = [ "/usr/bin" ]; }; in
        [ (hasSuffix "-passes.py" c.photonCluster.testScript) c.meta.description c.PATH c.photonCluster.python ];
      expected = [ true "photon-cluster test script passes.py on profile reference" "${fakeStorePath "python3"}/bin:/usr/bin" "${fakeStorePath "python3"}/bin" ];
    };
    test-script-package = {
      expr = (mk { testScript = fakePkg "t.py"; python = fakePkg "python3"; }).meta.description;
      expected = "photon-cluster test script t.py on profile reference";
    };
    test-script-interactive-path = {
      expr = builtins.elem "PATH='${fakeStorePath "python3"}/bin'\${PATH:+:$PATH}"
        (builtins.split "\n" (mk { testScript = "x"; python = fakePkg "python3"; }).driverInteractive.text);
      expected = true;
    };
    test-script-on-any-cluster = {
      expr = evaluates (mk { testScript = "x"; python = fakePkg "python3"; cluster = ../../tests/fixtures/one-node.toml; }).drvPath;
      expected = true;
    };
    test-script-needs-python = { expr = throws (mk { testScript = "x"; }).drvPath; expected = true; };
    test-script-not-with-lane-file = { expr = throws (mk { testScript = "x"; python = fakePkg "python3"; laneFile = ../../checks/smoke.toml; }).drvPath; expected = true; };
    test-script-not-with-lane = { expr = throws (mk { testScript = "x"; python = fakePkg "python3"; lane = "matrix"; }).drvPath; expected = true; };
    test-script-not-a-function = { expr = throws (mk { testScript = _: "x"; python = fakePkg "python3"; }).drvPath; expected = true; };
    test-script-deadline = {
      expr = map (d: evaluates (mk { testScript = "x"; python = fakePkg "python3"; testScriptDeadline = d; }).drvPath) [ 60 0 "60" ];
      expected = [ true false false ];
    };
    test-script-python-hermetic = {
      expr = map (i: evaluates (mk { testScript = "x"; python = "/opt/python/bin"; impurePaths = i; }).drvPath) [ [ ] [ "/opt/python" ] ];
      expected = [ false true ];
    };
    # A lane file whose script checks sit beside it: given as a path into
    # its copied directory ("${./dir}/lane.toml"), the scripts come along
    # (a bare ./dir/lane.toml copies the lane file alone).
    lane-file-in-its-directory-keeps-its-scripts = {
      expr = let c = mk { laneFile = "${../../tests/fixtures/scripts}/lane.toml"; cluster = ../../tests/fixtures/one-node.toml; python = fakePkg "python3"; }; in
        dirOf c.photonCluster.laneFile == "${../../tests/fixtures/scripts}";
      expected = true;
    };
    lane-file-script-checks-need-python = {
      expr = map (p: evaluates (mk ({ laneFile = ../../tests/fixtures/scripts/lane.toml; cluster = ../../tests/fixtures/one-node.toml; } // p)).drvPath)
        [ { } { python = fakePkg "python3"; } ];
      expected = [ false true ];
    };

    # --- mkClusterChecks
    many = {
      expr = let cs = lib.mkClusterChecks { lanes = { fresh-smoke = "smoke"; fresh-matrix = "matrix"; }; driver = fakeDriver; images = fakeImages; coreutils = fakeCoreutils; }; in
        [ (builtins.attrNames cs) cs.fresh-matrix.lane cs.fresh-smoke.name ];
      expected = [ [ "fresh-matrix" "fresh-smoke" ] "matrix" "fresh-smoke" ];
    };
  };

  results = builtins.mapAttrs (name: t: t // { ok = t.expr == t.expected; }) tests;
  failures = builtins.filter (r: !r.ok)
    (map (name: { inherit name; inherit (results.${name}) expected ok; actual = results.${name}.expr; }) (builtins.attrNames results));
in
{
  total = builtins.length (builtins.attrNames tests);
  passed = builtins.length (builtins.filter (n: results.${n}.ok) (builtins.attrNames results));
  failures = map (f: { inherit (f) name expected actual; }) failures;
  names = builtins.attrNames tests;
}
