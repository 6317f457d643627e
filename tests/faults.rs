//! Faults of the guests themselves, each reported as a named error within
//! its deadline with the evidence that explains it. One small guest each.

mod common;

use std::fs;
use std::path::Path;

/// Stops whatever a test started, also when an assertion fails first.
struct StopOnDrop<'a>(&'a Path, &'a Path);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        let cluster = self.1.to_str().unwrap();
        common::run(self.0, &["--cluster", cluster, "stop", "--grace", "1"]);
    }
}

/// A guest whose kernel panics: `start` fails (exit 3) and its error quotes
/// the panic line and the call trace, found by scanning the console, not
/// the register dump at its end. Nothing is left running.
#[test]
fn a_guest_kernel_panic_is_reported_with_its_panic_line() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    // No init in the initramfs: the kernel mounts the root itself, has no
    // virtio driver for it (a module), and panics ("VFS: Unable to mount
    // root fs").
    common::image_dir_with_cmdline(&images, "rdinit=/nonexistent root=/dev/vdz");
    let cluster = common::one_node_cluster(tmp.path(), &images);
    let state = tmp.path().join("state");
    let _stop = StopOnDrop(&state, &cluster);
    let out = common::run(
        &state,
        &[
            "--cluster",
            cluster.to_str().unwrap(),
            "start",
            "--accel",
            "tcg",
            "--ready-timeout",
            "300",
        ],
    );
    assert_eq!(out.status.code(), Some(3), "an infrastructure failure");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("QEMU exited during boot"), "{err}");
    assert!(err.contains("Kernel panic - not syncing"), "{err}");
    assert!(err.contains("Call Trace:"), "{err}");
    let needle = state.to_str().unwrap();
    assert_eq!(common::qemu_pids_mentioning(needle), Vec::<i32>::new());
}

/// Starts the one-node cluster of `tmp` with extra kernel arguments, node
/// lines, and extra arguments before and after `start`. Returns the output,
/// the seconds it took, and the state directory; a failed start must leave
/// no QEMU behind.
fn start_one(
    tmp: &Path,
    cmdline: &str,
    node: &str,
    before: &[&str],
    after: &[&str],
) -> (std::process::Output, f64, std::path::PathBuf) {
    // Over the agent, as these faults were last run; the sshd fault is SSH's.
    start_one_over(tmp, "agent", cmdline, node, (before, after))
}

/// [`start_one`] with the cluster's `channel` given.
fn start_one_over(
    tmp: &Path,
    channel: &str,
    cmdline: &str,
    node: &str,
    (before, after): (&[&str], &[&str]),
) -> (std::process::Output, f64, std::path::PathBuf) {
    let images = tmp.join("images");
    common::image_dir_with_cmdline(&images, cmdline);
    let cluster = common::one_node_cluster_with(tmp, &images, node);
    let text = std::fs::read_to_string(&cluster).unwrap();
    let text = text.replace(
        "[cluster]\n",
        &format!("[cluster]\nchannel = \"{channel}\"\n"),
    );
    std::fs::write(&cluster, text).unwrap();
    let state = tmp.join("state");
    let _stop = StopOnDrop(&state, &cluster);
    let mut args = vec!["--cluster", cluster.to_str().unwrap()];
    args.extend_from_slice(before);
    args.extend_from_slice(&["start", "--accel", "tcg"]);
    args.extend_from_slice(after);
    let t = std::time::Instant::now();
    let out = common::run(&state, &args);
    let secs = t.elapsed().as_secs_f64();
    if out.status.code() != Some(0) {
        assert_eq!(
            common::qemu_pids_mentioning(state.to_str().unwrap()),
            Vec::<i32>::new(),
            "a failed start leaves no QEMU"
        );
    }
    drop(_stop);
    (out, secs, state.clone())
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// sshd masked on a cluster driven over SSH: the guest boots but never
/// answers. `start` ends at its ready timeout with `error[ssh_unreachable]`
/// and the console tail.
#[test]
fn sshd_that_never_comes_up_is_named_at_the_ready_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let cmdline = "systemd.mask=ssh.service systemd.mask=ssh.socket";
    // The console has lines within seconds; the timeout only has to pass.
    // Over SSH only: through the agent the same fault is ssh.service not
    // active, the units' timeout.
    let timeout: &[&str] = &["--ready-timeout", "45"];
    let (out, secs, _) = start_one_over(tmp.path(), "ssh", cmdline, "", (&[], timeout));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("error[ssh_unreachable]"), "{err}");
    assert!(err.contains("not reachable after"), "{err}");
    assert!(err.contains("last console lines"), "{err}");
    assert!(secs < 45.0 + 60.0, "reported {secs:.0} s after start");
    eprintln!("sshd never up: reported after {secs:.1} s");
}

/// An expected unit that fails while the node boots: `start` fails at
/// once (not at the ready timeout) with `error[unit_failed]`, the unit's
/// name and its journal tail. The unit is systemd's own
/// kernel-command-line.service, made to run `/bin/false` by the kernel
/// arguments (systemd-run-generator, systemd-debug-generator).
#[test]
fn a_unit_that_fails_at_boot_is_named_with_its_journal() {
    let tmp = tempfile::tempdir().unwrap();
    // systemd.run makes its unit the default target; systemd.unit puts
    // the normal boot back, and systemd.wants pulls the unit in beside it.
    let cmdline = "systemd.run=/bin/false systemd.run_success_action=none \
                   systemd.run_failure_action=none systemd.unit=multi-user.target \
                   systemd.wants=kernel-command-line.service";
    let units = "units = [\"ssh.service\", \"kernel-command-line.service\"]";
    let (out, secs, _) = start_one(tmp.path(), cmdline, units, &[], &["--ready-timeout", "600"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("error[unit_failed]"), "{err}");
    assert!(
        err.contains("unit kernel-command-line.service failed; its journal ends"),
        "{err}"
    );
    assert!(
        secs < 400.0,
        "a failed unit ends the wait at once ({secs:.0} s)"
    );
    eprintln!("unit failed at boot: reported after {secs:.1} s");
}

/// A pinned host port that another process holds: refused before any
/// QEMU starts, exit 2, `error[port_taken]`, naming the port.
#[test]
fn a_host_port_taken_at_start_is_refused_before_anything_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let units = format!(
        "units = [\"ssh.service\"]\nforward = [{{ name = \"web\", guest = 80, host = {port} }}]"
    );
    let (out, secs, _) = start_one(tmp.path(), "", &units, &[], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("error[port_taken]"), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{port}/tcp")), "{err}");
    assert!(secs < 30.0, "refused at once ({secs:.1} s)");
    drop(holder);
}

/// The global --timeout expiring during `start`: the boot is given up,
/// every QEMU stopped, `error[timeout]`, exit 124. The node waits for a
/// unit that never becomes active, so that the timeout is what ends the
/// start however fast the guest boots (a one-node start once took longer
/// than 15 s; over the agent it is ready in 13 s).
#[test]
fn the_global_timeout_ends_a_start_with_exit_124() {
    let tmp = tempfile::tempdir().unwrap();
    let units = "units = [\"ssh.service\", \"photon-never-active.service\"]";
    let (out, secs, _) = start_one(tmp.path(), "", units, &["--timeout", "15"], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(124), "{err}");
    assert!(err.contains("error[timeout]"), "{err}");
    assert!(secs < 15.0 + 45.0, "stopped {secs:.0} s after start");
    eprintln!("--timeout 15 during start: exited after {secs:.1} s");
}

/// The state directory's disk full at start (a 1 MiB tmpfs): `start`
/// fails with `error[disk_full]`, names what it could not write, and
/// leaves no QEMU. Needs root for the mount, as CI has.
#[test]
fn a_full_state_disk_at_start_is_named() {
    if !nix_is_root() {
        eprintln!("SKIPPED: mounting a tmpfs needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // The one-node profile's state suffix: the driver uses `state-one-node`.
    let state = tmp.path().join("state-one-node");
    let _full = common::Tmpfs::mount(&state, "1m");
    let (out, secs, _) = start_one(tmp.path(), "", "", &[], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("error[disk_full]"), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(
        err.contains(state.to_str().unwrap()),
        "names the path: {err}"
    );
    eprintln!("disk full at start: reported after {secs:.1} s");
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

/// QEMU killed in the middle of a lane: the check in progress and every
/// later check on that node fail at once (not at their 300 s deadlines),
/// each naming the dead QEMU, and the run ends `error[node_gone]`, exit 3,
/// with its artifacts.
#[test]
fn qemu_killed_mid_lane_fails_its_checks_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    common::image_dir_with_cmdline(&images, "");
    let cluster = common::one_node_cluster(tmp.path(), &images);
    let state = tmp.path().join("state");
    let _stop = StopOnDrop(&state, &cluster);
    let c = cluster.to_str().unwrap();
    let out = common::run(&state, &["--cluster", c, "start", "--accel", "tcg"]);
    assert_eq!(out.status.code(), Some(0), "start");
    let lane = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dies-mid-lane.toml");
    let root = tmp.path().join("artifacts");
    let t = std::time::Instant::now();
    let child = common::bin()
        .arg("--state-dir")
        .arg(&state)
        .args(["--cluster", c, "smoke", "--keep-going", "--lane-file"])
        .arg(&lane)
        .arg("--artifacts")
        .arg(&root)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Kill QEMU while the sleeper runs: wait until the guest shows it.
    common::run_until(
        &state,
        &["--cluster", c, "ssh", "solo", "pgrep -x sleep"],
        0,
        std::time::Duration::from_secs(180),
    );
    let pid: i32 = fs::read_to_string(tmp.path().join("state-one-node/solo/qemu.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let killed = t.elapsed().as_secs_f64();
    let out = common::echo(
        &["smoke", "--lane-file", "dies-mid-lane.toml"],
        child.wait_with_output().unwrap(),
    );
    let secs = t.elapsed().as_secs_f64() - killed;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains("error[node_gone]: QEMU is not running for solo"),
        "{summary}"
    );
    let result: serde_json::Value =
        serde_json::from_slice(&fs::read(root.join("dies-mid-lane/latest/result.json")).unwrap())
            .unwrap();
    assert_eq!(result["error_kind"], "node_gone", "{}", result["error"]);
    for id in ["sleeper@solo", "still-there@solo", "units@solo"] {
        let c = common::check(&result, id);
        assert_eq!(c["outcome"], "fail", "{c}");
        assert!(c["duration_s"].as_f64().unwrap() < 60.0, "{c}");
    }
    let later = common::check(&result, "still-there@solo");
    assert!(
        later["message"]
            .as_str()
            .unwrap()
            .contains("is not running"),
        "{later}"
    );
    assert!(secs < 60.0, "the lane ended {secs:.0} s after the kill");
    eprintln!("QEMU killed mid-lane: the lane ended {secs:.1} s after the kill");
}
