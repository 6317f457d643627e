//! The layered lane built by real Nix (Debian's nix-bin, builtins only:
//! nix/ci/layers.nix over nix/lib/layers.nix) on the one-node cluster: the
//! ready cluster once, its three layers two at a time, the lane assembled;
//! then one check of one layer changed, and nix's own list of what it
//! builds holds exactly that layer and the lane.

mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// nix-build of nix/ci/layers.nix, two jobs at once, sandbox off.
fn nix_build(args: &[&str]) -> (Output, Option<PathBuf>, f64) {
    let t = std::time::Instant::now();
    let out = Command::new("nix-build")
        .arg("nix/ci/layers.nix")
        .args(["--arg", "driver", env!("CARGO_BIN_EXE_photon-cluster")])
        .args(args)
        .args(["--max-jobs", "2", "--no-out-link"])
        .args(["--option", "sandbox", "false"])
        .args(["--option", "substituters", ""])
        .args([
            "--option",
            "system-features",
            "kvm nixos-test benchmark big-parallel",
        ])
        .args(["--option", "build-users-group", ""])
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("nix-build: {e}; run scripts/host-deps.sh (installs nix-bin)"));
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "$ nix-build nix/ci/layers.nix {} -> {:?} in {secs:.1} s\n{}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    let path = out
        .status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    (out, path, secs)
}

/// The names of the derivations nix said it would build (`these N
/// derivations will be built:` and the store paths under it).
fn built(out: &Output) -> Vec<String> {
    let err = String::from_utf8_lossy(&out.stderr);
    let mut names = Vec::new();
    let mut listing = false;
    for line in err.lines() {
        if line.contains("will be built:") {
            listing = true;
        } else if listing && line.starts_with("  /nix/store/") {
            let base = line.trim().trim_end_matches(".drv");
            names.push(
                base.split_once('-')
                    .map(|x| x.1)
                    .unwrap_or(base)
                    .to_string(),
            );
        } else {
            listing = false;
        }
    }
    names.sort();
    names
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn the_layered_lane_builds_the_ready_cluster_once_and_rebuilds_one_changed_layer() {
    let images = common::reference_images();
    let work = tempfile::tempdir().unwrap();
    let lane = work.path().join("layered.toml");
    let text = std::fs::read_to_string(repo().join("tests/fixtures/layered.toml")).unwrap();
    std::fs::write(&lane, &text).unwrap();
    let nonce = format!("{:?}", std::time::SystemTime::now());
    let args = [
        "--argstr",
        "images",
        images.to_str().unwrap(),
        "--arg",
        "cluster",
        "./tests/fixtures/one-node.toml",
        "--arg",
        "laneFile",
        lane.to_str().unwrap(),
        "--arg",
        "keepFailed",
        "true",
        "--argstr",
        "nonce",
        &nonce,
    ];
    let (out, path, full) = nix_build(&args);
    assert!(
        out.status.success(),
        "the layered lane builds (kept failed)"
    );
    assert_eq!(
        built(&out),
        [
            "layered",
            "layered-layer-boot",
            "layered-layer-crash",
            "layered-layer-still-up",
            "one-node-ready",
        ]
    );
    let out_dir = path.unwrap();
    let r = json(&out_dir.join("result.json"));
    assert_eq!(
        common::layer_names(&r),
        [
            "boot",
            "health:boot",
            "crash",
            "health:crash",
            "still-up",
            "health:still-up"
        ]
    );
    // The crash stays in its layer: the sibling restored the ready cluster.
    assert_eq!(common::check(&r, "panic@solo")["outcome"], "fail");
    assert_eq!(common::check(&r, "hostname@solo")["outcome"], "pass");
    assert_eq!(common::check(&r, "units@solo")["outcome"], "pass");
    assert!(out_dir.join("nix-support/failed").exists());
    assert!(out_dir.join("report.html").is_file() && out_dir.join("junit.xml").is_file());

    // The ready and layer outputs, for the note's figures.
    let ready = Command::new("nix-build")
        .args(["nix/ci/layers.nix", "-A", "ready", "--no-out-link"])
        .args(["--arg", "driver", env!("CARGO_BIN_EXE_photon-cluster")])
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap();
    let ready = PathBuf::from(String::from_utf8_lossy(&ready.stdout).trim());
    let boot = json(&ready.join("boot.json"));
    eprintln!(
        "figures: full layered build {full:.1} s; ready boot-to-ready {:.1} s",
        boot["boot_to_ready_s"]
    );
    for l in ["boot", "crash", "still-up"] {
        let r = json(&out_dir.join("layers").join(l).join("result.json"));
        let start = r["steps"][0]["duration_s"].as_f64().unwrap();
        eprintln!(
            "figures: layer {l}: restore to ready {start:.1} s, whole run {:.1} s",
            r["duration_s"]
        );
        assert_eq!(r["boot"]["mode"], "warm");
    }

    // One check of one layer changes: that layer and the lane rebuild.
    std::fs::write(
        &lane,
        text.replace("command = \"hostname\"", "command = \"hostname -s\""),
    )
    .unwrap();
    let (out, path, again) = nix_build(&args);
    assert!(out.status.success());
    assert_eq!(built(&out), ["layered", "layered-layer-still-up"]);
    eprintln!("figures: rebuild after a one-check change {again:.1} s (full {full:.1} s)");
    let r = json(&path.unwrap().join("result.json"));
    assert_eq!(common::check(&r, "hostname@solo")["outcome"], "pass");
}

/// A ready cluster whose boot fails (a kernel that cannot mount its root):
/// with keepFailed its evidence is an output of its own, and the lane
/// still assembles, every check of every layer skipped because the ready
/// cluster is missing, rather than a bare dependency failure.
#[test]
fn a_failed_ready_boot_keeps_its_evidence_and_every_layer_reports_skipped() {
    let reference = common::reference_images();
    // Hard links beside the reference images (one file system), so that
    // the image directory holds its files rather than links out of it.
    let work = tempfile::tempdir_in(repo().join("target")).unwrap();
    let solo = work.path().join("images/solo");
    std::fs::create_dir_all(&solo).unwrap();
    for f in ["vmlinuz", "initrd.img", "rootfs.img"] {
        std::fs::hard_link(reference.join(f), solo.join(f)).unwrap();
    }
    std::fs::write(solo.join("cmdline"), "rdinit=/nonexistent root=/dev/vdz").unwrap();
    let images = work.path().join("images");
    let nonce = format!("{:?}", std::time::SystemTime::now());
    let args = [
        "--argstr",
        "images",
        images.to_str().unwrap(),
        "--arg",
        "cluster",
        "./tests/fixtures/one-node.toml",
        "--arg",
        "laneFile",
        "./tests/fixtures/layered.toml",
        "--arg",
        "keepFailed",
        "true",
        "--argstr",
        "nonce",
        &nonce,
    ];
    let (out, path, secs) = nix_build(&args);
    assert!(out.status.success(), "kept failed, the lane still builds");
    eprintln!("figures: a lane on a failed ready boot {secs:.1} s");
    let lane = path.unwrap();
    assert!(lane.join("nix-support/failed").exists());
    let r = json(&lane.join("result.json"));
    assert_eq!(r["status"], "error", "{r:#}");
    let checks: Vec<&Value> = r["layers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|l| l["checks"].as_array().unwrap())
        .collect();
    assert_eq!(checks.len(), 3, "{r:#}");
    for c in checks {
        assert_eq!(c["outcome"], "skipped", "{c}");
        let why = c["message"].as_str().unwrap();
        assert!(
            why.contains("the ready cluster is missing: its boot failed"),
            "{why}"
        );
    }
    // The assembly says the layers ran nothing, not that they failed.
    let assemble = r["steps"].as_array().unwrap().last().unwrap();
    let said = assemble["message"].as_str().unwrap();
    assert!(said.contains("skipped, their cluster missing:"), "{said}");
    assert!(!said.contains("failed"), "{said}");
    // The ready output is the failed boot's evidence: why, and the console.
    let ready = PathBuf::from(
        String::from_utf8_lossy(
            &Command::new("nix-build")
                .args(["nix/ci/layers.nix", "-A", "ready", "--no-out-link"])
                .args(["--arg", "driver", env!("CARGO_BIN_EXE_photon-cluster")])
                .args(args)
                .current_dir(repo())
                .output()
                .unwrap()
                .stdout,
        )
        .trim(),
    );
    let boot = json(&ready.join("boot.json"));
    assert_eq!(boot["error_kind"], "kernel_panic", "{boot:#}");
    assert!(ready.join("nix-support/failed").exists());
    let console = std::fs::read_to_string(ready.join("consoles/solo.log")).unwrap();
    assert!(console.contains("Kernel panic"), "{console}");
    // Hydra opens it at boot.json: it has no report.
    let products = std::fs::read_to_string(ready.join("nix-support/hydra-build-products")).unwrap();
    assert!(
        products.contains(&format!("report artifacts {} boot.json", ready.display())),
        "{products}"
    );
}
