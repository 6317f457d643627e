//! report.html and `report DIR`, read in a real headless Chromium, on two
//! runs recorded by an earlier driver (tests/fixtures/runs: a smoke that
//! failed at a stopped unit, and a degraded fresh-smoke). The end-to-end
//! test does the same on the runs it makes. Also completions and the man
//! page, through a real bash.

mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/runs")
        .join(name)
}

/// A copy of a recorded run, re-rendered with this driver.
fn rerendered(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture(name).join("result.json"), dir.join("result.json")).unwrap();
    let out = common::bin().arg("report").arg(&dir).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("report.html") && said.contains("report.md"),
        "{said}"
    );
    (tmp, dir)
}

fn shots() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-screenshots")
}

#[test]
fn a_failed_run_shows_its_failure_above_the_fold_in_a_browser() {
    let (_tmp, dir) = rerendered("failing");
    let seen = common::browser::assert_readable(&dir, &shots(), "recorded-failing");
    let first = &seen["failures"][0];
    assert_eq!(first["name"], "units@node03");
    let evidence = first["evidence"].as_str().unwrap();
    assert!(
        evidence.contains("redis-server.service"),
        "the journal tail is the evidence shown: {evidence}"
    );
    assert!(seen["verdict"]["class"].as_str().unwrap().contains("fail"));
}

#[test]
fn a_degraded_run_draws_its_timeline_without_failures() {
    let (_tmp, dir) = rerendered("degraded");
    let seen = common::browser::assert_readable(&dir, &shots(), "recorded-degraded");
    assert_eq!(seen["failures"], serde_json::json!([]));
    assert_eq!(seen["node_rows"].as_array().unwrap().len(), 6);
}

/// `report DIR`: its exit code and stderr.
fn report_of(dir: &Path) -> (Option<i32>, String) {
    let out = common::bin().arg("report").arg(dir).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), err)
}

#[test]
fn report_refuses_what_is_not_a_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, err) = report_of(tmp.path());
    assert_eq!(code, Some(2));
    assert!(
        err.contains("result.json") && err.contains("error[bad_input]"),
        "{err}"
    );
    std::fs::write(tmp.path().join("result.json"), "{\n  \"schema\": 3\n}\n").unwrap();
    let (code, err) = report_of(tmp.path());
    assert_eq!(code, Some(2));
    assert!(err.contains("result.json:2:"), "names the line: {err}");
    assert!(!tmp.path().join("report.html").exists(), "nothing written");
}

/// Completion through bash itself: the script `completions bash` prints is
/// sourced, bash's completion variables are set as for a Tab press, and
/// the function fills COMPREPLY by calling the binary.
fn complete(line: &str) -> Vec<String> {
    let bin = Path::new(env!("CARGO_BIN_EXE_photon-cluster"));
    let words: Vec<&str> = line.split(' ').collect();
    let script = format!(
        "source <(photon-cluster completions bash)\n\
         COMP_LINE='{line}'; COMP_POINT=${{#COMP_LINE}}; COMP_WORDS=({words}); COMP_CWORD={cword}; COMP_TYPE=9\n\
         _clap_complete_photon_cluster photon-cluster '{cur}' '{prev}'\n\
         printf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
        words = words
            .iter()
            .map(|w| format!("'{w}'"))
            .collect::<Vec<_>>()
            .join(" "),
        cword = words.len() - 1,
        cur = words.last().unwrap(),
        prev = words[words.len() - 2],
    );
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let state = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .env("PATH", path)
        .env("PHOTON_VM_DIR", state.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn bash_completes_subcommands_options_and_node_names() {
    let subs = complete("photon-cluster fresh-s");
    assert!(subs.contains(&"fresh-smoke".to_string()), "{subs:?}");
    let nodes = complete("photon-cluster ssh node0");
    for n in ["node01", "node04", "node06"] {
        assert!(nodes.contains(&n.to_string()), "{nodes:?}");
    }
    let faults = complete("photon-cluster fault crash n");
    assert!(faults.contains(&"node03".to_string()), "{faults:?}");
    let opts = complete("photon-cluster smoke --kee");
    assert_eq!(opts, vec!["--keep-going".to_string()]);
}

#[test]
fn zsh_fish_and_the_man_page_are_generated() {
    for shell in ["zsh", "fish"] {
        let out = common::bin().args(["completions", shell]).output().unwrap();
        assert_eq!(out.status.code(), Some(0));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("COMPLETE") && text.contains("photon-cluster"),
            "{text}"
        );
    }
    let out = common::bin()
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "an unknown shell is refused");
    let out = common::bin().arg("man").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let roff = String::from_utf8_lossy(&out.stdout);
    assert!(
        roff.starts_with(".ie") || roff.contains(".TH photon-cluster"),
        "{roff}"
    );
    for sub in ["fresh\\-smoke", "snapshot", "completions"] {
        assert!(roff.contains(sub), "the man page lists {sub}");
    }
}

#[test]
fn lanes_and_check_answer_in_json() {
    let out = common::bin().args(["lanes", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let lanes: Value = serde_json::from_slice(&out.stdout).unwrap();
    let smoke = lanes
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "smoke")
        .unwrap();
    assert_eq!(smoke["valid"], true);
    assert!(smoke["checks"].as_u64().unwrap() > 10);
    // Each lane is shown on its own profile: the storage lanes on the storage nodes.
    for name in ["bench-storage", "bench-coronafs-local-matrix"] {
        let l = lanes
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == name)
            .unwrap();
        assert_eq!(
            (&l["valid"], &l["cluster"]),
            (&Value::Bool(true), &Value::from("reference-storage")),
            "{l}"
        );
    }
    // Named explicitly, the reference cluster gets bench-storage's own form.
    let out = common::bin()
        .args(["--profile", "reference", "lanes", "--json"])
        .output()
        .unwrap();
    let lanes: Value = serde_json::from_slice(&out.stdout).unwrap();
    let bench = lanes
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "bench-storage")
        .unwrap();
    assert_eq!(
        (&bench["valid"], &bench["cluster"]),
        (&Value::Bool(true), &Value::from("reference"))
    );
    let out = common::bin().args(["check", "--json"]).output().unwrap();
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["valid"], true);
    assert_eq!(doc["nodes"].as_array().unwrap().len(), 6);
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("c.toml");
    std::fs::write(&bad, "name = \"x\"\n[[node]]\nname = 3\n").unwrap();
    let out = common::bin()
        .args(["check", "--json", "--cluster"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["valid"], false);
    assert_eq!(doc["kind"], "spec_invalid");
    assert!(doc["error"].as_str().unwrap().contains("c.toml:"), "{doc}");
}

/// The browser check itself fails on pages broken on purpose: the failure
/// pushed below the fold, and a timeline that lost a node's row.
#[test]
fn the_browser_check_fails_on_a_page_broken_on_purpose() {
    let (_tmp, dir) = rerendered("failing");
    let page = dir.join("report.html");
    let good = std::fs::read_to_string(&page).unwrap();
    let broken = [
        good.replacen(
            "<section id=\"failures\">",
            "<div style=\"height:900px\"></div><section id=\"failures\">",
            1,
        ),
        good.replacen("class=\"node-row\"", "class=\"lost-row\"", 1),
    ];
    for (i, html) in broken.iter().enumerate() {
        assert_ne!(html, &good);
        std::fs::write(&page, html).unwrap();
        let caught = std::panic::catch_unwind(|| {
            common::browser::assert_readable(&dir, &shots(), &format!("broken-{i}"))
        });
        assert!(caught.is_err(), "broken page {i} passed the browser check");
    }
}
