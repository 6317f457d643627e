//! One QEMU process per node: launching it, watching it, stopping it, and
//! choosing the accelerator it runs under.

pub mod accel;
pub mod cmdline;
pub mod qmp;

pub use cmdline::{Accel, MachineConfig, qemu_args};

use crate::error::ErrorKind;
use anyhow::{Context, Result};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const QEMU: &str = "qemu-system-x86_64";

/// Launches QEMU for one node. QEMU gets its own process group, so a Ctrl-C
/// in the terminal reaches the driver (which tears down in order) and not
/// the guests directly; it outlives `start` on purpose.
pub fn launch(config: &MachineConfig, qemu_log: &Path) -> Result<Child> {
    launch_args(&config.name, &qemu_args(config), qemu_log)
}

/// Launches QEMU with a command line built earlier (a node's restart).
pub fn launch_args(name: &str, args: &[String], qemu_log: &Path) -> Result<Child> {
    tracing::debug!("{name}: {QEMU} {}", args.join(" "));
    let log = File::create(qemu_log).with_context(|| format!("creating {}", qemu_log.display()))?;
    let mut child = Command::new(QEMU)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("{name}: spawning {QEMU} {}", args.join(" ")))?;
    // Until the child has exec'd, its /proc cmdline is still ours, and
    // `is_running` would call a starting QEMU dead (the "QEMU exited during
    // boot" at 0.0 s with empty logs, seen now and then).
    let pid = child.id() as i32;
    let t = std::time::Instant::now();
    while !is_running(pid) && t.elapsed() < Duration::from_secs(5) {
        if child.try_wait()?.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(child)
}

/// Whether `pid` is a live QEMU process (not a zombie, not a reused pid).
pub fn is_running(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Field 3, after the parenthesised command name, is the state.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().next());
    let cmd = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    state != Some("Z") && String::from_utf8_lossy(&cmd).contains("qemu-system")
}

/// Asks the guest to power down over QMP, waits up to `grace`, then kills.
/// Returns a note on how it ended, for the user.
pub fn stop(pid: i32, qmp_socket: &Path, grace: Duration) -> String {
    if !is_running(pid) {
        return "not running".into();
    }
    let asked = qmp::Qmp::connect(qmp_socket, Duration::from_secs(5))
        .and_then(|mut q| q.execute("system_powerdown"))
        .is_ok();
    if asked && wait_exit(pid, grace) {
        return "powered down".into();
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    if wait_exit(pid, Duration::from_secs(5)) {
        return if asked {
            format!("terminated after {} s powerdown deadline", grace.as_secs())
        } else {
            "terminated (QMP unreachable)".into()
        };
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    wait_exit(pid, Duration::from_secs(5));
    "killed".into()
}

/// Kills at once; used when tearing down after a failure or Ctrl-C.
pub fn kill_now(pid: i32) {
    if is_running(pid) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        wait_exit(pid, Duration::from_secs(5));
    }
}

fn wait_exit(pid: i32, within: Duration) -> bool {
    // Stopping is what a Ctrl-C asks for: this wait goes on through it.
    crate::wait::Wait::new(format!("QEMU pid {pid} to exit"), within)
        .through_interrupt()
        .pause(crate::wait::Pause::Every(Duration::from_millis(100)))
        .run(|| {
            Ok(if is_running(pid) {
                crate::wait::Probe::Pending("still running".into())
            } else {
                crate::wait::Probe::Done(())
            })
        })
        .is_ok()
}

/// The last `n` non-empty lines of a console log, for error messages.
pub fn console_tail(log: &Path, n: usize) -> String {
    let bytes = fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The error for a guest whose QEMU ended while it booted (`during` says
/// when: "boot", "the restart"), named `kernel_panic` when the console
/// shows one and `qemu_exited` otherwise, with qemu.log and the console
/// diagnosis in its message.
pub fn boot_death(node: &str, during: &str, dir: &Path) -> anyhow::Error {
    let qemu_log = fs::read_to_string(dir.join("qemu.log")).unwrap_or_default();
    let console = console_diagnosis(&dir.join("vm.log"));
    let kind = if console.starts_with("kernel panic") {
        ErrorKind::KernelPanic
    } else {
        ErrorKind::QemuExited
    };
    crate::error::named(
        kind,
        anyhow::anyhow!(
            "{node}: QEMU exited during {during}; qemu.log: {}; {console}",
            qemu_log.trim()
        ),
    )
}

/// A guest that QEMU paused because a disk write failed (QEMU's default
/// for ENOSPC is to stop the VM, so a full state disk shows as a guest
/// that hangs): the error, named `disk_full` when the overlay's disk has
/// no room left. None while the guest runs or QMP does not answer.
pub fn disk_stall(node: &str, dir: &Path) -> Option<anyhow::Error> {
    let mut q = qmp::Qmp::connect(&dir.join("qmp.sock"), Duration::from_secs(2)).ok()?;
    if q.status().ok()? != "io-error" {
        return None;
    }
    let overlay = dir.join("overlay.qcow2");
    let free = nix::sys::statvfs::statvfs(dir)
        .map(|s| s.blocks_available() * s.fragment_size())
        .unwrap_or(0);
    let full = free < 64 << 20;
    let e = anyhow::anyhow!(
        "{node}: QEMU paused the guest on a disk write error{}: {} ({free} bytes free there); \
         free space on that disk and start again",
        if full {
            " (No space left on device)"
        } else {
            ""
        },
        overlay.display()
    );
    Some(if full {
        crate::error::named(ErrorKind::DiskFull, e)
    } else {
        e
    })
}

/// Why a guest's console says it died: the kernel panic line and the
/// first lines of the call trace after it, found by scanning the whole
/// console (its last lines are usually a register dump). Falls back to the
/// last lines when the console shows no panic.
pub fn console_diagnosis(log: &Path) -> String {
    let bytes = fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).collect();
    let Some(at) = lines
        .iter()
        .position(|l| l.contains("Kernel panic - not syncing"))
    else {
        return format!("last console lines:\n{}", console_tail(log, 12));
    };
    let mut out = vec![lines[at].trim().to_string()];
    // The trace is printed before the panic line on most kernels, after it
    // on some: take the first `Call Trace:` block on either side.
    let trace = lines[at..]
        .iter()
        .position(|l| l.contains("Call Trace:"))
        .map(|i| at + i)
        .or_else(|| lines[..at].iter().rposition(|l| l.contains("Call Trace:")));
    if let Some(t) = trace {
        out.extend(lines[t..].iter().take(7).map(|l| l.trim().to_string()));
    }
    format!("kernel panic on the console:\n{}", out.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_panic_line_and_trace_are_found_not_the_register_dump() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("vm.log");
        let mut console = String::from("[    0.1] booting\r\n");
        console.push_str("[    1.2] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\r\n");
        console.push_str("[    1.2] CPU: 0 PID: 1 Comm: swapper/0\n[    1.2] Call Trace:\n[    1.2]  <TASK>\n[    1.2]  dump_stack_lvl+0x44/0x5c\n[    1.2]  panic+0x118/0x2ed\n");
        for i in 0..30 {
            console.push_str(&format!("[    1.3] R{i:02}: 0000000000000000\n"));
        }
        fs::write(&p, console).unwrap();
        let d = console_diagnosis(&p);
        assert!(
            d.contains("Kernel panic - not syncing: VFS: Unable to mount root fs"),
            "{d}"
        );
        assert!(
            d.contains("Call Trace:") && d.contains("dump_stack_lvl"),
            "{d}"
        );
        assert!(!d.contains("R29"), "{d}");
        fs::write(&p, "a\nb\n").unwrap();
        assert_eq!(console_diagnosis(&p), "last console lines:\na\nb");
    }

    #[test]
    fn console_tail_keeps_the_last_lines() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("vm.log");
        fs::write(&p, "a\r\n\nb\nc\n").unwrap();
        assert_eq!(console_tail(&p, 2), "b\nc");
    }

    #[test]
    fn our_own_pid_is_not_a_qemu() {
        assert!(!is_running(std::process::id() as i32));
        assert!(!is_running(0));
    }
}
