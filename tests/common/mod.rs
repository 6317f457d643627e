//! Helpers shared by the end-to-end tests: run the real binary against a
//! state directory that persists across the run (so images build once).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_photon-cluster"))
}

/// The state directory the e2e tests share: `$PHOTON_TEST_STATE_DIR`, or
/// `target/e2e-state` next to the build.
pub fn state_dir() -> PathBuf {
    std::env::var_os("PHOTON_TEST_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/e2e-state"))
}

/// Runs the binary with `args` against `state`, echoing its output.
pub fn run(state: &Path, args: &[&str]) -> Output {
    let out = bin()
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .expect("spawning photon-cluster");
    echo(args, out)
}

/// Prints a finished command and its output to the test log; passes it on.
pub fn echo(args: &[&str], out: Output) -> Output {
    eprintln!(
        "$ photon-cluster {} -> {:?}\n{}{}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Pids of QEMU processes whose command line mentions `needle`.
pub fn qemu_pids_mentioning(needle: &str) -> Vec<i32> {
    pids_mentioning("qemu-system", needle)
}

/// Live processes whose command line contains both `program` and `needle`.
pub fn pids_mentioning(program: &str, needle: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
        if cmd.contains(program) && cmd.contains(needle) && !zombie {
            pids.push(pid);
        }
    }
    pids
}

/// The reference profile's Debian image directory, built (or found cached)
/// in the shared e2e state directory.
pub fn reference_images() -> PathBuf {
    let out = run(&state_dir(), &["build"]);
    assert_eq!(out.status.code(), Some(0), "build");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let rootfs = stdout
        .lines()
        .find_map(|l| l.strip_prefix("rootfs"))
        .expect("build prints the rootfs path")
        .trim();
    Path::new(rootfs).parent().unwrap().to_path_buf()
}

/// A check of a result.json by id, from any layer.
pub fn check<'a>(result: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    result["layers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|l| l["checks"].as_array().unwrap())
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no check {id} in result.json"))
}
