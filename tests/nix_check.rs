//! The CI proof of the Nix integration: real check derivations built with
//! Debian's nix-bin through the builtins-only library (nix/ci/check.nix).
//! The driver is this cargo build, the images come from the driver's Debian
//! build, QEMU and friends from the host (recorded as impure). Each
//! derivation boots a one-node cluster: one with a lane that passes (its
//! evidence subtree and benchmark figures in $out and Hydra's metrics), the
//! others with a lane that fails on purpose, with and without the opt-in
//! that keeps a failed lane's evidence, and one past its timeout.

mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// nix-build of nix/ci/check.nix with `args`; the output path on success.
fn nix_build(link: &str, args: &[&str]) -> (Output, Option<PathBuf>) {
    let link = repo().join("target/nix-check").join(link);
    let _ = std::fs::remove_file(&link);
    std::fs::create_dir_all(link.parent().unwrap()).unwrap();
    let nonce = format!("{:?}", std::time::SystemTime::now());
    let out = Command::new("nix-build")
        .arg("nix/ci/check.nix")
        .args(["--arg", "driver", env!("CARGO_BIN_EXE_photon-cluster")])
        .args(["--argstr", "nonce", &nonce])
        .args(args)
        .args(["--option", "sandbox", "false"])
        .args([
            "--option",
            "system-features",
            "kvm nixos-test benchmark big-parallel",
        ])
        .args(["--option", "build-users-group", ""])
        .arg("--out-link")
        .arg(&link)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("nix-build: {e}; run scripts/host-deps.sh (installs nix-bin)"));
    eprintln!(
        "$ nix-build nix/ci/check.nix {} -> {:?}\n{}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    let path = std::fs::read_link(&link).ok();
    (out, path)
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect()
}

/// `<dir>/<node>/` linking to the Debian image, plus `cmdline`.
fn per_node_images(images: &Path, node: &str) -> PathBuf {
    let dir = repo().join("target/nix-check/per-node-images");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join(node)).unwrap();
    for f in ["vmlinuz", "initrd.img", "rootfs.img"] {
        std::os::unix::fs::symlink(images.join(f), dir.join(node).join(f)).unwrap();
    }
    std::fs::write(
        dir.join(node).join("cmdline"),
        format!("photon.image={node}\n"),
    )
    .unwrap();
    dir
}

#[test]
fn check_derivations_build_with_real_nix() {
    let images = common::reference_images();
    let images = images.to_str().unwrap();

    // A passing check derivation. Its one node boots from its own
    // subdirectory of a per-node image directory, with a cmdline (the layout
    // of nix/images.nix); the lane checks that marker in /proc/cmdline. (The
    // six-node lanes run on the shared cluster of tests/cluster_e2e.rs; a
    // second six-node boot here cost the suite 6-8 minutes.)
    let per_node = per_node_images(Path::new(images), "solo");
    // The one-node cluster on its per-node image directory, with a lane file.
    let one_node = |lane: &'static str| {
        [
            "--argstr",
            "images",
            per_node.to_str().unwrap(),
            "--arg",
            "cluster",
            "./tests/fixtures/one-node.toml",
            "--arg",
            "laneFile",
            lane,
        ]
    };
    let mut pass = one_node("./tests/fixtures/one-node-pass.toml").to_vec();
    pass.extend(["--argstr", "name", "one-node-pass"]);
    let (out, path) = nix_build("one-node-pass", &pass);
    assert!(out.status.success(), "the check derivation builds");
    let out_dir = path.expect("out link");
    assert!(out_dir.starts_with("/nix/store"), "{}", out_dir.display());
    let result = json(&out_dir.join("result.json"));
    assert_eq!(result["command"], "run");
    assert_eq!(result["status"], "pass", "{}", result["layers"]);
    let impure = strings(&result["hermetic"]["impure"]);
    assert!(
        impure
            .iter()
            .any(|p| p.starts_with("qemu-system-x86_64: /usr/bin/")),
        "{impure:?}"
    );
    let in_store = strings(&result["hermetic"]["store_paths"]);
    assert!(
        in_store
            .iter()
            .any(|p| p.starts_with("driver: /nix/store/")),
        "{in_store:?}"
    );
    assert_eq!(result["nodes"].as_object().unwrap().len(), 1);
    assert!(out_dir.join("junit.xml").is_file());
    assert!(out_dir.join("report.md").is_file());
    assert_eq!(result["lane"], "one-node-pass");
    assert_eq!(
        json(&out_dir.join("evidence/cmdline-solo.json"))["outcome"],
        "pass"
    );
    assert!(out_dir.join("bench/materialization.json").is_file());
    assert!(
        out_dir.join("storage-benchmarks.md").is_file() || out_dir.join("benchmarks.md").is_file()
    );
    assert!(
        std::fs::metadata(out_dir.join("nodes/solo/vm.log"))
            .unwrap()
            .len()
            > 0
    );
    let products =
        std::fs::read_to_string(out_dir.join("nix-support/hydra-build-products")).unwrap();
    for file in [
        "report.html",
        "report.md",
        "result.json",
        "junit.xml",
        "driver.log",
    ] {
        let line = format!("{}/{file}", out_dir.display());
        assert!(products.contains(&line), "{line} in {products}");
        assert!(out_dir.join(file).is_file(), "{file} in $out");
    }
    let browsable = format!("report artifacts {} report.html", out_dir.display());
    assert!(products.contains(&browsable), "{products}");
    assert!(!out_dir.join("nix-support/failed").exists());
    // Hydra's metrics: the driver's figures, then the builder's wall time.
    let metrics = std::fs::read_to_string(out_dir.join("nix-support/hydra-metrics")).unwrap();
    for prefix in [
        "boot-to-ready ",
        "lane-duration ",
        "checks-pass ",
        "checks-fail 0",
        "lane-wall-time ",
    ] {
        assert!(
            metrics.lines().any(|l| l.starts_with(prefix)),
            "{prefix} in {metrics}"
        );
    }
    // The benchmark's figures (check::figures), median and unit.
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("materialization.solo.clone_ms ") && l.ends_with(" ms")),
        "the materialization figures in {metrics}"
    );

    // A failing lane fails the derivation.
    let broken = one_node("./tests/fixtures/broken-lane.toml");
    let (out, path) = nix_build("broken", &broken);
    assert!(!out.status.success(), "a failed lane fails the derivation");
    assert!(path.is_none());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing-file@solo"));

    // With the opt-in, the failed lane's evidence is the output, marked failed.
    let mut kept = broken.to_vec();
    kept.extend(["--arg", "keepFailed", "true"]);
    let (out, path) = nix_build("broken-kept", &kept);
    assert!(out.status.success(), "keepFailed keeps the output");
    let out_dir = path.expect("out link");
    assert!(out_dir.join("nix-support/failed").is_file());
    let result = json(&out_dir.join("result.json"));
    assert_eq!(result["status"], "fail");
    assert_eq!(result["exit_code"], 1);
    let junit = std::fs::read_to_string(out_dir.join("junit.xml")).unwrap();
    assert!(
        junit.contains(r#"<testcase name="missing-file@solo""#),
        "{junit}"
    );
    assert!(junit.contains(r#"failures="1""#), "{junit}");
    let cmdline = common::check(&result, "node-image-cmdline@solo");
    assert_eq!(cmdline["outcome"], "pass", "{cmdline}");
    assert!(
        std::fs::metadata(out_dir.join("nodes/solo/vm.log"))
            .unwrap()
            .len()
            > 0
    );

    // A lane that runs past the check's timeout: the driver's own
    // --timeout (from `timeout`) stops it, keeps the evidence with status
    // `timeout`, stops the VM, and exits 124; with keepFailed the output is
    // kept and marked failed. Its one check sleeps far past the timeout, so
    // the timeout ends the build however fast the node boots (over the
    // agent a one-node boot is ready in 12 s, and the broken lane once used
    // here finished in 19 s, under the timeout).
    let mut late = one_node("./tests/fixtures/outlasts-timeout.toml").to_vec();
    late.extend(["--arg", "keepFailed", "true", "--arg", "timeout", "20"]);
    let t = std::time::Instant::now();
    let (out, path) = nix_build("timeout-kept", &late);
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "timeout 20: the build ended after {:.1} s",
        t.elapsed().as_secs_f64()
    );
    assert!(
        out.status.success(),
        "keepFailed keeps a timed-out lane: {err}"
    );
    assert!(err.contains("TIMED OUT after 20s (exit 124)"), "{err}");
    let out_dir = path.expect("out link");
    assert_eq!(
        std::fs::read_to_string(out_dir.join("nix-support/failed"))
            .unwrap()
            .trim(),
        "timeout"
    );
    let result = json(&out_dir.join("result.json"));
    assert_eq!(result["status"], "timeout", "{result}");
    assert_eq!(result["exit_code"], 124);
    assert_eq!(result["error_kind"], "timeout");
    assert!(
        out_dir.join("nodes/solo/vm.log").is_file(),
        "the console is kept"
    );
    assert_eq!(
        common::qemu_pids_mentioning("solo/vmlinuz"),
        Vec::<i32>::new()
    );
}
