//! The Rust toolchain contract between Cargo.toml and the pinned nixpkgs.
//!
//! Cargo.toml's `rust-version` is the oldest Rust that builds the crate: at
//! least edition 2024 (1.85), let-chains (1.88), and the highest
//! `rust-version` of any locked dependency built for x86_64-linux. The Rust
//! that the pinned nixpkgs carries is recorded beside the pin
//! (nix/nixpkgs-rust.json; it cannot be measured here, nixpkgs cannot be
//! fetched). This test fails when that recorded toolchain is older than
//! `rust-version` (the flake's package would not build), when the record
//! belongs to another nixpkgs revision than flake.lock's, or when a
//! dependency needs a newer Rust than `rust-version` claims.

use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read_json(rel: &str) -> Value {
    let path = repo().join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// "1.89" / "1.89.0" / "1.94.1" as (major, minor, patch); a missing patch is 0.
fn version(s: &str) -> (u64, u64, u64) {
    let parts: Vec<u64> = s
        .split('.')
        .map(|p| {
            p.parse()
                .unwrap_or_else(|e| panic!("not a Rust version: {s:?} ({e})"))
        })
        .collect();
    assert!((2..=3).contains(&parts.len()), "not a Rust version: {s:?}");
    (parts[0], parts[1], parts.get(2).copied().unwrap_or(0))
}

fn cargo_rust_version() -> String {
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(repo().join("Cargo.toml")).unwrap()).unwrap();
    manifest["package"]
        .get("rust-version")
        .expect("Cargo.toml has no package.rust-version")
        .as_str()
        .expect("package.rust-version is a string")
        .to_string()
}

/// The locked nixpkgs revision of a flake.lock.
fn locked_nixpkgs_rev(lock: &str) -> String {
    let json = read_json(lock);
    json["nodes"]["nixpkgs"]["locked"]["rev"]
        .as_str()
        .unwrap_or_else(|| panic!("{lock}: no nodes.nixpkgs.locked.rev"))
        .to_string()
}

/// Every package cargo resolves for x86_64-linux from Cargo.lock (the
/// flake's system), with its `rust-version` (None when it declares none)
/// and edition. Offline and --locked: reads Cargo.lock and the registry
/// cache, changes nothing.
fn locked_packages() -> Vec<(String, Option<String>, String)> {
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--offline",
            "--locked",
            "--filter-platform",
            "x86_64-unknown-linux-gnu",
        ])
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("{cargo} metadata: {e}"));
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    // The crate itself is not a dependency: its rust-version is the one checked.
    let root = meta["resolve"]["root"].as_str().unwrap();
    let resolved: Vec<&str> = meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .filter(|id| *id != root)
        .collect();
    meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| resolved.contains(&p["id"].as_str().unwrap()))
        .map(|p| {
            (
                format!(
                    "{} {}",
                    p["name"].as_str().unwrap(),
                    p["version"].as_str().unwrap()
                ),
                p["rust_version"].as_str().map(str::to_string),
                p["edition"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn pinned_nixpkgs_rust_builds_the_crate() {
    let rust_version = cargo_rust_version();
    let needed = version(&rust_version);

    // The record belongs to the pin of both flake locks.
    let record = read_json("nix/nixpkgs-rust.json");
    let recorded_rev = record["rev"].as_str().expect("nix/nixpkgs-rust.json: rev");
    for lock in ["flake.lock", "nix/test-cluster/flake.lock"] {
        assert_eq!(
            locked_nixpkgs_rev(lock),
            recorded_rev,
            "{lock} pins another nixpkgs than nix/nixpkgs-rust.json records; \
             record the new pin's rustc (nix eval --raw nixpkgs#rustc.version) with its rev"
        );
    }

    // The pinned toolchain is new enough.
    let rustc = record["rustc"]
        .as_str()
        .expect("nix/nixpkgs-rust.json: rustc");
    assert!(
        version(rustc) >= needed,
        "the pinned nixpkgs ({recorded_rev}) carries rustc {rustc}, older than Cargo.toml's \
         rust-version {rust_version}: the flake's package cannot build; move the pin"
    );
}

#[test]
fn rust_version_covers_the_crate_and_every_locked_dependency() {
    let rust_version = cargo_rust_version();
    let declared = version(&rust_version);

    // The crate's own floor: edition 2024 and let-chains.
    assert!(
        declared >= version("1.85"),
        "edition 2024 needs Rust 1.85, rust-version is {rust_version}"
    );
    assert!(
        declared >= version("1.88"),
        "let-chains need Rust 1.88, rust-version is {rust_version}"
    );

    let packages = locked_packages();
    assert!(packages.len() > 50, "{} packages resolved", packages.len());
    let mut too_new = Vec::new();
    let mut highest: Option<((u64, u64, u64), String)> = None;
    for (pkg, rv, edition) in &packages {
        // A dependency without rust-version still needs its edition's Rust.
        let floor = match (rv.as_deref(), edition.as_str()) {
            (Some(v), _) => version(v),
            (None, "2024") => version("1.85"),
            (None, "2021") => version("1.56"),
            (None, _) => (1, 0, 0),
        };
        if floor > declared {
            too_new.push(format!("{pkg} needs {floor:?}"));
        }
        if highest.as_ref().is_none_or(|(v, _)| floor > *v) {
            highest = Some((floor, pkg.clone()));
        }
    }
    assert!(
        too_new.is_empty(),
        "Cargo.toml's rust-version {rust_version} is older than what locked dependencies need: {too_new:?}"
    );
    let (highest, by) = highest.unwrap();
    eprintln!(
        "rust-version {rust_version}; the highest locked dependency requirement is {highest:?} ({by})"
    );
}
