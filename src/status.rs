//! `status`: what each node of the running cluster is doing right now.

use crate::fabric::PortForward;
use crate::guest;
use crate::machine::{self, qmp::Qmp};
use crate::state::RunningCluster;
use anyhow::Result;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Serialize)]
pub struct ClusterStatus {
    pub name: String,
    pub accel: crate::machine::accel::AccelChoice,
    pub image: crate::state::ImageRecord,
    pub nodes: Vec<NodeStatus>,
    /// The L2 segment: `switch` (with its pid, whether it runs, the
    /// partition and link faults in place) or `hub`.
    pub fabric: serde_json::Value,
}

#[derive(Debug, Serialize)]
pub struct NodeStatus {
    pub name: String,
    pub role: crate::spec::Role,
    /// `ready`, `degraded` (units not all active), `unreachable`, `stopped`,
    /// or the QMP run state when not running (e.g. `paused`).
    pub state: String,
    pub pid: i32,
    pub ssh_port: u16,
    pub forwards: BTreeMap<String, PortForward>,
    pub uptime_s: i64,
    pub ready_after_s: Option<f64>,
    /// unit -> `systemctl is-active` answer
    pub units: BTreeMap<String, String>,
    /// How the driver reached the node for this status: `agent` or `ssh`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<crate::state::ChannelKind>,
    /// Why the node is `unreachable`: the SSH or command error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl NodeStatus {
    pub fn ready(&self) -> bool {
        self.state == "ready"
    }
}

/// Queries every node in parallel: process, QMP run state, and unit states.
pub fn collect(record: &RunningCluster) -> ClusterStatus {
    let now = chrono::Utc::now().timestamp();
    let nodes = std::thread::scope(|s| {
        let handles: Vec<_> = record
            .nodes
            .iter()
            .map(|(name, n)| {
                s.spawn(move || {
                    let mut st = NodeStatus {
                        name: name.clone(),
                        role: n.role,
                        state: "stopped".into(),
                        pid: n.pid_now(),
                        ssh_port: n.ssh_port,
                        forwards: n.forwards.clone(),
                        uptime_s: now - n.booted_unix,
                        ready_after_s: n.ready_after_s,
                        units: BTreeMap::new(),
                        channel: None,
                        error: None,
                    };
                    if !machine::is_running(n.pid_now()) {
                        st.uptime_s = 0;
                        return st;
                    }
                    let run_state = Qmp::connect(&n.dir.join("qmp.sock"), Duration::from_secs(5))
                        .and_then(|mut q| q.status())
                        .unwrap_or_else(|e| format!("qmp error: {e}"));
                    if run_state != "running" {
                        st.state = run_state;
                        return st;
                    }
                    match crate::guest::connect(record, name).and_then(|g| {
                        st.channel = Some(g.channel());
                        guest::unit_states(&g, &n.units)
                    }) {
                        Ok(units) => {
                            let all_active = units.iter().all(|(_, s)| s == "active");
                            st.units = units.into_iter().collect();
                            st.state = if all_active { "ready" } else { "degraded" }.into();
                        }
                        Err(e) => {
                            st.state = "unreachable".into();
                            st.error = Some(format!("{e:#}"));
                        }
                    }
                    st
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("status thread"))
            .collect()
    });
    ClusterStatus {
        name: record.name.clone(),
        accel: record.accel.clone(),
        image: record.image.clone(),
        nodes,
        fabric: fabric(record),
    }
}

/// What the fabric is and which faults are in place.
fn fabric(record: &RunningCluster) -> serde_json::Value {
    let Some(seg) = &record.fabric else {
        return serde_json::json!({ "kind": "hub" });
    };
    let faults = crate::fault::fabric_status(record).ok();
    serde_json::json!({
        "kind": seg.kind,
        "switch_pid": seg.switch_pid,
        "switch_running": seg.switch_pid.is_some() && seg.switch_running(),
        "partition": faults.as_ref().and_then(|f| f.partition.clone()),
        "links": faults.as_ref().map(|f| f.links.clone()),
    })
}

pub fn print(status: &ClusterStatus, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(status)?);
        return Ok(());
    }
    println!(
        "cluster {}  accel {}  image {} {}",
        status.name,
        status.accel.summary(),
        status.image.provider,
        status.image.id
    );
    println!(
        "{:<16} {:<8} {:<11} {:>8} {:>7} {:>8} {:<7} {:<28} units",
        "node", "role", "state", "pid", "uptime", "ready-in", "channel", "ports (host->guest)"
    );
    for n in &status.nodes {
        let ports = std::iter::once(format!("ssh {}", n.ssh_port))
            .chain(n.forwards.iter().map(|(k, f)| format!("{k} {f}")))
            .collect::<Vec<_>>()
            .join(", ");
        let active = n.units.values().filter(|s| *s == "active").count();
        let units = if n.units.is_empty() {
            "-".to_string()
        } else {
            let bad: Vec<String> = n
                .units
                .iter()
                .filter(|(_, s)| *s != "active")
                .map(|(u, s)| format!("{u}={s}"))
                .collect();
            format!("{active}/{} active {}", n.units.len(), bad.join(" "))
        };
        println!(
            "{:<16} {:<8} {:<11} {:>8} {:>6}s {:>8} {:<7} {:<28} {}",
            n.name,
            n.role,
            n.state,
            n.pid,
            n.uptime_s,
            n.ready_after_s
                .map(|s| format!("{s:.1}s"))
                .unwrap_or_else(|| "-".into()),
            n.channel
                .map(|c| if c == crate::state::ChannelKind::Agent {
                    "agent"
                } else {
                    "ssh"
                })
                .unwrap_or("-"),
            ports,
            units.trim_end()
        );
    }
    for n in &status.nodes {
        if let Some(e) = &n.error {
            println!("{}: {}", n.name, e.lines().next().unwrap_or_default());
        }
    }
    let f = &status.fabric;
    println!(
        "fabric: {}{}{}",
        f["kind"].as_str().unwrap_or("hub"),
        match f["switch_pid"].as_i64() {
            Some(pid) if f["switch_running"] == true => format!(" (pid {pid})"),
            Some(pid) => format!(" (pid {pid}, NOT RUNNING)"),
            None => String::new(),
        },
        match f["partition"].as_array() {
            Some(groups) => format!(", partitioned: {}", serde_json::to_string(groups)?),
            None => String::new(),
        }
    );
    // Per-node images: which path (and, if Nix built it, derivation) each node booted.
    for (node, i) in &status.image.nodes {
        if i.drv_path.is_empty() {
            println!("{node:<16} image {}", i.store_path);
        } else {
            println!(
                "{node:<16} image {} (drv {}, {})",
                i.store_path, i.drv_path, i.system
            );
        }
    }
    Ok(())
}
