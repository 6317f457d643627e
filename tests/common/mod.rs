//! Helpers shared by the end-to-end tests: run the real binary against a
//! state directory that persists across the run (so images build once).

#![allow(dead_code)]

pub mod browser;

use std::fs;
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

/// The sockets process `pid` listens on (TCP) or has bound (UDP), as
/// `tcp 127.0.0.1:2222`, read from /proc: its fds' socket inodes matched
/// against its network namespace's socket tables.
pub fn bound_sockets(pid: i32) -> Vec<String> {
    let mut inodes = std::collections::HashSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            let t = target.to_string_lossy().to_string();
            if let Some(i) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                inodes.insert(i.to_string());
            }
        }
    }
    let mut out = Vec::new();
    for table in ["tcp", "tcp6", "udp", "udp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || !inodes.contains(f[9]) {
                continue;
            }
            // TCP: only listening sockets (state 0A); UDP: every bound one.
            if table.starts_with("tcp") && f[3] != "0A" {
                continue;
            }
            out.push(format!("{} {}", &table[..3], decode_addr(f[1])));
        }
    }
    out
}

/// `0100007F:08AE` -> `127.0.0.1:2222`; IPv6 addresses in their hex form.
fn decode_addr(hex: &str) -> String {
    let (ip, port) = hex.split_once(':').unwrap_or((hex, "0"));
    let port = u16::from_str_radix(port, 16).unwrap_or(0);
    if ip.len() == 8 {
        let n = u32::from_str_radix(ip, 16).unwrap_or(0);
        let b = n.to_le_bytes();
        format!("{}.{}.{}.{}:{port}", b[0], b[1], b[2], b[3])
    } else {
        format!("[{ip}]:{port}")
    }
}

/// The secrets of the cluster in `state`, read here independently of the
/// driver: the IAM and S3 secrets, and every base64 line of the client key
/// and of each node's host key.
pub fn secret_needles(state: &Path) -> Vec<String> {
    let mut needles = Vec::new();
    for file in ["ssh/iam-secret", "ssh/s3-secret"] {
        if let Ok(s) = std::fs::read_to_string(state.join(file)) {
            needles.push(s.trim().to_string());
        }
    }
    let mut keys = vec![state.join("ssh/id_ed25519")];
    // Node directories sit in the state directory itself (<state>/<node>/).
    for n in std::fs::read_dir(state).into_iter().flatten().flatten() {
        keys.push(n.path().join("config/ssh_host_ed25519_key"));
    }
    for k in keys {
        let text = std::fs::read_to_string(&k).unwrap_or_default();
        needles.extend(
            text.lines()
                .filter(|l| !l.starts_with("-----") && l.len() >= 12)
                .map(String::from),
        );
    }
    needles
}

/// Every file under `dir` (following no links) that contains one of
/// `needles`, as `path: needle`.
pub fn files_containing(dir: &Path, needles: &[String]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                todo.push(e.path());
            } else if ft.is_file() {
                let bytes = std::fs::read(e.path()).unwrap_or_default();
                let text = String::from_utf8_lossy(&bytes);
                for n in needles.iter().filter(|n| text.contains(n.as_str())) {
                    hits.push(format!("{}: {}", e.path().display(), &n[..8.min(n.len())]));
                }
            }
        }
    }
    hits
}

/// Files under `dir` that others may write (mode o+w).
pub fn world_writable(dir: &Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut bad = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            if m.file_type().is_symlink() {
                continue;
            }
            if m.permissions().mode() & 0o002 != 0 {
                bad.push(e.path().display().to_string());
            }
            if m.is_dir() {
                todo.push(e.path());
            }
        }
    }
    bad
}

/// An image directory whose node `solo` boots the reference image with
/// extra kernel arguments (image::dir: `<dir>/<node>/` with a `cmdline`).
pub fn image_dir_with_cmdline(dir: &Path, cmdline: &str) {
    let images = reference_images();
    fs::create_dir_all(dir.join("solo")).unwrap();
    for f in ["vmlinuz", "initrd.img", "rootfs.img"] {
        let to = dir.join("solo").join(f);
        let _ = fs::remove_file(&to);
        std::os::unix::fs::symlink(images.join(f), &to).unwrap();
    }
    fs::write(dir.join("solo/cmdline"), cmdline).unwrap();
}

pub fn one_node_cluster(dir: &Path, images: &Path) -> std::path::PathBuf {
    one_node_cluster_with(dir, images, "")
}

/// The one-node cluster with `node` lines replacing its node's `units`.
pub fn one_node_cluster_with(dir: &Path, images: &Path, node: &str) -> std::path::PathBuf {
    let mut text = include_str!("../fixtures/one-node.toml").replace(
        "provider = \"debian\"\nsuite = \"bookworm\"",
        &format!("provider = \"prebuilt\"\ndir = \"{}\"", images.display()),
    );
    if !node.is_empty() {
        text = text.replace("units = [\"ssh.service\"]", node);
    }
    let file = dir.join("cluster.toml");
    fs::write(&file, text).unwrap();
    file
}

/// A small tmpfs mounted at a directory (created if missing) for as long
/// as it lives: a disk that fills up on purpose. Needs root, as CI has.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "photon-full"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(
            mounted.success(),
            "mount a {size} tmpfs at {}",
            dir.display()
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Runs the binary with `args` until it exits with `code`, for at most
/// `within`: a condition that follows a fault, a heal or a restore is
/// waited for, never asserted on a single try. Returns the seconds it took
/// (printed to the test log); panics with the last output at the deadline.
pub fn run_until(state: &Path, args: &[&str], code: i32, within: std::time::Duration) -> f64 {
    let t = std::time::Instant::now();
    loop {
        let out = run(state, args);
        if out.status.code() == Some(code) {
            let secs = t.elapsed().as_secs_f64();
            eprintln!("`{}` exited {code} after {secs:.1} s", args.join(" "));
            return secs;
        }
        assert!(
            t.elapsed() < within,
            "`{}` did not exit {code} within {} s: {out:?}",
            args.join(" "),
            within.as_secs()
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// The names of a result.json's layers, in order.
pub fn layer_names(result: &serde_json::Value) -> Vec<&str> {
    result["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect()
}
