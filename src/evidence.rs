//! Evidence of a lane: each node's serial console and the journals of its
//! expected units, copied into the artifact tree, then scanned for the
//! signs of a sick machine (kernel panic, Oops, BUG:, segfaults, the OOM
//! killer, failed units). Any finding fails the lane's `health` layer, and
//! the report quotes it.

use crate::check::Outcome;
use crate::engine::{CheckResult, LayerResult};
use crate::guest::GuestPool;
use crate::secrets::Secrets;
use crate::state::{RunningCluster, StateDir};
use crate::text::shell_quote;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Substrings that mark trouble in a console or journal, with a label.
const PATTERNS: &[(&str, &str)] = &[
    ("Kernel panic", "kernel panic"),
    ("Oops:", "kernel Oops"),
    ("BUG:", "kernel BUG"),
    ("segfault at", "segfault"),
    ("general protection fault", "general protection fault"),
    ("invoked oom-killer", "OOM killer"),
    ("Out of memory: Killed process", "OOM killer"),
];

/// One suspicious line, with its neighbours for context.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Finding {
    pub node: String,
    /// The artifact file, relative to the artifact root.
    pub file: String,
    pub line: usize,
    pub what: String,
    pub excerpt: String,
}

/// Scans `text` (the artifact `file` of `node`) for the patterns.
pub fn scan(node: &str, file: &str, text: &str) -> Vec<Finding> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if let Some((_, what)) = PATTERNS.iter().find(|(p, _)| line.contains(p)) {
            let from = i.saturating_sub(2);
            let to = (i + 3).min(lines.len());
            out.push(Finding {
                node: node.to_string(),
                file: file.to_string(),
                line: i + 1,
                what: what.to_string(),
                excerpt: lines[from..to].join("\n"),
            });
        }
    }
    out
}

/// Copies each node's console (and, when `guests` can reach it, its unit
/// journals and failed units) under `<root>/nodes/<node>/`, and returns
/// the findings. Works on a cluster that is no longer running: the console
/// logs stay in the state directory.
pub fn collect(
    root: &Path,
    state: &StateDir,
    record: Option<&RunningCluster>,
    guests: Option<&GuestPool>,
    nodes: &[String],
) -> Vec<Finding> {
    let secrets = &Secrets::load(state);
    std::thread::scope(|s| {
        let handles: Vec<_> = nodes
            .iter()
            .map(|node| s.spawn(move || collect_node(root, state, record, guests, secrets, node)))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

fn collect_node(
    root: &Path,
    state: &StateDir,
    record: Option<&RunningCluster>,
    guests: Option<&GuestPool>,
    secrets: &Secrets,
    node: &str,
) -> Vec<Finding> {
    let dir = root.join("nodes").join(node);
    let _ = std::fs::create_dir_all(dir.join("journal"));
    let mut findings = Vec::new();
    let console_src: PathBuf = record
        .and_then(|r| r.nodes.get(node))
        .map(|n| n.dir.join("vm.log"))
        .unwrap_or_else(|| state.node(node).join("vm.log").into());
    if let Ok(bytes) = std::fs::read(&console_src) {
        let _ = std::fs::write(dir.join("vm.log"), secrets.redact_bytes(&bytes));
        let rel = format!("nodes/{node}/vm.log");
        findings.extend(scan(node, &rel, &String::from_utf8_lossy(&bytes)));
    }
    let (Some(record), Some(guests)) = (record, guests) else {
        return findings;
    };
    let Some(n) = record.nodes.get(node) else {
        return findings;
    };
    if !crate::machine::is_running(n.pid_now()) {
        return findings;
    }
    let Ok(guest) = guests.get(node) else {
        return findings;
    };
    let t = Duration::from_secs(30);
    let mut journals: Vec<(String, String)> = n
        .units
        .iter()
        .map(|u| (u.clone(), format!("-u {}", shell_quote(u))))
        .collect();
    journals.push(("kernel".into(), "-k".into()));
    for (name, selector) in journals {
        let cmd = format!("journalctl -b {selector} --no-pager -o short-precise");
        if let Ok(out) = guest.exec(&cmd, t) {
            let file = format!("journal/{name}.log");
            let _ = std::fs::write(dir.join(&file), secrets.redact(&out.stdout).as_bytes());
            findings.extend(scan(node, &format!("nodes/{node}/{file}"), &out.stdout));
        }
    }
    if let Ok(out) = guest.exec("systemctl --failed --plain --no-legend --no-pager", t) {
        let _ = std::fs::write(
            dir.join("failed-units.txt"),
            secrets.redact(&out.stdout).as_bytes(),
        );
        for (i, line) in out
            .stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
        {
            findings.push(Finding {
                node: node.to_string(),
                file: format!("nodes/{node}/failed-units.txt"),
                line: i + 1,
                what: "failed unit".into(),
                excerpt: line.trim().to_string(),
            });
        }
    }
    findings
}

/// The `health` layer: one check per node, failed by any finding.
pub fn health_layer(
    nodes: &[String],
    findings: &[Finding],
    started: Instant,
    lane_start: Instant,
) -> LayerResult {
    let checks = nodes
        .iter()
        .map(|node| {
            let mine: Vec<&Finding> = findings.iter().filter(|f| f.node == *node).collect();
            let (outcome, message) = if mine.is_empty() {
                (Outcome::Pass, "console and journals clean".to_string())
            } else {
                let mut whats: Vec<&str> = mine.iter().map(|f| f.what.as_str()).collect();
                whats.dedup();
                (
                    Outcome::Fail,
                    format!(
                        "{} finding(s): {} (first at {}:{})",
                        mine.len(),
                        whats.join(", "),
                        mine[0].file,
                        mine[0].line
                    ),
                )
            };
            CheckResult {
                id: format!("log-scan@{node}"),
                kind: "log_scan".into(),
                target: Some(node.clone()),
                outcome,
                message,
                started_s: started.duration_since(lane_start).as_secs_f64(),
                duration_s: started.elapsed().as_secs_f64(),
                attempts: 1,
                origin: "built in".into(),
                evidence: json!({ "findings": mine }),
                artifact: None,
                flaky: None,
                part_of: None,
            }
        })
        .collect();
    LayerResult::new(
        "health",
        "Consoles and journals scanned for panics, Oops, BUG:, segfaults, the OOM killer and failed units",
        checks,
        started.elapsed().as_secs_f64(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_finds_oom_and_panic_with_context() {
        let log = "a\nb\n[ 12.0] nginx invoked oom-killer: gfp_mask=0x0\nc\nd\ne\nKernel panic - not syncing: VFS\n";
        let f = scan("node01", "nodes/node01/vm.log", log);
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].what, "OOM killer");
        assert_eq!(f[0].line, 3);
        assert!(f[0].excerpt.starts_with("a\nb\n"));
        assert_eq!(f[1].what, "kernel panic");
    }

    #[test]
    fn a_clean_boot_log_has_no_findings() {
        let log = "[    0.000000] Linux version 6.1.0\n[  OK  ] Started ssh.service\nnode01 login:";
        assert!(scan("n", "f", log).is_empty());
    }
}
