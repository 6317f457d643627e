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
    assert!(total >= 60, "expected the full suite, ran {total} tests");
    let names = strings(&json["names"]);
    for name in [
        "check-builder",
        "check-features",
        "check-drv-path",
        "smoke-valid-on-reference",
        "interactive-drv",
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
    assert!(text.contains("fresh-smoke '--lane' 'smoke'"), "{text}");
    let _ = std::fs::remove_dir_all(&images);
}

#[test]
fn images_outside_the_store_are_refused_at_eval_unless_impure() {
    let expr = |impure: &str| {
        format!(
            "(import ./nix/lib {{ }}).mkClusterCheck {{ name = \"x\"; \
             driver = builtins.toFile \"photon-cluster\" \"\"; images = \"/srv/images\"; \
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
        "unit-tests",
        "clippy",
    ] {
        assert!(
            json.as_array().unwrap().iter().any(|c| c == check),
            "{check} missing from {json}"
        );
    }
}
