//! Python test scripts end to end on the one-node cluster: a passing script
//! with two subtests, a failing one with its evidence, a script that does
//! not parse (refused before anything starts), and a script as a lane check.

mod common;

use std::path::{Path, PathBuf};

struct StopOnDrop<'a>(&'a Path, &'a Path);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        let cluster = self.1.to_str().unwrap();
        common::run(self.0, &["--cluster", cluster, "stop", "--grace", "1"]);
    }
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/scripts")
        .join(name)
}

fn result(root: &Path, lane: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(root.join(lane).join("latest/result.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The subtest `name` of the script check `script`, a check of its own:
/// its kind, parent, outcome and origin (`file.py:LINE`) checked here.
fn subtest<'a>(
    res: &'a serde_json::Value,
    script: &str,
    name: &str,
    outcome: &str,
    line: u32,
) -> &'a serde_json::Value {
    let c = common::check(res, &format!("{script}/{name}"));
    assert_eq!(
        (&c["kind"], &c["part_of"], &c["outcome"]),
        (
            &serde_json::json!("subtest"),
            &serde_json::json!(script),
            &serde_json::json!(outcome)
        ),
        "{c:#}"
    );
    let origin = c["origin"].as_str().unwrap();
    assert!(origin.ends_with(&format!(".py:{line}")), "{c:#}");
    c
}

/// The ids of the result's checks, in order.
fn ids(res: &serde_json::Value) -> Vec<String> {
    res["layers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|l| l["checks"].as_array().unwrap())
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect()
}

/// A script that does not parse is refused with exit 2 and its file:line,
/// and nothing starts (no cluster runs here at all).
#[test]
fn a_script_that_does_not_parse_is_refused_with_its_line() {
    let tmp = tempfile::tempdir().unwrap();
    // No images: the script is refused before anything would need them.
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let cluster = common::one_node_cluster(tmp.path(), &images);
    let state = tmp.path().join("state");
    let bad = fixture("does-not-parse.py");
    let c = cluster.to_str().unwrap();
    let out = common::run(&state, &["--cluster", c, "script", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("does-not-parse.py:2"), "{err}");
    let missing = fixture("no-such-script.py");
    let out = common::run(
        &state,
        &["--cluster", c, "script", missing.to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("no-such-script.py: no such script"), "{err}");
    assert!(!tmp.path().join("artifacts").exists());
    assert_eq!(
        common::qemu_pids_mentioning(state.to_str().unwrap()),
        Vec::<i32>::new()
    );
}

/// One cluster for the three scripts that need it.
#[test]
fn scripts_pass_fail_with_evidence_and_run_as_lane_checks() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    common::image_dir_with_cmdline(&images, "");
    let cluster = common::one_node_cluster(tmp.path(), &images);
    let state = tmp.path().join("state");
    let _stop = StopOnDrop(&state, &cluster);
    let c = cluster.to_str().unwrap();
    let out = common::run(&state, &["--cluster", c, "start", "--accel", "tcg"]);
    assert_eq!(out.status.code(), Some(0), "start");
    let root = tmp.path().join("artifacts");
    let r = root.to_str().unwrap();

    let good = fixture("passes.py");
    let args = [
        "--cluster",
        c,
        "script",
        good.to_str().unwrap(),
        "--artifacts",
        r,
    ];
    let out = common::run(&state, &args);
    assert_eq!(out.status.code(), Some(0), "passing script");
    let res = result(&root, "passes");
    let check = common::check(&res, "passes");
    assert_eq!(check["outcome"], "pass", "{check:#}");
    let subs = check["evidence"]["subtests"].as_array().unwrap();
    assert_eq!(subs.len(), 2, "{check:#}");
    assert!(subs.iter().all(|s| s["passed"] == true));
    // Each subtest is a check of its own, right after the script's.
    let first = "ssh answers and files travel both ways";
    let second = "waits end when the condition holds";
    assert_eq!(
        ids(&res)[..3],
        [
            "passes".to_string(),
            format!("passes/{first}"),
            format!("passes/{second}")
        ],
        "{res:#}"
    );
    let sub = subtest(&res, "passes", first, "pass", 6);
    let steps = sub["evidence"]["steps"].as_array().unwrap();
    assert!(
        steps
            .iter()
            .any(|s| s["command"] == "hostname" && s["line"] == 8),
        "{steps:?}"
    );
    assert!(steps.iter().all(|s| s["seconds"].as_f64().is_some()));
    // Its time lies within the script check's, after the first subtest's.
    let later = subtest(&res, "passes", second, "pass", 19);
    let span = |c: &serde_json::Value| {
        let at = c["started_s"].as_f64().unwrap();
        (at, at + c["duration_s"].as_f64().unwrap())
    };
    let (script, (a0, a1), (b0, b1)) = (span(check), span(sub), span(later));
    assert!(
        script.0 <= a0 + 1e-6 && a1 <= b0 + 1e-3 && b1 <= script.1 + 0.01,
        "{script:?} {a0}..{a1} {b0}..{b1}"
    );
    assert!(
        b1 - b0 >= 1.9,
        "the second waits for a 2 s sleep: {later:#}"
    );

    let bad = fixture("fails.py");
    let args = [
        "--cluster",
        c,
        "script",
        bad.to_str().unwrap(),
        "--artifacts",
        r,
    ];
    let out = common::run(&state, &args);
    assert_eq!(out.status.code(), Some(1), "failing script");
    let res = result(&root, "fails");
    let check = common::check(&res, "fails");
    assert_eq!(check["outcome"], "fail", "{check:#}");
    let subs = check["evidence"]["subtests"].as_array().unwrap();
    assert_eq!(subs.len(), 2, "the third subtest never ran: {check:#}");
    subtest(&res, "fails", "first passes", "pass", 3);
    let failed = subtest(&res, "fails", "a missing file", "fail", 6);
    assert!(
        !ids(&res).contains(&"fails/never reached".to_string()),
        "{res:#}"
    );
    assert_eq!(res["layers"][0]["outcome"], "fail");
    let message = failed["message"].as_str().unwrap();
    assert!(message.contains("cat /no/such/file"), "{message}");
    let junit = std::fs::read_to_string(root.join("fails/latest/junit.xml")).unwrap();
    assert!(
        junit.contains("<testcase name=\"fails/first passes\"")
            && junit.contains("<testcase name=\"fails/a missing file\""),
        "{junit}"
    );
    let html = std::fs::read_to_string(root.join("fails/latest/report.html")).unwrap();
    assert!(
        html.contains("<td>fails/a missing file</td>") && html.contains("part-row"),
        "report.html lists it and draws its row"
    );
    let failed = &failed["evidence"];
    assert_eq!(failed["passed"], false);
    assert_eq!(failed["command"], "echo looking for it; cat /no/such/file");
    let output = failed["output"].as_str().unwrap();
    assert!(
        output.contains("looking for it") && output.contains("No such file"),
        "{output}"
    );
    let tb = failed["traceback"].as_str().unwrap();
    assert!(
        tb.contains("Traceback") && tb.contains("fails.py\", line 7"),
        "{tb}"
    );
    assert!(!failed["console_tail"].as_str().unwrap().is_empty());
    assert!(
        check["message"]
            .as_str()
            .unwrap()
            .contains("a missing file")
    );

    let lane = fixture("lane.toml");
    let args = [
        "--cluster",
        c,
        "smoke",
        "--lane-file",
        lane.to_str().unwrap(),
        "--artifacts",
        r,
    ];
    let out = common::run(&state, &args);
    assert_eq!(out.status.code(), Some(0), "lane with a script");
    let res = result(&root, "script-lane");
    assert_eq!(common::check(&res, "passes")["outcome"], "pass");
    subtest(
        &res,
        "passes",
        "ssh answers and files travel both ways",
        "pass",
        6,
    );
    subtest(
        &res,
        "passes",
        "waits end when the condition holds",
        "pass",
        19,
    );
    let scenario = &res["layers"][1];
    assert_eq!(
        (
            &scenario["name"],
            scenario["checks"].as_array().unwrap().len()
        ),
        (&serde_json::json!("scenario"), 3),
        "{scenario:#}"
    );
    let junit = std::fs::read_to_string(root.join("script-lane/latest/junit.xml")).unwrap();
    assert!(
        junit.contains("<testcase name=\"passes/waits end when the condition holds\""),
        "{junit}"
    );
    assert!(common::pids_mentioning("python3", "photon_machine").is_empty());

    // The global --timeout ends a script inside a wait: exit 124, the
    // python child killed, the run written out with the subtest it was in
    // as a failed check of its own, its steps as evidence.
    let slow = fixture("outlasts-timeout.py");
    let args = [
        "--timeout",
        "20",
        "--cluster",
        c,
        "script",
        slow.to_str().unwrap(),
        "--artifacts",
        r,
    ];
    let t = std::time::Instant::now();
    let out = common::run(&state, &args);
    assert_eq!(out.status.code(), Some(124), "timeout");
    assert!(t.elapsed().as_secs() < 60, "{:?}", t.elapsed());
    let res = result(&root, "outlasts-timeout");
    assert_eq!(res["status"], "timeout", "{res:#}");
    let script = common::check(&res, "outlasts-timeout");
    assert!(
        script["message"].as_str().unwrap().starts_with("stopped: "),
        "{script:#}"
    );
    let waiting = common::check(&res, "outlasts-timeout/waits forever");
    assert_eq!(waiting["outcome"], "fail", "{waiting:#}");
    let msg = waiting["message"].as_str().unwrap();
    assert!(msg.starts_with("stopped inside this subtest"), "{msg}");
    let step = &waiting["evidence"]["steps"][0];
    assert_eq!(step["op"], "wait_until", "{waiting:#}");
    assert!(common::pids_mentioning("python3", "photon_machine").is_empty());

    // snapshot_save and snapshot_restore: the cluster back in place.
    let snap = fixture("snapshot.py");
    let args = [
        "--cluster",
        c,
        "script",
        snap.to_str().unwrap(),
        "--artifacts",
        r,
    ];
    let out = common::run(&state, &args);
    assert_eq!(out.status.code(), Some(0), "snapshot script");
    let res = result(&root, "snapshot");
    let part = common::check(&res, "snapshot/a restore puts the cluster back to the save");
    let steps = part["evidence"]["steps"].as_array().unwrap();
    let restore = steps.iter().find(|s| s["op"] == "snapshot_restore");
    let restore = restore.unwrap_or_else(|| panic!("a snapshot_restore step: {part:#}"));
    eprintln!("snapshot_restore: {} s", restore["seconds"]);

    // --interactive: the same objects at a Python prompt, here fed from
    // stdin; Ctrl-D (the end of input) ends it and the command.
    use std::io::Write;
    let mut child = common::bin()
        .args(["--state-dir", state.to_str().unwrap()])
        .args(["--cluster", c, "script", "--interactive"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"print('hostname:', solo.succeed('hostname').strip())\nsolo.no_such_method()\n")
        .unwrap();
    drop(stdin);
    let out = common::echo(
        &["script", "--interactive"],
        child.wait_with_output().unwrap(),
    );
    assert_eq!(out.status.code(), Some(0), "the prompt ends at Ctrl-D");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("hostname: solo"),
        "a statement ran on the node"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("photon-cluster: solo"), "{err}");
    assert!(
        err.contains("AttributeError") && err.contains("no_such_method"),
        "an error at the prompt is shown, and the prompt goes on: {err}"
    );
    assert!(common::pids_mentioning("python3", "photon_machine").is_empty());
}

/// `script --fresh`: a cluster of its own, booted for the script and
/// stopped after it, with nothing left running.
#[test]
fn a_script_with_fresh_boots_its_own_cluster_and_stops_it() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    common::image_dir_with_cmdline(&images, "");
    let cluster = common::one_node_cluster(tmp.path(), &images);
    let state = tmp.path().join("state");
    let _stop = StopOnDrop(&state, &cluster);
    let c = cluster.to_str().unwrap();
    let artifacts = tmp.path().join("artifacts");
    let script = fixture("passes.py");
    let args = [
        "--cluster",
        c,
        "script",
        "--fresh",
        "--accel",
        "tcg",
        "--artifacts",
        artifacts.to_str().unwrap(),
        script.to_str().unwrap(),
    ];
    let out = common::run(&state, &args);
    assert_eq!(out.status.code(), Some(0), "script --fresh passes");
    let result = result(&artifacts, "passes");
    assert_eq!(result["command"], "script");
    assert_eq!(result["boot"]["mode"], "cold", "{}", result["boot"]);
    assert_eq!(
        common::qemu_pids_mentioning(state.to_str().unwrap()),
        Vec::<i32>::new(),
        "the script's own cluster is stopped"
    );
    let out = common::run(&state, &["--cluster", c, "status"]);
    assert_eq!(out.status.code(), Some(2), "no cluster left running");
}
