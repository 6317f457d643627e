//! End to end: real QEMU guests of the reference cluster, booted once and
//! shared by every assertion here (boot is the expensive part).
//!
//! Images are built (or found cached) in the shared test state directory.

mod common;

use serde_json::Value;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Ctrl-C during `start` tears every QEMU down and exits 130.
fn interrupt_during_start_leaves_nothing(state: &Path) {
    let mut child = common::bin()
        .arg("--state-dir")
        .arg(state)
        .arg("start")
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let needle = state.to_str().unwrap();
    let t = Instant::now();
    while common::qemu_pids_mentioning(needle).len() < 6 {
        assert!(t.elapsed() < Duration::from_secs(120), "QEMU never started");
        assert!(child.try_wait().unwrap().is_none(), "start exited early");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "start ignored Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(130), "interrupted start exits 130");
    assert_eq!(
        common::qemu_pids_mentioning(needle),
        Vec::<i32>::new(),
        "no QEMU may survive an interrupted start"
    );
    assert!(!state.join("cluster.json").exists());
}

#[test]
fn reference_cluster_boots_answers_and_stops_clean() {
    let state = common::state_dir();
    let needle = state.to_str().unwrap().to_string();
    assert_eq!(
        common::run(&state, &["build"]).status.code(),
        Some(0),
        "build"
    );
    // A cluster left over from an aborted earlier run must not leak into this one.
    common::run(&state, &["stop", "--grace", "5"]);

    interrupt_during_start_leaves_nothing(&state);

    let t = Instant::now();
    let out = common::run(&state, &["start"]);
    assert_eq!(out.status.code(), Some(0), "start");
    eprintln!("boot-to-ready: {:.1} s", t.elapsed().as_secs_f64());

    let out = common::run(&state, &["status", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    let nodes = status["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 6);
    for n in nodes {
        assert_eq!(n["state"], "ready", "node not ready: {n}");
        assert!(
            n["units"]
                .as_object()
                .unwrap()
                .values()
                .all(|s| s == "active"),
            "{n}"
        );
    }
    let accel = &status["accel"];
    if accel["used"] == "tcg" && Path::new("/dev/kvm").exists() && accel["requested"] == "auto" {
        assert!(
            accel["fallback_reason"].is_string(),
            "a fallback from KVM must say why: {accel}"
        );
    }

    // One state directory, one cluster: a second start is refused untouched.
    let again = common::run(&state, &["start"]);
    assert_eq!(again.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("in use by another")
            || String::from_utf8_lossy(&again.stderr).contains("already running")
    );

    let out = common::run(&state, &["ssh", "node04", "systemctl", "is-system-running"]);
    let answer = stdout(&out);
    assert!(
        ["running", "degraded", "starting"].contains(&answer.trim()),
        "systemctl answered: {answer:?}"
    );

    // The fabric: names resolve and the L2 segment carries traffic between guests.
    let out = common::run(
        &state,
        &[
            "ssh",
            "node04",
            "getent hosts node06 && ping -c 2 -W 5 node06",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "node04 reaches node06 over the fabric"
    );
    assert!(stdout(&out).contains("10.77.0.16"));
    let out = common::run(&state, &["ssh", "node06", "hostname"]);
    assert_eq!(stdout(&out).trim(), "node06");
    let out = common::run(&state, &["ssh", "node01", "exit 7"]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "ssh passes on the remote exit code"
    );

    let out = common::run(&state, &["stop"]);
    assert_eq!(out.status.code(), Some(0), "stop");
    assert_eq!(
        common::qemu_pids_mentioning(&needle),
        Vec::<i32>::new(),
        "no QEMU may remain after stop"
    );
    assert!(!state.join("cluster.json").exists());
    for n in nodes {
        let log = state
            .join("nodes")
            .join(n["name"].as_str().unwrap())
            .join("vm.log");
        assert!(
            std::fs::metadata(&log).unwrap().len() > 0,
            "{} kept",
            log.display()
        );
    }
}
