//! The storage profile end to end: `reference-storage` boots its five nodes,
//! a short form of `bench-storage` measures fio (controller export vs the
//! node-local export), volume materialization and S3 objects, and writes
//! storage-benchmarks.md with its charts; a short local export matrix names
//! the strongest profile; an S3 server that answers with errors fails the
//! check with its response body; a bucket that does not exist is refused
//! before anything runs.
//!
//! Shares the image the reference e2e built: both profiles build the same
//! recipe, so the storage state directory links the reference one's images.

mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Instant;

const PROFILE: [&str; 2] = ["--profile", "reference-storage"];

fn fixture(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    p.to_str().unwrap().to_string()
}

fn artifacts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/e2e-work/storage")
}

fn read_json(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap()
}

/// Runs `args` on the storage profile; returns the exit code.
fn run(state: &Path, args: &[&str]) -> Option<i32> {
    common::run(state, &[&PROFILE[..], args].concat())
        .status
        .code()
}

/// A lane file (tests/fixtures/<file>, whose lane is called `name`) run by
/// `smoke` on the storage cluster: exit code, run directory.
fn lane(state: &Path, file: &str, name: &str, extra: &[&str]) -> (Option<i32>, PathBuf) {
    let root = artifacts();
    let code = run(
        state,
        &[
            &[
                "smoke",
                "--lane-file",
                &fixture(file),
                "--artifacts",
                root.to_str().unwrap(),
            ],
            extra,
        ]
        .concat(),
    );
    (code, root.join(name).join("latest"))
}

fn figure<'a>(check: &'a Value, name: &str) -> &'a Value {
    check["evidence"]["figures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("no figure {name} in {check}"))
}

struct StopOnPanic(PathBuf);

impl Drop for StopOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            run(&self.0, &["stop", "--grace", "5"]);
        }
    }
}

#[test]
fn storage_profile_end_to_end() {
    let state = common::state_dir();
    // The storage profile's state is `<state>-storage`; its images are the
    // reference state's (same recipe), built once.
    let storage = PathBuf::from(format!("{}-storage", state.display()));
    std::fs::create_dir_all(&storage).unwrap();
    std::fs::create_dir_all(state.join("images")).unwrap();
    let link = storage.join("images");
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink(state.join("images"), &link).unwrap();
    }
    assert_eq!(run(&state, &["build"]), Some(0), "build");
    run(&state, &["stop", "--grace", "5"]);
    let _stop = StopOnPanic(state.clone());

    // A bucket the cluster does not have is refused before anything starts.
    let out = common::run(
        &state,
        &[
            &PROFILE[..],
            &["smoke", "--lane-file", &fixture("no-such-bucket.toml")],
        ]
        .concat(),
    );
    assert_eq!(out.status.code(), Some(2), "an unknown bucket exits 2");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no-such-bucket.toml:") && err.contains("\"no-such-bucket\""),
        "{err}"
    );
    assert!(!storage.join("cluster.json").exists(), "nothing started");

    // Restored from the storage cluster's `default` snapshot when one was
    // saved for this image and driver (a rerun on a kept state directory);
    // else (exit 2: none, or stale) booted cold. CI's fresh clone boots.
    let t = Instant::now();
    let warm = run(&state, &["start", "--warm"]) == Some(0);
    if !warm {
        assert_eq!(
            run(&state, &["start", "--ready-timeout", "1200"]),
            Some(0),
            "start"
        );
    }
    eprintln!(
        "storage profile {}: ready after {:.1} s",
        if warm { "restored" } else { "booted" },
        t.elapsed().as_secs_f64()
    );

    // The short bench-storage: every part measured, the report written and published.
    let published = tempfile::tempdir().unwrap();
    let (code, dir) = lane(
        &state,
        "bench-storage-short.toml",
        "bench-storage",
        &["--publish", published.path().to_str().unwrap()],
    );
    let result = read_json(&dir.join("result.json"));
    assert_eq!(code, Some(0), "bench-storage: {}", result["layers"]);
    assert_eq!(result["cluster"], "reference-storage");
    let fio = common::check(&result, "controller-vs-local-export@storage-node02");
    for name in [
        "seq_read",
        "seq_write",
        "randread_iops",
        "randwrite_iops",
        "randread_p99_ms",
    ] {
        let f = figure(fio, name);
        assert_eq!(f["subject"]["runs"].as_array().unwrap().len(), 3, "{f}");
        assert!(f["ratio"].as_f64().unwrap() > 0.0, "{f}");
    }
    let mat = common::check(&result, "volume-materialization@storage-node02");
    for name in ["fresh_ms", "clone_ms"] {
        assert_eq!(
            figure(mat, name)["subject"]["runs"]
                .as_array()
                .unwrap()
                .len(),
            5
        );
    }
    let s3 = common::check(&result, "s3-throughput@storage-node02");
    for name in [
        "large_put",
        "large_get",
        "small_put",
        "small_get",
        "small_get_p99_ms",
    ] {
        assert!(
            figure(s3, name)["subject"]["median"].as_f64().unwrap() > 0.0,
            "{s3}"
        );
    }
    let report = std::fs::read_to_string(dir.join("storage-benchmarks.md")).unwrap();
    for needle in [
        "- accelerator: ",
        "- commit: ",
        "sequential read",
        "new cloned volume readable",
        "charts/",
    ] {
        assert!(report.contains(needle), "{needle} in {report}");
    }
    assert_eq!(result["artifacts"]["benchmarks"], "storage-benchmarks.md");
    let charts: Vec<_> = std::fs::read_dir(dir.join("charts")).unwrap().collect();
    assert!(charts.len() >= 4, "one chart per check and unit");
    assert!(published.path().join("storage-benchmarks.md").is_file());
    assert!(published.path().join("charts").read_dir().unwrap().count() >= 4);

    // Broken on purpose: the server loses the bucket. The check fails with
    // the server's own answer (NoSuchBucket) as evidence.
    let ssh = |cmd: &str| run(&state, &["ssh", "storage-node01", cmd]);
    assert_eq!(
        ssh("mv /var/lib/photon/s3/photon-bench /var/lib/photon/s3-gone"),
        Some(0)
    );
    let (code, dir) = lane(&state, "s3-errors.toml", "s3-errors", &[]);
    assert_eq!(
        ssh("mv /var/lib/photon/s3-gone /var/lib/photon/s3/photon-bench"),
        Some(0)
    );
    assert_eq!(
        code,
        Some(1),
        "an S3 server answering errors fails the lane"
    );
    let result = read_json(&dir.join("result.json"));
    let c = common::check(&result, "s3-throughput@storage-node02");
    assert_eq!(c["outcome"], "fail");
    assert!(c["evidence"].to_string().contains("NoSuchBucket"), "{c}");

    // The local export matrix, short: every combination measured or
    // refused as unsupported, and the strongest named.
    let (code, dir) = lane(
        &state,
        "local-matrix-short.toml",
        "bench-coronafs-local-matrix",
        &[],
    );
    let result = read_json(&dir.join("result.json"));
    assert_eq!(code, Some(0), "local matrix: {}", result["layers"]);
    let m = common::check(&result, "export-matrix@storage-node01");
    let combos = m["evidence"]["combinations"].as_array().unwrap();
    assert_eq!(combos.len(), 6, "{m}");
    assert!(combos.iter().any(|c| c["status"] == "measured"), "{m}");
    let strongest = m["evidence"]["strongest"].as_str().unwrap();
    assert!(m["message"].as_str().unwrap().contains(strongest), "{m}");
    eprintln!("local matrix: strongest {strongest}");

    assert_eq!(run(&state, &["stop"]), Some(0), "stop");
    let needle = storage.to_str().unwrap().to_string();
    assert_eq!(common::qemu_pids_mentioning(&needle), Vec::<i32>::new());
}
