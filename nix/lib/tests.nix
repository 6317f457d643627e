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

  # Stand-ins: store paths made with builtins.toFile, never built or run.
  fakeDriver = builtins.toFile "photon-cluster" "#!/bin/sh\nexit 3\n";
  fakeImages = builtins.toFile "images" "stand-in for a directory with vmlinuz, initrd.img, rootfs.img\n";

  mk = args: lib.mkClusterCheck ({ name = "fresh-smoke"; driver = fakeDriver; images = fakeImages; } // args);
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
    qemu_kvm = null; openssh = null; e2fsprogs = null; mmdebstrap = null;
  };
  pinnedRust = builtins.fromJSON (builtins.readFile ../nixpkgs-rust.json);

  tests = {
    # --- nix/package.nix refuses a nixpkgs whose Rust is older than Cargo.toml's rust-version
    package-pinned-rust = { expr = (packageWith pinnedRust.rustc).pname; expected = "photon-cluster"; };
    package-old-rust-refused = { expr = throws (packageWith "1.79.0").pname; expected = true; };

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
      expected = { layer = "image"; name = "image"; kind = "image"; targets = null; members = null; deadline = 30; };
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
    targets-list-in-cluster-order = {
      expr = lib.resolveTargets reference [ "node06" "role:control" "node01" ];
      expected = [ "node01" "node02" "node03" "node06" ];
    };
    targets-unknown-node = { expr = throws (lib.resolveTargets reference "node99"); expected = true; };
    targets-unknown-role = {
      expr = (lib.resolveTargetsChecked reference "role:database").errors;
      expected = [ "target \"role:database\": unknown role \"database\"" ];
    };
    lane-checks-per-node = {
      expr = let ids = map (c: c.id) (lib.laneChecks reference smoke); in
        map (id: builtins.elem id ids) [ "image" "etcd-health@node01" "etcd-health@node03" "web@node05" "etcd-members" "gateway" "inner-guest@node04" ];
      expected = [ true true true true true true true ];
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
    check-meta-timeout = { expr = check.meta.timeout; expected = 3600; };
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
    kept-timeout = { expr = [ kept.meta.timeout kept.timeout ]; expected = [ 600 "600" ]; };

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

    # --- flake.nix wiring, evaluated lazily without nixpkgs
    flake-lib = { expr = flake.lib.profiles.reference.nodeNames; expected = reference.nodeNames; };
    flake-lib-mk = { expr = builtins.isFunction flake.lib.mkClusterCheck && builtins.isFunction flake.lib.mkNodeImages; expected = true; };
    flake-checks = {
      expr = builtins.attrNames flake.checks.x86_64-linux;
      expected = [ "bench-storage" "clippy" "fresh-matrix" "fresh-smoke" "provider-vm-reality-proof" "unit-tests" ];
    };
    flake-apps = { expr = builtins.elem "cluster" (builtins.attrNames flake.apps.x86_64-linux); expected = true; };
    flake-packages = { expr = builtins.elem "default" (builtins.attrNames flake.packages.x86_64-linux); expected = true; };
    flake-modules = {
      expr = builtins.attrNames flake.nixosModules;
      expected = [ "photon-common" "photon-control" "photon-gateway" "photon-storage" "photon-worker" ];
    };

    # --- mkClusterChecks
    many = {
      expr = let cs = lib.mkClusterChecks { lanes = { fresh-smoke = "smoke"; fresh-matrix = "matrix"; }; driver = fakeDriver; images = fakeImages; }; in
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
