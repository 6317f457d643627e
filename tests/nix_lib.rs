//! The builtins-only Nix library (nix/lib) evaluated with real Nix: its pure
//! tests (nix/lib/tests.nix), the check derivation CI builds
//! (nix/ci/check.nix) instantiated to a .drv, and every .nix file parsed.
//! Nothing is built and no VM boots. Needs Debian's nix-bin
//! (scripts/host-deps.sh installs it); without it these tests fail.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a Nix program from the repository root. Panics (never skips) when the
/// program is missing.
fn nix(program: &str, args: &[&str]) -> Output {
    match Command::new(program)
        .args(args)
        .current_dir(repo())
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "{program} not found on PATH: run scripts/host-deps.sh (it installs Debian's nix-bin)"
        ),
        Err(e) => panic!("{program}: {e}"),
    }
}

fn ok(what: &str, out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pc-nix-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// nix-instantiate of nix/ci/check.nix with a stand-in driver (Cargo.toml,
/// copied into the store, never run) and images outside the store.
fn instantiate_ci_check(images: &Path, extra: &[&str]) -> String {
    let driver = repo().join("Cargo.toml");
    let mut args = vec![
        "nix/ci/check.nix",
        "--arg",
        "driver",
        driver.to_str().unwrap(),
        "--argstr",
        "images",
        images.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let drv = ok(
        "nix-instantiate nix/ci/check.nix",
        &nix("nix-instantiate", &args),
    );
    drv.trim().to_string()
}

fn show_derivation(drv: &str) -> Value {
    let out = nix(
        "nix",
        &[
            "--extra-experimental-features",
            "nix-command",
            "show-derivation",
            drv,
        ],
    );
    let json: Value = serde_json::from_str(&ok("nix show-derivation", &out)).unwrap();
    json.get(drv)
        .unwrap_or_else(|| panic!("show-derivation has no entry for {drv}: {json}"))
        .clone()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn has_pair(args: &[String], a: &str, b: &str) -> bool {
    args.windows(2).any(|w| w[0] == a && w[1] == b)
}

#[test]
fn pure_library_tests_pass() {
    let out = nix(
        "nix-instantiate",
        &["--eval", "--strict", "--json", "nix/lib/tests.nix"],
    );
    let json: Value = serde_json::from_str(&ok("nix/lib/tests.nix", &out)).unwrap();
    let failures = json["failures"].as_array().unwrap();
    assert!(
        failures.is_empty(),
        "nix/lib/tests.nix failures:\n{}",
        serde_json::to_string_pretty(failures).unwrap()
    );
    let total = json["total"].as_u64().unwrap();
    assert_eq!(json["passed"].as_u64().unwrap(), total);
    assert!(total >= 120, "expected the full suite, ran {total} tests");
    let names = strings(&json["names"]);
    for name in [
        "check-builder",
        "check-features",
        "check-drv-path",
        "smoke-valid-on-reference",
        "interactive-drv",
        "check-timeout-wrapper",
        "substitutes-allowed",
        "features-not-in-meta",
        "description-lane-file",
        "passthru-nodes",
        "override-chain",
        "hydra-jobs-layout",
        "stub-flake-checks-fail-failed-lanes",
        "stub-flake-hydra-jobs-keep-failed",
        "builders-name-no-bin",
        "test-script-text",
        "test-script-needs-python",
        "lane-file-in-its-directory-keeps-its-scripts",
    ] {
        assert!(names.contains(&name.to_string()), "missing test {name}");
    }
}

#[test]
fn reference_profile_and_smoke_lane_read_with_builtins_from_toml() {
    let expr = "let l = import ./nix/lib { }; c = l.profiles.reference; \
                in { roles = c.roles; errors = c.errors ++ l.validateLane c l.lanes.smoke; \
                     layers = l.lanes.smoke.layerNames; }";
    let out = nix(
        "nix-instantiate",
        &["--eval", "--strict", "--json", "-E", expr],
    );
    let json: Value = serde_json::from_str(&ok("nix-instantiate --eval", &out)).unwrap();
    assert_eq!(
        json["roles"]["control"],
        serde_json::json!(["node01", "node02", "node03"])
    );
    assert_eq!(
        json["roles"]["worker"],
        serde_json::json!(["node04", "node05"])
    );
    assert_eq!(json["roles"]["gateway"], serde_json::json!(["node06"]));
    assert_eq!(json["errors"], serde_json::json!([]));
    assert_eq!(json["layers"][0], "image");
}

#[test]
fn ci_check_instantiates_to_a_drv_with_the_run_contract() {
    let images = temp("images");
    let drv = instantiate_ci_check(&images, &[]);
    assert!(
        drv.starts_with("/nix/store/") && drv.ends_with("-fresh-smoke.drv"),
        "not a .drv path: {drv}"
    );
    let d = show_derivation(&drv);
    assert_eq!(d["builder"], "/bin/sh");
    let args = strings(&d["args"]);
    assert_eq!(args[0], "-c");
    assert!(
        args[1].contains("run --out \"$out\""),
        "script: {}",
        args[1]
    );
    assert!(has_pair(&args, "--lane", "smoke"), "{args:?}");
    assert!(has_pair(&args, "--profile", "reference"), "{args:?}");
    assert!(
        has_pair(&args, "--image-dir", images.to_str().unwrap()),
        "{args:?}"
    );
    assert!(
        has_pair(&args, "--allow-impure", images.to_str().unwrap()),
        "images outside the store are declared impure: {args:?}"
    );
    assert!(has_pair(&args, "--allow-impure", "/usr/bin"), "{args:?}");
    assert!(!args.contains(&"--keep-failed".to_string()));
    let env = &d["env"];
    assert_eq!(env["requiredSystemFeatures"], "kvm nixos-test");
    assert_eq!(env["timeout"], "3600");
    assert_eq!(env["killAfter"], "120");
    assert_eq!(
        env["coreutils"], "/usr/bin",
        "CI's documented impure coreutils"
    );
    assert!(
        args[1].contains(
            r#""$coreutils/timeout" -s TERM -k "$killAfter" "$((timeout + killAfter))" "$exe" --timeout "$timeout" run"#
        ),
        "the driver enforces the timeout, coreutils' timeout backs it up: {}",
        args[1]
    );
    assert!(
        env.get("allowSubstitutes").is_none(),
        "substitution is allowed"
    );
    assert_eq!(env["lane"], "smoke");
    assert!(env.get("HOME").is_none(), "no HOME in the builder");
    let driver = env["driver"].as_str().unwrap();
    assert!(
        driver.starts_with("/nix/store/") && driver.ends_with("-Cargo.toml"),
        "the driver is copied into the store: {driver}"
    );
    let srcs = strings(&d["inputSrcs"]);
    assert!(srcs.contains(&driver.to_string()), "{srcs:?}");
    let _ = std::fs::remove_dir_all(&images);
}

#[test]
fn keep_failed_and_nonce_change_the_derivation() {
    let images = temp("images-kept");
    let plain = instantiate_ci_check(&images, &[]);
    let kept = instantiate_ci_check(&images, &["--arg", "keepFailed", "true"]);
    let nonce = instantiate_ci_check(&images, &["--argstr", "nonce", "1"]);
    assert_ne!(plain, kept);
    assert_ne!(plain, nonce);
    let args = strings(&show_derivation(&kept)["args"]);
    assert!(args.contains(&"--keep-failed".to_string()), "{args:?}");
    let _ = std::fs::remove_dir_all(&images);
}

#[test]
fn driver_interactive_instantiates() {
    let images = temp("images-interactive");
    let driver = repo().join("Cargo.toml");
    let out = nix(
        "nix-instantiate",
        &[
            "nix/ci/check.nix",
            "-A",
            "driverInteractive",
            "--arg",
            "driver",
            driver.to_str().unwrap(),
            "--argstr",
            "images",
            images.to_str().unwrap(),
        ],
    );
    let drv = ok("nix-instantiate -A driverInteractive", &out);
    let drv = drv.trim();
    assert!(
        drv.ends_with("-fresh-smoke-driver-interactive.drv"),
        "{drv}"
    );
    let d = show_derivation(drv);
    assert_eq!(d["builder"], "/bin/sh");
    let text = d["env"]["text"].as_str().unwrap();
    assert!(text.starts_with("#!/bin/sh\n"), "{text}");
    assert_eq!(d["env"]["coreutils"], "/usr/bin");
    assert_eq!(d["env"]["PATH"], "", "no PATH lookup, no /bin fallback");
    assert!(text.contains("fresh-smoke '--lane' 'smoke'"), "{text}");
    let _ = std::fs::remove_dir_all(&images);
}

#[test]
fn images_outside_the_store_are_refused_at_eval_unless_impure() {
    let expr = |impure: &str| {
        format!(
            "(import ./nix/lib {{ }}).mkClusterCheck {{ name = \"x\"; \
             driver = builtins.toFile \"photon-cluster\" \"\"; images = \"/srv/images\"; \
             coreutils = builtins.toFile \"coreutils\" \"\"; \
             impurePaths = [ {impure} ]; }}"
        )
    };
    let refused = nix("nix-instantiate", &["-E", &expr("")]);
    assert!(
        !refused.status.success(),
        "an impure image dir must be refused"
    );
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("images /srv/images is outside /nix/store") && err.contains("impurePaths"),
        "{err}"
    );
    let allowed = nix("nix-instantiate", &["-E", &expr("\"/srv\"")]);
    assert!(
        ok("impure images allowed", &allowed)
            .trim()
            .ends_with("-x.drv")
    );
}

/// A Nix string literal with this text.
fn nix_string(text: &str) -> String {
    let escaped = text
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('$', "\\$")
        .replace('\n', "\\n");
    format!("\"{escaped}\"")
}

/// nix-instantiate of mkClusterCheck with a test script: a stand-in driver
/// (Cargo.toml) and a stand-in python package (a derivation that is never
/// built), coreutils from /usr/bin as impure. `args` is Nix merged over the
/// defaults (`testScript`, `python = null;`, `laneFile`, ...).
fn instantiate_script_check(args: &str) -> Output {
    let expr = format!(
        r#"let
  lib = import ./nix/lib {{ }};
  python = derivation {{ name = "python3"; system = "x86_64-linux"; builder = "/bin/sh"; }};
in
lib.mkClusterCheck ({{
  name = "scripted";
  driver = ./Cargo.toml;
  images = builtins.toFile "images" "stand-in";
  coreutils = "/usr/bin";
  impurePaths = [ "/usr/bin" ];
  inherit python;
}} // {args})"#
    );
    nix("nix-instantiate", &["-E", &expr])
}

/// The check's .drv, its lane file (from `--lane-file` in its args) and
/// that lane parsed; the lane file is in the store (builtins.toFile wrote it
/// at instantiation).
fn script_check(args: &str) -> (Value, PathBuf, toml::Table) {
    let drv = ok(
        "nix-instantiate mkClusterCheck with testScript",
        &instantiate_script_check(args),
    );
    let drv = drv.trim();
    assert!(drv.ends_with("-scripted.drv"), "{drv}");
    let d = show_derivation(drv);
    let run_args = strings(&d["args"]);
    assert!(
        !run_args.contains(&"--lane".to_string()),
        "a script check runs its own lane file, not an embedded lane: {run_args:?}"
    );
    let lane_file = run_args
        .windows(2)
        .find(|w| w[0] == "--lane-file")
        .map(|w| PathBuf::from(&w[1]))
        .unwrap_or_else(|| panic!("no --lane-file: {run_args:?}"));
    assert!(
        lane_file.starts_with("/nix/store")
            && lane_file.to_string_lossy().ends_with("-scripted-lane.toml"),
        "{}",
        lane_file.display()
    );
    let srcs = strings(&d["inputSrcs"]);
    assert!(
        srcs.contains(&lane_file.to_string_lossy().into_owned()),
        "the lane file is an input of the check: {srcs:?}"
    );
    let text = std::fs::read_to_string(&lane_file).unwrap();
    let lane: toml::Table = text
        .parse()
        .unwrap_or_else(|e| panic!("{}: {e}\n{text}", lane_file.display()));
    (d, lane_file, lane)
}

/// The lane's one check (one layer `script`, one check), as script_lane in
/// src/cli/run.rs makes it for `photon-cluster script`.
fn only_script_check(lane: &toml::Table) -> toml::Table {
    let layers = lane["layer"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{lane:?}");
    assert_eq!(layers[0]["name"].as_str(), Some("script"));
    let checks = layers[0]["check"].as_array().unwrap();
    assert_eq!(checks.len(), 1, "{lane:?}");
    let check = checks[0].as_table().unwrap().clone();
    assert_eq!(check["kind"].as_str(), Some("script"), "{check:?}");
    check
}

/// The first entry of the driver's PATH is the stand-in python's bin/, and
/// the python derivation is an input of the check.
fn assert_python_first_on_path(d: &Value) -> Vec<String> {
    let path: Vec<String> = d["env"]["PATH"]
        .as_str()
        .unwrap()
        .split(':')
        .map(String::from)
        .collect();
    assert!(
        path[0].starts_with("/nix/store/") && path[0].ends_with("-python3/bin"),
        "python's bin/ first on the driver's PATH: {path:?}"
    );
    let inputs = d["inputDrvs"].as_object().unwrap();
    assert!(
        inputs.keys().any(|k| k.ends_with("-python3.drv")),
        "{inputs:?}"
    );
    path
}

/// The driver's own plan of the generated lane file: it reads it as the
/// lane of one script check.
fn driver_plans_script_lane(lane_file: &Path, id: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_photon-cluster"))
        .args(["plan", "--profile", "reference", "--json", "--lane-file"])
        .arg(lane_file)
        .current_dir(repo())
        .output()
        .unwrap();
    let plan: Value =
        serde_json::from_str(&ok("photon-cluster plan --lane-file <generated>", &out)).unwrap();
    assert_eq!(plan["lane"], "scripted", "{plan}");
    assert_eq!(
        plan["checks"],
        serde_json::json!([{
            "id": id, "kind": "script", "layer": "script", "target": null,
            "origin": format!("{}:9", lane_file.display()),
        }]),
        "{plan}"
    );
}

#[test]
fn test_script_text_is_written_into_the_store_as_the_lanes_one_check() {
    let script = "start_all()\n\nwith subtest(\"it's \\\"quoted\\\" ${not nix}\"):\n    solo.succeed(\"echo $HOME\")\n";
    let (d, lane_file, lane) = script_check(&format!("{{ testScript = {}; }}", nix_string(script)));
    assert_eq!(lane["lane"]["name"].as_str(), Some("scripted"));
    assert_eq!(
        lane["lane"]["description"].as_str(),
        Some("test script scripted.py")
    );
    let check = only_script_check(&lane);
    assert_eq!(check["name"].as_str(), Some("scripted"));
    assert_eq!(check["deadline"].as_integer(), Some(1800));
    let file = PathBuf::from(check["file"].as_str().unwrap());
    assert!(
        file.starts_with("/nix/store") && file.to_string_lossy().ends_with("-scripted.py"),
        "the script by absolute store path: {}",
        file.display()
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), script);
    let path = assert_python_first_on_path(&d);
    assert_eq!(path.len(), 1, "{path:?}");
    assert_eq!(d["env"]["lane"], "scripted");
    driver_plans_script_lane(&lane_file, "scripted");
}

#[test]
fn test_script_file_is_the_lanes_one_check() {
    let fixture = repo().join("tests/fixtures/scripts/passes.py");
    let (d, lane_file, lane) = script_check(&format!(
        "{{ testScript = {}; testScriptDeadline = 300; path = [ \"/usr/bin\" ]; }}",
        fixture.display()
    ));
    let check = only_script_check(&lane);
    assert_eq!(check["name"].as_str(), Some("passes"));
    assert_eq!(check["deadline"].as_integer(), Some(300));
    assert_eq!(
        lane["lane"]["description"].as_str(),
        Some("test script passes.py")
    );
    let file = PathBuf::from(check["file"].as_str().unwrap());
    assert!(
        file.starts_with("/nix/store") && file.to_string_lossy().ends_with("-passes.py"),
        "the file is copied into the store: {}",
        file.display()
    );
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        std::fs::read_to_string(&fixture).unwrap()
    );
    let path = assert_python_first_on_path(&d);
    assert_eq!(path[1..], ["/usr/bin".to_string()], "{path:?}");
    driver_plans_script_lane(&lane_file, "passes");
}

#[test]
fn test_script_without_python_or_with_another_lane_is_refused_at_eval() {
    let refused = |args: &str, says: &[&str]| {
        let out = instantiate_script_check(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args}: must be refused");
        for s in says {
            assert!(err.contains(s), "{args}: expected {s:?} in\n{err}");
        }
    };
    refused(
        "{ testScript = \"start_all()\"; python = null; }",
        &[
            "mkClusterCheck scripted: testScript needs Python 3",
            "pass python = pkgs.python3",
            "impurePaths",
        ],
    );
    refused(
        "{ testScript = \"start_all()\"; laneFile = ./checks/smoke.toml; }",
        &[
            "mkClusterCheck scripted: testScript and laneFile are both set",
            "kind = \"script\"",
        ],
    );
    refused(
        "{ testScript = \"start_all()\"; lane = \"matrix\"; }",
        &["testScript and lane = \"matrix\" are both set"],
    );
    refused(
        "{ testScript = \"start_all()\"; python = \"/opt/python/bin\"; }",
        &[
            "python /opt/python/bin is outside /nix/store",
            "impurePaths",
        ],
    );
    refused(
        "{ laneFile = ./tests/fixtures/scripts/lane.toml; cluster = ./tests/fixtures/one-node.toml; python = null; }",
        &["has script checks (passes), which need Python 3"],
    );
}

#[test]
fn every_nix_file_parses() {
    let mut files = Vec::new();
    fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, files);
            } else if p.extension().is_some_and(|x| x == "nix") {
                files.push(p);
            }
        }
    }
    walk(&repo().join("nix"), &mut files);
    files.push(repo().join("flake.nix"));
    files.push(repo().join("nix/test-cluster/flake.nix"));
    files.sort();
    files.dedup();
    assert!(files.len() > 20, "{files:?}");
    for f in &files {
        let out = nix("nix-instantiate", &["--parse", f.to_str().unwrap()]);
        ok(&format!("nix-instantiate --parse {}", f.display()), &out);
    }
}

/// The nixpkgs lock entry of ../shared/nixpkgs-pin.json (2026-04-30,
/// nixos-unstable), restated here so the test also runs where that file is
/// absent; when it is present, the locks must equal it too.
fn nixpkgs_pin() -> Value {
    serde_json::json!({
        "locked": {
            "lastModified": 1777578337,
            "narHash": "sha256-Ad49moKWeXtKBJNy2ebiTQUEgdLyvGmTeykAQ9xM+Z4=",
            "owner": "NixOS",
            "repo": "nixpkgs",
            "rev": "15f4ee454b1dce334612fa6843b3e05cf546efab",
            "type": "github"
        },
        "original": {
            "owner": "NixOS",
            "ref": "nixos-unstable",
            "repo": "nixpkgs",
            "type": "github"
        }
    })
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn flake_locks_pin_nixpkgs_from_the_shared_entry() {
    let pin = nixpkgs_pin();
    let shared = repo().join("../shared/nixpkgs-pin.json");
    if shared.is_file() {
        let shared = read_json(&shared);
        assert_eq!(shared["locked"], pin["locked"], "{}", shared);
        assert_eq!(shared["original"], pin["original"], "{}", shared);
    }
    for lock in ["flake.lock", "nix/test-cluster/flake.lock"] {
        let json = read_json(&repo().join(lock));
        // A version 7 flake lock: a root node whose inputs name existing nodes.
        assert_eq!(json["version"], 7, "{lock}");
        assert_eq!(json["root"], "root", "{lock}");
        let nodes = json["nodes"].as_object().unwrap();
        let root_inputs = nodes["root"]["inputs"].as_object().unwrap();
        assert_eq!(root_inputs["nixpkgs"], "nixpkgs", "{lock}");
        for (input, node) in root_inputs {
            let node = node.as_str().unwrap_or_else(|| panic!("{lock}: {input}"));
            assert!(nodes.contains_key(node), "{lock}: input {input} -> {node}");
        }
        // The nixpkgs node is the pin, exactly.
        assert_eq!(
            serde_json::Value::Object(nodes["nixpkgs"].as_object().unwrap().clone()),
            pin,
            "{lock}"
        );
    }
    // The flakes ask for what the lock's `original` records, so Nix does not
    // try to re-lock (and fetch) nixpkgs.
    for flake in ["flake.nix", "nix/test-cluster/flake.nix"] {
        let text = std::fs::read_to_string(repo().join(flake)).unwrap();
        assert!(
            text.contains("nixpkgs.url = \"github:NixOS/nixpkgs/nixos-unstable\";"),
            "{flake} must ask for github:NixOS/nixpkgs/nixos-unstable"
        );
    }
    // Real Nix reads the top-level lock as up to date (it would otherwise
    // re-lock, which needs the network) and reports the pin.
    let out = nix(
        "nix",
        &[
            "--extra-experimental-features",
            "nix-command flakes",
            "flake",
            "metadata",
            "--json",
            "--no-update-lock-file",
            ".",
        ],
    );
    let json: Value = serde_json::from_str(&ok("nix flake metadata", &out)).unwrap();
    assert_eq!(json["locks"]["nodes"]["nixpkgs"], pin);
}

#[test]
fn flake_outputs_evaluate_without_fetching_nixpkgs() {
    // The flake's nixpkgs input is locked but cannot be fetched in CI; the
    // library and the output names must not need it (lazy inputs).
    let out = nix(
        "nix",
        &[
            "--extra-experimental-features",
            "nix-command flakes",
            "eval",
            "--json",
            ".#lib.profiles.reference.roles",
        ],
    );
    let json: Value = serde_json::from_str(&ok("nix eval .#lib", &out)).unwrap();
    assert_eq!(json["gateway"], serde_json::json!(["node06"]));
    let out = nix(
        "nix",
        &[
            "--extra-experimental-features",
            "nix-command flakes",
            "eval",
            "--json",
            ".#checks.x86_64-linux",
            "--apply",
            "builtins.attrNames",
        ],
    );
    let json: Value = serde_json::from_str(&ok("nix eval .#checks", &out)).unwrap();
    for check in [
        "fresh-smoke",
        "fresh-matrix",
        "bench-storage",
        "provider-vm-reality-proof",
        "layered-smoke",
        "unit-tests",
        "clippy",
    ] {
        assert!(
            json.as_array().unwrap().iter().any(|c| c == check),
            "{check} missing from {json}"
        );
    }
    // Hydra gets the same lanes (with keepFailed, nix/lib/tests.nix checks
    // that with a stand-in nixpkgs) and the package.
    let out = nix(
        "nix",
        &[
            "--extra-experimental-features",
            "nix-command flakes",
            "eval",
            "--json",
            ".#hydraJobs",
            "--apply",
            "builtins.attrNames",
        ],
    );
    let json: Value = serde_json::from_str(&ok("nix eval .#hydraJobs", &out)).unwrap();
    assert_eq!(
        json,
        serde_json::json!([
            "bench-storage",
            "fresh-matrix",
            "fresh-smoke",
            "layered-smoke",
            "layered-smoke-layer-auth",
            "layered-smoke-layer-boot",
            "layered-smoke-layer-entrypoints",
            "layered-smoke-layer-image",
            "layered-smoke-layer-nested",
            "layered-smoke-layer-protocols",
            "layered-smoke-layer-replicated",
            "photon-cluster",
            "provider-vm-reality-proof",
            "reference-ready"
        ])
    );
}

/// nix-build with the options CI uses (root builds, the check's system
/// features, no binary cache to ask); `sandbox` chooses the sandbox, with no
/// fallback to an unsandboxed build and no /bin/sh provided inside it.
/// Returns the output and the store path it printed (on success).
fn nix_build(args: &[&str], sandbox: bool) -> (Output, Option<PathBuf>) {
    let mut all: Vec<&str> = args.to_vec();
    all.extend([
        "--no-out-link",
        "--option",
        "build-users-group",
        "",
        "--option",
        "system-features",
        "kvm nixos-test benchmark big-parallel",
        "--option",
        "substituters",
        "",
        "--option",
        "sandbox",
        if sandbox { "true" } else { "false" },
        "--option",
        "sandbox-fallback",
        "false",
        "--option",
        "sandbox-paths",
        "",
    ]);
    let out = nix("nix-build", &all);
    let path = out
        .status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    (out, path)
}

fn nonce() -> String {
    format!("{:?}", std::time::SystemTime::now())
}

/// Stand-in for `photon-cluster run` (a /bin/sh script, run with the sandbox
/// off): `--pass` writes a passed lane's artifacts and exits 0; otherwise it
/// sleeps until TERM, then writes its artifacts as the driver does when
/// interrupted and exits 130; `--ignore-term` ignores TERM (only KILL stops
/// it). Its sleep has an odd length so a test can look for leftovers.
const FAKE_DRIVER: &str = r#"#!/bin/sh
out= keep= mode=sleep
while [ $# -gt 0 ]; do
  case $1 in
    --out) out=$2; shift ;;
    --keep-failed) keep=1 ;;
    --pass) mode=pass ;;
    --ignore-term) mode=ignore ;;
  esac
  shift
done
mkdir -p "$out/nix-support"
products() { : > "$out/report.md"; printf 'report markdown %s/report.md\nfile result-json %s/result.json\n' "$out" "$out" > "$out/nix-support/hydra-build-products"; }
if [ $mode = pass ]; then echo '{"status":"pass"}' > "$out/result.json"; products; exit 0; fi
on_term() { echo '{"status":"interrupted"}' > "$out/result.json"; products; if [ -n "$keep" ]; then : > "$out/nix-support/failed"; fi; exit 130; }
if [ $mode = ignore ]; then trap '' TERM; else trap on_term TERM; fi
sleep 613 &
wait $!
"#;

/// Live processes whose command line is `sleep 613` (the fake driver's).
fn fake_sleeps() -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .filter(|c| c == b"sleep\x00613\x00")
        .count()
}

#[test]
fn check_builder_enforces_the_timeout_and_annotates_for_hydra() {
    let dir = temp("timeout");
    let driver = dir.join("photon-cluster");
    std::fs::write(&driver, FAKE_DRIVER).unwrap();
    std::fs::set_permissions(&driver, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let build = |name: &str, extra: &[&str]| {
        let n = nonce();
        let mut args = vec![
            "nix/ci/check.nix",
            "--arg",
            "driver",
            driver.to_str().unwrap(),
            "--argstr",
            "images",
            images.to_str().unwrap(),
            "--argstr",
            "name",
            name,
            "--arg",
            "timeout",
            "2",
            "--arg",
            "killAfter",
            "3",
            "--argstr",
            "nonce",
            &n,
        ];
        args.extend_from_slice(extra);
        let started = std::time::Instant::now();
        let (out, path) = nix_build(&args, false);
        eprintln!(
            "{name}: {:?} after {:?}\n{}",
            out.status,
            started.elapsed(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "{name} took {:?}",
            started.elapsed()
        );
        (out, path)
    };
    let read =
        |p: &Path| std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));

    // A lane that passes: the whole output is a browsable Hydra product, and
    // the builder's metrics are written.
    let (out, path) = build("t-pass", &["--arg", "extraArgs", "[ \"--pass\" ]"]);
    let o = path.unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    let products = read(&o.join("nix-support/hydra-build-products"));
    assert!(
        products.contains(&format!("report markdown {}/report.md", o.display())),
        "{products}"
    );
    assert!(
        products.contains(&format!("report artifacts {} report.md", o.display())),
        "{products}"
    );
    let metrics = read(&o.join("nix-support/hydra-metrics"));
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("lane-wall-time ") && l.ends_with(" s")),
        "{metrics}"
    );
    assert!(
        metrics.lines().any(|l| l == "lane-timed-out 0"),
        "{metrics}"
    );
    assert!(!o.join("nix-support/failed").exists());

    // A lane that runs past the timeout: TERM, the driver writes its
    // artifacts and stops, the build fails with timeout's 124.
    let (out, path) = build("t-timeout", &[]);
    assert!(
        !out.status.success() && path.is_none(),
        "a timed-out lane fails the build"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TIMED OUT after 2s (exit 124)"), "{err}");

    // The same for Hydra (keepFailed): the evidence is the output, marked failed.
    let (out, path) = build("t-timeout-kept", &["--arg", "keepFailed", "true"]);
    let o = path.unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(read(&o.join("nix-support/failed")).trim(), "timeout");
    assert!(read(&o.join("result.json")).contains("interrupted"));
    let metrics = read(&o.join("nix-support/hydra-metrics"));
    assert!(
        metrics.lines().any(|l| l == "lane-timed-out 1"),
        "{metrics}"
    );
    assert!(
        read(&o.join("nix-support/hydra-build-products"))
            .contains(&format!("report artifacts {} report.md", o.display()))
    );

    // A driver that ignores TERM is killed killAfter seconds later (137),
    // and nothing it started is left running.
    let (out, _) = build(
        "t-ignore-term",
        &["--arg", "extraArgs", "[ \"--ignore-term\" ]"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("did not stop within 3s of coreutils' TERM: killed (exit 137)"),
        "{err}"
    );
    assert_eq!(
        fake_sleeps(),
        0,
        "the fake driver's sleep outlived the build"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Stand-in for `photon-cluster run` with a test script (a /bin/sh script,
/// run with the sandbox off): reads the script's file from the lane file it
/// is given and runs it with the `python3` found on PATH, then writes a
/// passed lane's artifacts with the script's output and the lane file.
const FAKE_SCRIPT_DRIVER: &str = r#"#!/bin/sh
out= lane=
while [ $# -gt 0 ]; do
  case $1 in
    --out) out=$2; shift ;;
    --lane-file) lane=$2; shift ;;
  esac
  shift
done
mkdir -p "$out/nix-support" || exit 3
script=$(sed -n 's/^file = "\(.*\)"$/\1/p' "$lane")
python3 "$script" > "$out/script-output.txt" || exit 1
cp "$lane" "$out/lane.toml"
echo '{"status":"pass"}' > "$out/result.json"
printf 'report markdown %s/report.md\n' "$out" > "$out/nix-support/hydra-build-products"
"#;

/// A test script check built for real (nix/ci/check.nix, the sandbox off):
/// the driver finds the given python first on its PATH and runs the script
/// from the generated lane. The script's text interpolates a derivation's
/// output, which builtins.toFile cannot write: the script and its lane are
/// then written by derivations of their own, built first.
#[test]
fn a_test_script_check_builds_and_runs_the_script_with_the_given_python() {
    let dir = temp("test-script-build");
    let driver = dir.join("photon-cluster");
    std::fs::write(&driver, FAKE_SCRIPT_DRIVER).unwrap();
    std::fs::set_permissions(&driver, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    // python3 here: a wrapper that says it ran, then the host's Python.
    let python = dir.join("python");
    std::fs::create_dir_all(&python).unwrap();
    let host_python = ["/usr/bin/python3", "/bin/python3"]
        .iter()
        .find(|p| Path::new(p).is_file())
        .expect("no /usr/bin/python3");
    std::fs::write(
        python.join("python3"),
        format!("#!/bin/sh\necho 'the given python3'\nexec {host_python} \"$@\"\n"),
    )
    .unwrap();
    std::fs::set_permissions(
        python.join("python3"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let n = nonce();
    let expr = format!(
        r#"let
  marker = derivation {{
    name = "marker";
    system = "x86_64-linux";
    builder = "/bin/sh";
    args = [ "-c" "echo built before the script > $out" ];
    nonce = {nonce};
  }};
in
import {repo}/nix/ci/check.nix {{
  name = "t-script";
  driver = {driver};
  images = "{images}";
  python = "{python}";
  testScript = ''
    print("hello from the test script")
    print(open("${{marker}}").read().strip())
  '';
  nonce = {nonce};
}}"#,
        repo = repo().display(),
        driver = driver.display(),
        images = images.display(),
        python = python.display(),
        nonce = nix_string(&n),
    );
    let file = dir.join("script-check.nix");
    std::fs::write(&file, expr).unwrap();
    let (out, path) = nix_build(&[file.to_str().unwrap()], false);
    let o = path.unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    let said = std::fs::read_to_string(o.join("script-output.txt")).unwrap();
    assert_eq!(
        said,
        "the given python3\nhello from the test script\nbuilt before the script\n"
    );
    let lane = std::fs::read_to_string(o.join("lane.toml")).unwrap();
    assert!(lane.contains("kind = \"script\""), "{lane}");
    assert!(lane.contains("name = \"t-script\""), "{lane}");
    assert!(
        o.join("nix-support/hydra-build-products").is_file(),
        "annotated like any check"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ci_driver_interactive_builds_with_coreutils_only() {
    let images = temp("images-interactive-build");
    let driver = repo().join("Cargo.toml");
    let n = nonce();
    let (out, path) = nix_build(
        &[
            "nix/ci/check.nix",
            "-A",
            "driverInteractive",
            "--arg",
            "driver",
            driver.to_str().unwrap(),
            "--argstr",
            "images",
            images.to_str().unwrap(),
            "--argstr",
            "name",
            &format!("interactive-{}", n.len()),
        ],
        false,
    );
    let o = path.unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    let bin = std::fs::read_dir(o.join("bin"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&bin).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o555, "{}", bin.display());
    assert!(
        std::fs::read_to_string(&bin)
            .unwrap()
            .starts_with("#!/bin/sh\n")
    );
    let _ = std::fs::remove_dir_all(&images);
}

/// A static busybox, copied into the store with the applets the builders
/// use: the stand-in for nixpkgs' shell and coreutils in a real sandbox.
fn busybox_tools(dir: &Path) -> PathBuf {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("no busybox: install Debian's busybox-static (a static busybox runs in the Nix sandbox)");
    let tools = dir.join("tools");
    std::fs::create_dir_all(&tools).unwrap();
    std::fs::copy(&busybox, tools.join("busybox")).unwrap();
    for applet in ["sh", "mkdir", "chmod", "date", "timeout", "printf", "cat"] {
        std::os::unix::fs::symlink("busybox", tools.join(applet)).unwrap();
    }
    tools
}

#[test]
fn builders_run_in_a_real_sandbox_with_store_tools_only() {
    // Nix's sandbox with no sandbox-paths: no /bin/sh, no /usr/bin. The shell
    // and the coreutils are a static busybox in the store, the driver a
    // script built inside the sandbox. Both builders must succeed there.
    let dir = temp("sandbox");
    let tools = busybox_tools(&dir);
    let expr = format!(
        r#"
let
  lib = import {repo}/nix/lib {{ }};
  tools = builtins.path {{ path = {tools}; name = "busybox-tools"; }};
  driver = derivation {{
    name = "fake-photon-cluster";
    system = "x86_64-linux";
    builder = "${{tools}}/sh";
    args = [ "-c" ''
      ${{tools}}/mkdir -p $out/bin
      ${{tools}}/printf '%s\n' '#!${{tools}}/sh' \
        'while [ $# -gt 0 ]; do if [ "$1" = --out ]; then out=$2; fi; shift; done' \
        'if [ -e /usr/bin ] || [ -e /bin/sh ]; then echo "host paths visible" >&2; exit 3; fi' \
        '${{tools}}/mkdir -p $out/nix-support' \
        'echo "{{\"status\":\"pass\"}}" > $out/result.json' \
        'echo "report markdown $out/report.md" > $out/nix-support/hydra-build-products' \
        > $out/bin/photon-cluster
      ${{tools}}/chmod 0555 $out/bin/photon-cluster
    '' ];
  }};
  check = lib.mkClusterCheck {{
    name = "sandboxed";
    inherit driver;
    images = builtins.toFile "images" "stand-in";
    coreutils = tools;
    shell = "${{tools}}/sh";
    env.nonce = "{nonce}";
  }};
in {{ inherit check; interactive = check.driverInteractive; }}
"#,
        repo = repo().display(),
        tools = tools.display(),
        nonce = nonce()
    );
    let file = dir.join("sandboxed.nix");
    std::fs::write(&file, expr).unwrap();
    let file = file.to_str().unwrap();
    for attr in ["check", "interactive"] {
        let (out, path) = nix_build(&[file, "-A", attr], true);
        let o = path.unwrap_or_else(|| {
            panic!(
                "{attr} in the sandbox:\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        if attr == "check" {
            let products =
                std::fs::read_to_string(o.join("nix-support/hydra-build-products")).unwrap();
            assert!(products.contains("report artifacts"), "{products}");
        } else {
            assert!(o.join("bin/sandboxed-driver-interactive").is_file());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The check ids (with layer and target) nix/lib gives each lane file
/// (checks/*.toml) against the profile the driver runs it on, and the
/// driver's own plan of the same lane, `photon-cluster plan --profile ...
/// --lane ... --json`, must be the same list: `name@node` for each node a
/// check targets, `name` for a check without targets. A file
/// `<lane>.<profile>.toml` is the lane's own form for that profile.
#[test]
fn lane_check_ids_equal_the_drivers_plan() {
    let mut files: Vec<String> = std::fs::read_dir(repo().join("checks"))
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            (p.extension().is_some_and(|x| x == "toml"))
                .then(|| p.file_stem().unwrap().to_string_lossy().into_owned())
        })
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    let lanes = photon_cluster::lane::LANES;
    let plans: Vec<(String, String, &str)> = files
        .iter()
        .map(|file| match file.split_once('.') {
            Some((lane, profile)) => (file.clone(), lane.to_string(), profile),
            None => {
                let profile = photon_cluster::lane::default_profile(file);
                (file.clone(), file.clone(), profile)
            }
        })
        .collect();
    assert!(
        plans
            .iter()
            .all(|(_, lane, _)| lanes.iter().any(|(n, _)| n == lane)),
        "{plans:?}"
    );
    let project = |checks: &Value| -> Vec<(String, String, Value)> {
        checks
            .as_array()
            .unwrap_or_else(|| panic!("not a list of checks: {checks}"))
            .iter()
            .map(|c| {
                (
                    c["id"].as_str().unwrap().to_string(),
                    c["layer"].as_str().unwrap().to_string(),
                    c["target"].clone(),
                )
            })
            .collect()
    };
    for (file, lane, profile) in &plans {
        let expr = format!(
            "let l = import ./nix/lib {{ }}; in \
             l.laneChecks (l.clusterFromToml ./profiles/{profile}.toml) (l.laneFromToml ./checks/{file}.toml)"
        );
        let out = nix(
            "nix-instantiate",
            &["--eval", "--strict", "--json", "-E", &expr],
        );
        let from_nix: Value =
            serde_json::from_str(&ok(&format!("nix/lib laneChecks {lane}"), &out)).unwrap();

        let out = Command::new(env!("CARGO_BIN_EXE_photon-cluster"))
            .args(["plan", "--profile", profile])
            .args(["--lane", lane, "--json"])
            .current_dir(repo())
            .output()
            .unwrap();
        let plan: Value = serde_json::from_str(&ok(
            &format!("photon-cluster plan --profile {profile} --lane {lane} --json"),
            &out,
        ))
        .unwrap_or_else(|e| panic!("plan --json of {lane} is not JSON: {e}"));
        assert_eq!(plan["lane"], lane.as_str(), "{plan}");

        let (nix_checks, driver_checks) = (project(&from_nix), project(&plan["checks"]));
        let ids = |c: &[(String, String, Value)]| c.iter().map(|c| c.0.clone()).collect::<Vec<_>>();
        assert_eq!(
            ids(&nix_checks),
            ids(&driver_checks),
            "lane {lane}: nix/lib's check ids differ from the driver's plan"
        );
        assert_eq!(
            nix_checks, driver_checks,
            "lane {lane}: layer or target differs"
        );
    }
}

/// The NixOS worker role's nested-guest kit (nix/nested-kit.nix), built for
/// real in the sandbox from the same init as the Debian image's, with
/// Debian's static busybox and the reference image's kernel (`photon-cluster
/// build`, cached by recipe): then booted under QEMU on the host, where its
/// init must print the marker the `nested` check waits for. QEMU also gets
/// the store share a store-booted NixOS node gets (`-virtfs`, read-only):
/// this kernel has no 9p, so that proves QEMU takes the option as the
/// driver writes it, not that a guest mounts it.
#[test]
fn the_nested_kit_builds_in_the_sandbox_and_boots() {
    let dir = temp("nested-kit");
    let bin = dir.join("busybox/bin");
    std::fs::create_dir_all(&bin).unwrap();
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("no busybox: install Debian's busybox-static");
    std::fs::copy(&busybox, bin.join("busybox")).unwrap();
    let state = std::env::var_os("PHOTON_TEST_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/e2e-state"));
    let built = Command::new(env!("CARGO_BIN_EXE_photon-cluster"))
        .arg("--state-dir")
        .arg(&state)
        .arg("build")
        .output()
        .unwrap();
    let said = ok("photon-cluster build", &built);
    let kernel = said
        .lines()
        .find_map(|l| l.strip_prefix("kernel"))
        .map(|k| k.trim().to_string())
        .expect("build names the kernel");
    let expr = format!(
        r#"import {repo}/nix/nested-kit.nix {{
  busybox = builtins.path {{ path = {bb}; name = "busybox-static"; }};
  kernel = builtins.path {{ path = {kernel}; name = "vmlinuz"; }};
}}"#,
        repo = repo().display(),
        bb = dir.join("busybox").display(),
    );
    let file = dir.join("kit.nix");
    std::fs::write(&file, expr).unwrap();
    let (out, path) = nix_build(&[file.to_str().unwrap()], true);
    let kit = path.unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    assert!(kit.join("vmlinuz").is_file() && kit.join("initramfs.gz").is_file());
    let boot = Command::new("timeout")
        .arg("180")
        .arg("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", "256", "-no-reboot"])
        .args(["-nodefaults", "-serial", "stdio", "-display", "none"])
        .arg("-virtfs")
        .arg(photon_cluster::machine::cmdline::store_share(
            kit.parent().unwrap(),
        ))
        .arg("-kernel")
        .arg(kit.join("vmlinuz"))
        .arg("-initrd")
        .arg(kit.join("initramfs.gz"))
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .output()
        .unwrap();
    let console = String::from_utf8_lossy(&boot.stdout);
    assert!(
        console.contains("PHOTON-NESTED-GUEST-OK 1 cpu"),
        "the kit's init ran: {console}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
