//! `photon-cluster bench` end to end, short: a one-node cluster booted cold,
//! a few execs over each channel, its snapshot saved and restored warm. It
//! is here so that bench cannot break unseen again (it once failed at every
//! warm restore, on the fabric ports its own save left taken).

mod common;

use serde_json::Value;
use std::fs;

#[test]
fn bench_completes_on_a_one_node_cluster_and_leaves_nothing_running() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    common::image_dir_with_cmdline(&images, "");
    let cluster = common::one_node_cluster(tmp.path(), &images);
    // The agent asked for: bench measures its side beside ssh2's.
    let text = fs::read_to_string(&cluster).unwrap();
    fs::write(
        &cluster,
        text.replace("[cluster]\n", "[cluster]\nchannel = \"agent\"\n"),
    )
    .unwrap();
    let state = tmp.path().join("state");
    let out_file = tmp.path().join("bench.json");
    let out = common::run(
        &state,
        &[
            "--cluster",
            cluster.to_str().unwrap(),
            "bench",
            "--execs",
            "5",
            "--out",
            out_file.to_str().unwrap(),
        ],
    );
    let needle = state.to_str().unwrap();
    let leftovers = common::qemu_pids_mentioning(needle);
    let switches = common::pids_mentioning("photon-cluster", needle);
    if out.status.code() != Some(0) {
        common::run(&state, &["--cluster", cluster.to_str().unwrap(), "stop"]);
    }
    assert_eq!(out.status.code(), Some(0), "bench must complete");
    assert_eq!(leftovers, Vec::<i32>::new(), "no QEMU left after bench");
    assert_eq!(
        switches,
        Vec::<i32>::new(),
        "no fabric switch left after bench"
    );
    let doc: Value = serde_json::from_slice(&fs::read(&out_file).unwrap()).unwrap();
    assert_eq!(doc["nodes"], 1, "{doc}");
    let pairs = doc["pairs"].as_array().unwrap();
    let names: Vec<&str> = pairs.iter().map(|p| p["name"].as_str().unwrap()).collect();
    for want in [
        "boot-to-ready",
        "readiness noticed",
        "exec of",
        "warm restore-to-ready",
    ] {
        assert!(
            names.iter().any(|n| n.starts_with(want)),
            "{want} missing from {names:?}"
        );
    }
    // The cluster asked for the agent: its side is measured beside ssh2's.
    assert!(
        names.iter().any(|n| n.ends_with("over the agent")),
        "no agent side in {names:?}"
    );
    for p in pairs {
        let ratio = p["ratio"].as_f64().unwrap_or(f64::NAN);
        assert!(ratio.is_finite() && ratio >= 0.0, "a measured ratio: {p}");
    }
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("wrote"), "{printed}");
}

/// `bench-boot` on the one-node cluster: the raw boot to the login prompt,
/// then the driver's boot-to-ready, both printed with their ratio; nothing
/// left running.
#[test]
fn bench_boot_prints_both_boots_and_their_ratio() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    common::image_dir_with_cmdline(&images, "");
    let cluster = common::one_node_cluster(tmp.path(), &images);
    let state = tmp.path().join("state");
    let c = cluster.to_str().unwrap();
    let out = common::run(&state, &["--cluster", c, "bench-boot"]);
    let leftovers = common::qemu_pids_mentioning(state.to_str().unwrap());
    if out.status.code() != Some(0) {
        common::run(&state, &["--cluster", c, "stop"]);
    }
    assert_eq!(out.status.code(), Some(0), "bench-boot must complete");
    assert_eq!(
        leftovers,
        Vec::<i32>::new(),
        "no QEMU left after bench-boot"
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("raw parallel boot to login prompt"),
        "{printed}"
    );
    let ratio: f64 = printed
        .lines()
        .find(|l| l.contains("driver boot-to-ready"))
        .and_then(|l| l.split("ratio").nth(1))
        .and_then(|r| r.trim().trim_end_matches('x').parse().ok())
        .unwrap_or_else(|| panic!("no ratio in {printed}"));
    assert!(ratio.is_finite() && ratio > 0.0, "{printed}");
}

/// `bench-fabric` on a two-node cluster: TCP throughput between the two
/// guests over the driver's switch and over QEMU's hub, each booted in
/// turn; both measured, nothing left running.
#[test]
fn bench_fabric_measures_the_switch_against_the_hub() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    common::image_dir_with_cmdline(&images, "");
    std::os::unix::fs::symlink(images.join("solo"), images.join("duo")).unwrap();
    let cluster = common::one_node_cluster(tmp.path(), &images);
    let mut text = fs::read_to_string(&cluster).unwrap();
    text.push_str(
        "\n[[node]]\nname = \"duo\"\nrole = \"worker\"\naddress = \"10.78.0.11\"\nunits = [\"ssh.service\"]\n",
    );
    fs::write(&cluster, text).unwrap();
    let state = tmp.path().join("state");
    let c = cluster.to_str().unwrap();
    let out = common::run(
        &state,
        &[
            "--cluster",
            c,
            "bench-fabric",
            "--from",
            "solo",
            "--to",
            "duo",
            "--transfers",
            "2",
        ],
    );
    let leftovers = common::qemu_pids_mentioning(state.to_str().unwrap());
    if out.status.code() != Some(0) {
        common::run(&state, &["--cluster", c, "stop"]);
    }
    assert_eq!(out.status.code(), Some(0), "bench-fabric must complete");
    assert_eq!(
        leftovers,
        Vec::<i32>::new(),
        "no QEMU left after bench-fabric"
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("TCP throughput solo -> duo"), "{printed}");
    assert!(printed.contains("QEMU's multicast hub"), "{printed}");
}
