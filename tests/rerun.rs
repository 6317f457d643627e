//! `rerun` and `flaky` marks, end to end on the one-node cluster.
//!
//! A check that fails every other time on purpose: restoring the snapshot
//! resets the guest, so the alternation lives on the host, where the test
//! controls it. A small HTTP server here counts `/next` requests; `/state`
//! answers 200 when the count is even and 500 when it is odd (reading it
//! changes nothing, so the engine's own retries of a failing attempt keep
//! failing until the check's deadline). That deadline is 15 s, not less: on
//! a loaded host one curl in the guest once took over 3 s, and `rerun`
//! rightly found the check flaky for it. The guest reaches it through QEMU's user network, which every
//! node already has (the host is 10.0.2.2 there). The lane's first layer
//! asks `/next`, its second judges `/state`: run 1 is odd (fail), run 2
//! even (pass), and so on, deterministically.

mod common;

use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// Stops whatever a test started, also when an assertion fails first.
struct StopOnDrop<'a>(&'a Path, &'a Path);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        let cluster = self.1.to_str().unwrap();
        common::run(self.0, &["--cluster", cluster, "stop", "--grace", "1"]);
    }
}

/// The host side of the alternation: returns its port and its counter.
fn alternating_server() -> (u16, Arc<AtomicU32>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(AtomicU32::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let n = conn.read(&mut buf).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let (code, body) = if req.starts_with("GET /next") {
                (
                    200,
                    format!("count {}", c.fetch_add(1, Ordering::SeqCst) + 1),
                )
            } else {
                match c.load(Ordering::SeqCst) {
                    n if n % 2 == 0 => (200, format!("even {n}")),
                    n => (500, format!("odd {n}")),
                }
            };
            let _ = write!(
                conn,
                "HTTP/1.0 {code} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (port, count)
}

/// The lane: `tick` advances the host's count, `even` judges it; `mark`
/// is added to `even` as written.
fn lane_file(dir: &Path, port: u16, mark: &str) -> PathBuf {
    let text = format!(
        r#"[lane]
name = "alternating"
description = "Fails every other run on purpose (tests/rerun.rs)"

[[layer]]
name = "tick"

[[layer.check]]
name = "tick"
kind = "exec"
targets = "solo"
command = "curl -fsS http://10.0.2.2:{port}/next"

[[layer]]
name = "judged"

[[layer.check]]
name = "even"
kind = "exec"
targets = "solo"
command = "curl -fsS http://10.0.2.2:{port}/state"
deadline = 15
artifact = "evidence/even.json"
{mark}
"#
    );
    let file = dir.join(if mark.is_empty() {
        "alternating.toml"
    } else {
        "marked.toml"
    });
    std::fs::write(&file, text).unwrap();
    file
}

fn json_at(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn rerun_stats<'a>(doc: &'a Value, id: &str) -> &'a Value {
    doc["rerun"]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no {id} in the rerun report"))
}

#[test]
fn rerun_finds_a_check_that_fails_every_other_time_flaky_and_a_mark_turns_it_flaky() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    common::image_dir_with_cmdline(&images, "");
    let cluster = common::one_node_cluster(tmp.path(), &images);
    let c = cluster.to_str().unwrap();
    let state = tmp.path().join("state");
    let artifacts = tmp.path().join("artifacts");
    let a = artifacts.to_str().unwrap();
    let _stop = StopOnDrop(&state, &cluster);
    let out = common::run(&state, &["--cluster", c, "start", "--accel", "tcg"]);
    assert_eq!(out.status.code(), Some(0), "start");
    let (port, count) = alternating_server();

    // 1. rerun --times 4: `even` passes in runs 2 and 4 only.
    let lane = lane_file(tmp.path(), port, "");
    let t = std::time::Instant::now();
    let out = common::run(
        &state,
        &[
            "--cluster",
            c,
            "rerun",
            "--lane-file",
            lane.to_str().unwrap(),
            "--times",
            "4",
            "--artifacts",
            a,
            "--json",
        ],
    );
    eprintln!("rerun --times 4 took {:.0} s", t.elapsed().as_secs_f64());
    assert_eq!(out.status.code(), Some(1), "a flaky check exits 1");
    assert_eq!(count.load(Ordering::SeqCst), 4, "one tick per run");
    let doc: Value = serde_json::from_slice(&out.stdout).expect("--json prints the report");
    let root = artifacts.join("rerun-alternating/latest");
    assert_eq!(
        json_at(&root.join("result.json")),
        doc,
        "result.json is what --json printed"
    );
    assert_eq!(doc["command"], "rerun");
    assert_eq!(doc["rerun"]["runs"].as_array().unwrap().len(), 4);
    // `started` is when the runs began: finished - started spans the
    // duration (it once held the end of the runs, a few ms before finished).
    let at = |k: &str| chrono::DateTime::parse_from_rfc3339(doc[k].as_str().unwrap()).unwrap();
    let span = (at("finished") - at("started")).as_seconds_f64();
    let duration = doc["duration_s"].as_f64().unwrap();
    assert!(
        span >= duration - 1.0,
        "{span} s from started to finished, duration {duration} s"
    );
    let even = rerun_stats(&doc, "even@solo");
    assert_eq!(even["verdict"], "flaky", "{even}");
    assert_eq!(
        even["outcomes"],
        serde_json::json!(["fail", "pass", "fail", "pass"])
    );
    assert_eq!(
        (even["passes"].as_u64(), even["failures"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(even["pass_rate"].as_f64(), Some(0.5));
    // Both outcomes' evidence, each in its own run's artifacts.
    let failing = &even["failing"];
    let passing = &even["passing"];
    assert_eq!(
        (failing["run"].as_u64(), passing["run"].as_u64()),
        (Some(1), Some(2))
    );
    let failed_ev = json_at(&root.join(failing["artifact"].as_str().unwrap()));
    let passed_ev = json_at(&root.join(passing["artifact"].as_str().unwrap()));
    assert_eq!(failed_ev["outcome"], "fail");
    assert_eq!(
        failed_ev["evidence"]["exit"], 22,
        "curl -f on the 500: {failed_ev}"
    );
    assert_eq!(passed_ev["outcome"], "pass");
    assert_eq!(passed_ev["evidence"]["stdout"], "even 2");
    let tick = rerun_stats(&doc, "tick@solo");
    assert_eq!(
        (tick["verdict"].as_str(), tick["pass_rate"].as_f64()),
        (Some("pass"), Some(1.0))
    );
    assert!(
        tick["duration_s"]["min"].as_f64().unwrap() <= tick["duration_s"]["max"].as_f64().unwrap()
    );
    let html = std::fs::read_to_string(root.join("report.html")).unwrap();
    assert!(
        html.contains("id=\"rerun\"") && html.contains("run-1/evidence/even.json"),
        "report.html has the rerun section"
    );
    let printed = String::from_utf8_lossy(&out.stderr);
    assert!(
        printed.contains("even@solo") && printed.contains("failing: run 1"),
        "{printed}"
    );

    // 2. A mark: the cluster runs restored from the `rerun` snapshot, so a
    // failure goes back to it and the lane runs again: fail, then pass.
    let marked = lane_file(
        tmp.path(),
        port,
        "flaky = { reason = \"alternates on purpose\", reruns = 1 }",
    );
    let out = common::run(
        &state,
        &[
            "--cluster",
            c,
            "smoke",
            "--lane-file",
            marked.to_str().unwrap(),
            "--artifacts",
            a,
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "a declared flaky check does not fail the lane"
    );
    assert_eq!(
        count.load(Ordering::SeqCst),
        6,
        "the lane ran twice: tick 5 (odd) and 6"
    );
    let run = artifacts.join("alternating/latest");
    let result = json_at(&run.join("result.json"));
    assert_eq!(result["status"], "flaky");
    let even = common::check(&result, "even@solo");
    assert_eq!(even["outcome"], "flaky", "{even}");
    assert_eq!(even["flaky"]["reason"], "alternates on purpose");
    let failures = even["flaky"]["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0]["evidence"]["stdout"], "", "{failures:?}");
    assert!(
        even["flaky"]["resets"][0]
            .as_str()
            .unwrap()
            .starts_with("restored snapshot \"rerun\""),
        "{even}"
    );
    let junit = std::fs::read_to_string(run.join("junit.xml")).unwrap();
    assert!(junit.contains("<flakyFailure"), "{junit}");
    assert!(
        junit.contains("name=\"outcome\" value=\"flaky\""),
        "{junit}"
    );
    let html = std::fs::read_to_string(run.join("report.html")).unwrap();
    assert!(html.contains("check flaky") && html.contains("marked flaky: alternates on purpose"));
}

/// A mark without a reason, or with no reruns, is refused before anything
/// starts: exit 2, naming the lane file's line. No guest needed.
#[test]
fn a_flaky_mark_without_a_reason_is_refused_at_its_line() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let one_node = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/one-node.toml");
    let c = one_node.to_str().unwrap();
    for (mark, says) in [
        ("flaky = { reruns = 2 }", "reason"),
        ("flaky = { reason = \"r\", reruns = 0 }", "reruns = 0"),
    ] {
        let lane = lane_file(tmp.path(), 1, mark);
        let l = lane.to_str().unwrap();
        for cmd in ["smoke", "rerun"] {
            let mut args = vec!["--cluster", c, cmd, "--lane-file", l];
            if cmd == "rerun" {
                args.extend(["--times", "2"]);
            }
            let out = common::run(&state, &args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{cmd} {mark}: {err}");
            assert!(
                err.contains(&format!("{l}:17:")) && err.contains(says),
                "{cmd} {mark}: {err}"
            );
        }
    }
    // --times must be 1..100, and rerun needs a running cluster.
    let out = common::run(&state, &["--cluster", c, "rerun", "--times", "0"]);
    assert_eq!(out.status.code(), Some(2));
    let lane = lane_file(tmp.path(), 1, "");
    let l = lane.to_str().unwrap();
    let out = common::run(
        &state,
        &["--cluster", c, "rerun", "--lane-file", l, "--times", "2"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no cluster is running"));
}
