//! `compare OLD NEW` through the real binary, on recorded runs
//! (tests/fixtures/runs: `passing`, and `regressed`, the same run with a
//! failed check and a slower figure; derive-compare.sh says how they were
//! made from the recorded `degraded` and `failing` runs).

mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/runs")
        .join(name)
}

/// `compare` with `args`: exit code, stdout, stderr.
fn compare(args: &[&Path], json: bool) -> (Option<i32>, String, String) {
    let mut cmd = common::bin();
    cmd.arg("compare").args(args);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().expect("spawning photon-cluster");
    let out = common::echo(&["compare"], out);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_failed_check_and_a_slower_figure_are_named_and_exit_1() {
    let (code, out, _) = compare(&[&fixture("passing"), &fixture("regressed")], false);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("regressed  units@node03 (boot): pass -> fail"),
        "{out}"
    );
    assert!(
        out.contains("regressed  s3-throughput@node06 large_put"),
        "{out}"
    );
    assert!(out.contains("2 regressions (1 check, 1 figure)"), "{out}");
    assert!(!out.contains("large_get"), "within its spread: {out}");
}

#[test]
fn a_run_compared_with_itself_exits_0_and_says_nothing_changed() {
    // The artifact root on one side, its result.json on the other.
    let dir = fixture("passing");
    let (code, out, _) = compare(&[&dir, &dir.join("result.json")], false);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.trim_end().ends_with("nothing changed"), "{out}");
    // Improvements alone do not fail either.
    let (code, out, _) = compare(&[&fixture("regressed"), &dir], false);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("improved   units@node03"), "{out}");
}

#[test]
fn json_is_machine_readable() {
    let (code, out, _) = compare(&[&fixture("passing"), &fixture("regressed")], true);
    assert_eq!(code, Some(1));
    let doc: Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert_eq!(doc["schema"], "photon-cluster/compare/v1");
    assert_eq!(doc["regressions"], 2);
    assert_eq!(doc["exit_code"], 1);
    assert_eq!(doc["nothing_changed"], false);
    assert_eq!(doc["checks"][0]["id"], "units@node03");
    assert_eq!(doc["checks"][0]["change"], "regressed");
    let put = doc["figures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["figure"] == "large_put")
        .unwrap();
    assert_eq!(put["change"], "regressed");
    assert_eq!(put["old"]["min"], 8.65);
    assert_eq!(doc["new"]["status"], "fail");
    assert_eq!(doc["old"]["accel"], "tcg");
}

#[test]
fn a_missing_path_or_not_a_run_exits_2_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-run");
    let (code, _, err) = compare(&[&fixture("passing"), &missing], false);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("error[bad_input]"), "{err}");
    assert!(err.contains(&missing.display().to_string()), "{err}");
    // A directory without result.json, and a file that is not one.
    let (code, _, err) = compare(&[tmp.path(), &fixture("passing")], false);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("result.json"), "{err}");
    let bogus = tmp.path().join("result.json");
    std::fs::write(&bogus, "{\n  \"schema\": 3\n}\n").unwrap();
    let (code, _, err) = compare(&[&bogus, &fixture("passing")], true);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&format!("{}:2:", bogus.display())), "{err}");
}
