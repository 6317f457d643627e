//! Faults injected into a running cluster: network faults through the
//! fabric's switch (partition, heal, a degraded link, capture) and node
//! faults through QEMU (crash, pause, resume, restart).
//!
//! The same functions serve `photon-cluster fault ...` at the terminal and
//! the check kinds that write scenarios in lanes. Each refuses a node that
//! does not exist before changing anything (exit 2), and returns a sentence
//! saying what it did.

use crate::error::bad_input;
use crate::fabric::Segment;
use crate::fabric::switch::{LinkFault, Request, Status};
use crate::guest;
use crate::machine::{self, qmp::Qmp};
use crate::state::RunningCluster;
use anyhow::{Result, anyhow};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The cluster's switched segment, or why there is none.
fn segment(record: &RunningCluster) -> Result<&Segment> {
    record.fabric.as_ref().ok_or_else(|| {
        bad_input(
            "this cluster was started by an older driver on QEMU's multicast hub, \
             which cannot cut or capture; restart it",
        )
    })
}

/// Refuses a node name the running cluster does not have (exit 2).
fn known(record: &RunningCluster, node: &str) -> Result<()> {
    if record.nodes.contains_key(node) {
        return Ok(());
    }
    Err(bad_input(format!(
        "no node {node:?} in the running cluster (nodes: {})",
        record.nodes.keys().cloned().collect::<Vec<_>>().join(", ")
    )))
}

/// Splits the nodes into groups that cannot reach each other. A node in no
/// group keeps reaching every node.
pub fn partition(record: &RunningCluster, groups: &[Vec<String>]) -> Result<String> {
    if groups.len() < 2 {
        return Err(bad_input(
            "a partition needs at least two groups, e.g. `node01,node02 node03`",
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for node in groups.iter().flatten() {
        known(record, node)?;
        if !seen.insert(node) {
            return Err(bad_input(format!(
                "{node} is in two groups of the partition"
            )));
        }
    }
    segment(record)?.request(&Request::Partition {
        groups: groups.to_vec(),
    })?;
    Ok(format!(
        "partitioned the fabric: {}",
        groups
            .iter()
            .map(|g| g.join(","))
            .collect::<Vec<_>>()
            .join(" | ")
    ))
}

/// How long traffic across a healed cut may take to flow again. A guest
/// whose neighbour entry failed during the partition retries it within a
/// few seconds (measured here: up to about 2 s, in 1 heal of 5).
const HEAL_TRAFFIC: Duration = Duration::from_secs(30);

/// Undoes the partition and every link fault. A heal is done when traffic
/// flows: with a partition in place, this waits (through the one wait
/// helper) until every running node of it reaches every running node of
/// the other groups, and says how long that took.
pub fn heal(record: &RunningCluster) -> Result<String> {
    let seg = segment(record)?;
    let cut = seg.request(&Request::Status)?.partition.unwrap_or_default();
    seg.request(&Request::Heal)?;
    let said = "healed the fabric: every node reaches every node, no link faults";
    if cut.is_empty() {
        return Ok(said.into());
    }
    let secs = traffic_across(record, &cut, Instant::now() + HEAL_TRAFFIC)?;
    Ok(format!(
        "{said}; traffic across the old cut flowed after {secs:.1} s"
    ))
}

/// Waits until each running node of `groups` answers a ping from every
/// running node of the other groups: the seconds until the slowest did.
fn traffic_across(record: &RunningCluster, groups: &[Vec<String>], until: Instant) -> Result<f64> {
    let running = |n: &String| {
        record
            .nodes
            .get(n)
            .is_some_and(|r| machine::is_running(r.pid_now()))
    };
    std::thread::scope(|s| {
        let waits: Vec<_> = groups
            .iter()
            .enumerate()
            .flat_map(|(i, g)| g.iter().filter(|n| running(n)).map(move |n| (i, n)))
            .map(|(i, node)| {
                let peers: Vec<&str> = groups
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .flat_map(|(_, g)| g.iter().filter(|n| running(n)))
                    .map(|n| record.nodes[n].address.as_str())
                    .collect();
                s.spawn(move || -> Result<f64> {
                    let g = guest::connect(record, node)?;
                    let pings: Vec<String> = peers
                        .iter()
                        .map(|a| format!("ping -c 1 -W 1 -q {a} >/dev/null"))
                        .collect();
                    let (_, secs) =
                        g.exec_until(&pings.join(" && "), true, until, Duration::from_millis(200))?;
                    Ok(secs)
                })
            })
            .collect();
        waits
            .into_iter()
            .map(|h| h.join().expect("heal traffic thread"))
            .try_fold(0.0f64, |m, r| r.map(|s| m.max(s)))
    })
}

/// Degrades (or with the default, restores) the link of one node.
pub fn link(record: &RunningCluster, node: &str, fault: LinkFault) -> Result<String> {
    known(record, node)?;
    for (what, p) in [("loss", fault.loss), ("duplicate", fault.duplicate)] {
        if !(0.0..=1.0).contains(&p) {
            return Err(bad_input(format!("{what} must be between 0% and 100%")));
        }
    }
    segment(record)?.request(&Request::Link {
        node: node.into(),
        fault,
    })?;
    Ok(format!(
        "{node}'s link: loss {:.0}%, delay {} ms, duplicate {:.0}%",
        fault.loss * 100.0,
        fault.delay_ms,
        fault.duplicate * 100.0
    ))
}

/// Starts writing every frame of the fabric to `path` (pcap).
pub fn capture_start(record: &RunningCluster, path: &Path) -> Result<String> {
    let path = std::path::absolute(path)?;
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    segment(record)?.request(&Request::Capture {
        path: Some(path.clone()),
    })?;
    Ok(format!("capturing the fabric into {}", path.display()))
}

/// Stops the capture; returns the file and its frame count.
pub fn capture_stop(record: &RunningCluster) -> Result<(Option<PathBuf>, u64)> {
    let seg = segment(record)?;
    let before = seg.request(&Request::Status)?;
    let after = seg.request(&Request::Capture { path: None })?;
    Ok((
        before.capture,
        after.captured_frames.max(before.captured_frames),
    ))
}

/// The switch's counters, partition and link faults.
pub fn fabric_status(record: &RunningCluster) -> Result<Status> {
    segment(record)?.request(&Request::Status)
}

/// Kills a node's QEMU with no clean shutdown: a power cut.
pub fn crash(record: &RunningCluster, node: &str) -> Result<String> {
    known(record, node)?;
    let pid = record.nodes[node].pid_now();
    if !machine::is_running(pid) {
        return Err(anyhow!(
            "{node}: QEMU (pid {pid}) is not running; nothing to crash"
        ));
    }
    // Marks the death as ours, so that `restore` repairs this one and
    // never a node that died on its own (that is a finding, not a fault).
    let _ = fs::write(crash_marker(record, node), pid.to_string());
    machine::kill_now(pid);
    Ok(format!(
        "crashed {node}: QEMU (pid {pid}) killed, no shutdown"
    ))
}

/// Powers a node down cleanly, as its power button does (systemd stops
/// its services), killing it if it has not exited within `grace`. Marked
/// like a crash: the node is down on purpose, `restore` boots it again.
pub fn shutdown(record: &RunningCluster, node: &str, grace: Duration) -> Result<String> {
    known(record, node)?;
    let n = &record.nodes[node];
    let pid = n.pid_now();
    if !machine::is_running(pid) {
        return Err(anyhow!(
            "{node}: QEMU (pid {pid}) is not running; nothing to shut down"
        ));
    }
    let _ = fs::write(crash_marker(record, node), pid.to_string());
    let how = machine::stop(pid, &n.dir.join("qmp.sock"), grace);
    Ok(format!("shut down {node}: {how}"))
}

/// `<node dir>/crashed-by-fault`: the pid `crash` or `shutdown` ended.
fn crash_marker(record: &RunningCluster, node: &str) -> std::path::PathBuf {
    record.nodes[node].dir.join("crashed-by-fault")
}

/// Whether `node` is down because `crash` killed it (and nothing since).
fn crashed_by_fault(record: &RunningCluster, node: &str) -> bool {
    let pid = record.nodes[node].pid_now();
    fs::read_to_string(crash_marker(record, node))
        .is_ok_and(|s| s.trim() == pid.to_string() && !machine::is_running(pid))
}

/// Stops (`pause`) or continues (`resume`) a node's vCPUs over QMP: a
/// stalled machine that keeps its network link and memory.
pub fn pause(record: &RunningCluster, node: &str, paused: bool) -> Result<String> {
    known(record, node)?;
    let n = &record.nodes[node];
    let mut qmp = Qmp::connect(&n.dir.join("qmp.sock"), Duration::from_secs(5))?;
    qmp.execute(if paused { "stop" } else { "cont" })?;
    Ok(format!(
        "{} {node} (QMP {})",
        if paused { "paused" } else { "resumed" },
        qmp.status()?
    ))
}

/// Boots a node again from its own overlay and config disk (killing it
/// first if it still runs), and waits until it is ready: SSH answers and its
/// expected units are active. Returns the sentence and the seconds it took.
pub fn restart(
    record: &RunningCluster,
    node: &str,
    ready_timeout: Duration,
) -> Result<(String, f64)> {
    known(record, node)?;
    let n = &record.nodes[node];
    if n.qemu_args.is_empty() {
        return Err(bad_input(format!(
            "{node} was started by an older driver that did not record its QEMU \
             command line; restart the cluster"
        )));
    }
    machine::kill_now(n.pid_now());
    // The guest boots from its disks: a restored node's saved memory is gone.
    let args = without_incoming(&n.qemu_args);
    let console = n.dir.join("vm.log");
    keep_old_console(&console);
    let _ = fs::remove_file(n.dir.join("qemu.pid"));
    let _ = fs::remove_file(crash_marker(record, node));
    let t = Instant::now();
    let child = machine::launch_args(node, &args, &n.dir.join("qemu.log"))?;
    let pid = child.id() as i32;
    drop(child);
    let endpoint = guest::endpoint(record, node)?;
    let abort = || -> Option<anyhow::Error> {
        if crate::interrupted() {
            return Some(crate::stop_error());
        }
        (!machine::is_running(pid)).then(|| machine::boot_death(node, "the restart", &n.dir))
    };
    // Through the agent where the node was reached over it (it answers
    // before sshd), else SSH.
    let agent =
        (n.channel == Some(crate::state::ChannelKind::Agent)).then(|| n.dir.join("agent.sock"));
    let g = guest::wait_for_guest(&endpoint, agent.as_deref(), ready_timeout, &console, &abort)?;
    let left = ready_timeout.saturating_sub(t.elapsed());
    guest::wait_for_units(&g, &n.units, left.max(Duration::from_secs(30)), &abort)?;
    let secs = t.elapsed().as_secs_f64();
    Ok((
        format!("restarted {node} (QEMU pid {pid}): ready after {secs:.1} s"),
        secs,
    ))
}

/// Undoes what faults left in place: heals a cut or degraded fabric,
/// resumes paused nodes and restarts the nodes `crash` killed. A node that
/// died on its own stays down: its checks fail at once, and the run ends
/// `node_gone`. Says what it did, or nothing when everything was whole.
/// Run after every layer of a lane.
pub fn restore(record: &RunningCluster) -> Option<String> {
    let mut done = Vec::new();
    if let Some(seg) = record.fabric.as_ref().filter(|s| s.control.is_some())
        && let Ok(status) = seg.request(&Request::Status)
        && (status.partition.is_some() || status.links.values().any(|l| *l != LinkFault::default()))
    {
        match heal(record) {
            Ok(_) => done.push("healed the fabric".to_string()),
            Err(e) => done.push(format!("could not heal the fabric: {e:#}")),
        }
    }
    for (name, n) in &record.nodes {
        if !machine::is_running(n.pid_now()) {
            if !crashed_by_fault(record, name) {
                continue;
            }
            match restart(record, name, Duration::from_secs(600)) {
                Ok((said, _)) => done.push(said),
                Err(e) => done.push(format!("could not restart {name}: {e:#}")),
            }
            continue;
        }
        let paused = Qmp::connect(&n.dir.join("qmp.sock"), Duration::from_secs(2))
            .and_then(|mut q| q.status())
            .is_ok_and(|s| s == "paused");
        if paused {
            match pause(record, name, false) {
                Ok(said) => done.push(said),
                Err(e) => done.push(format!("could not resume {name}: {e:#}")),
            }
        }
    }
    (!done.is_empty()).then(|| done.join("; "))
}

fn without_incoming(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "-incoming" {
            it.next();
        } else {
            out.push(a.clone());
        }
    }
    out
}

/// QEMU truncates the console file at launch; the crash's console is evidence.
fn keep_old_console(console: &Path) {
    for i in 1.. {
        let old = console.with_file_name(format!("vm.{i}.log"));
        if !old.exists() {
            let _ = fs::rename(console, old);
            return;
        }
    }
}

/// `30%` or `0.3` -> 0.3.
pub fn parse_fraction(s: &str) -> Result<f64, String> {
    let (num, scale) = match s.strip_suffix('%') {
        Some(n) => (n, 100.0),
        None => (s, 1.0),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a percentage like 30%"))?;
    let v = v / scale;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{s:?} is not between 0% and 100%"))
    }
}

/// `100ms`, `2s` or `250` (milliseconds) -> milliseconds.
pub fn parse_millis(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a delay like 100ms or 2s");
    if let Some(n) = s.strip_suffix("ms") {
        n.trim().parse().map_err(|_| bad())
    } else if let Some(n) = s.strip_suffix('s') {
        n.trim()
            .parse::<f64>()
            .map(|v| (v * 1000.0).round() as u64)
            .map_err(|_| bad())
    } else {
        s.trim().parse().map_err(|_| bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_and_delays_read_as_people_write_them() {
        assert_eq!(parse_fraction("30%"), Ok(0.3));
        assert_eq!(parse_fraction("0.5"), Ok(0.5));
        assert!(parse_fraction("130%").is_err());
        assert!(parse_fraction("lots").is_err());
        assert_eq!(parse_millis("100ms"), Ok(100));
        assert_eq!(parse_millis("1.5s"), Ok(1500));
        assert_eq!(parse_millis("250"), Ok(250));
        assert!(parse_millis("soon").is_err());
    }

    #[test]
    fn a_restart_boots_from_disk_not_from_the_saved_memory() {
        let args: Vec<String> = ["-m", "512", "-incoming", "exec:cat x", "-pidfile", "p"]
            .map(String::from)
            .to_vec();
        assert_eq!(without_incoming(&args), ["-m", "512", "-pidfile", "p"]);
    }

    /// Only a death `crash` caused is repaired by `restore`: a node that
    /// died on its own is a finding and stays down.
    #[test]
    fn only_a_crash_we_caused_counts_as_ours() {
        let tmp = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id() as i32;
        child.wait().unwrap();
        let record: RunningCluster = serde_json::from_value(serde_json::json!({
            "name": "t", "source": "t.toml", "started_unix": 0,
            "accel": { "used": "tcg", "requested": "tcg", "fallback_reason": null },
            "ssh_key": "/k", "known_hosts": "/h",
            "image": { "provider": "debian", "kernel": "k", "initrd": "i", "rootfs": "r", "id": "i" },
            "nodes": { "node01": {
                "role": "worker", "address": "10.0.0.1", "pid": dead, "ssh_port": 1,
                "forwards": {}, "units": [], "dir": tmp.path(), "booted_unix": 0,
                "ready_after_s": null
            } }
        }))
        .unwrap();
        assert!(!crashed_by_fault(&record, "node01"), "died on its own");
        fs::write(crash_marker(&record, "node01"), dead.to_string()).unwrap();
        assert!(crashed_by_fault(&record, "node01"));
        fs::write(crash_marker(&record, "node01"), "1").unwrap();
        assert!(
            !crashed_by_fault(&record, "node01"),
            "a marker of another run"
        );
    }
}
