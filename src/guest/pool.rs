//! The guests of a running cluster: endpoints from its record, and the
//! SSH sessions a lane shares.

use super::{Channel, ChannelKind, Endpoint, Guest, GuestError};
use crate::state::RunningCluster;
use anyhow::{Context, Result, anyhow};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// SSH sessions to the nodes, opened on first use and shared by the
/// engine's threads. A session that broke is dropped (`forget`), so the
/// next attempt reconnects.
pub struct GuestPool {
    record: RunningCluster,
    guests: Mutex<HashMap<String, Arc<Guest>>>,
}

impl GuestPool {
    pub fn new(record: &RunningCluster) -> GuestPool {
        GuestPool {
            record: record.clone(),
            guests: Mutex::new(HashMap::new()),
        }
    }

    pub fn get(&self, node: &str) -> Result<Arc<Guest>> {
        let mut guests = self.guests.lock().map_err(|_| anyhow!("poisoned"))?;
        if let Some(g) = guests.get(node) {
            // A channel whose stream ended is replaced, not reused.
            if !g.agent().is_some_and(Channel::is_broken) {
                return Ok(g.clone());
            }
        }
        let guest = Arc::new(connect(&self.record, node)?);
        guests.insert(node.to_string(), guest.clone());
        Ok(guest)
    }

    pub fn forget(&self, node: &str) {
        if let Ok(mut g) = self.guests.lock() {
            g.remove(node);
        }
    }
}

/// How long a node's agent has to answer its hello before the driver
/// takes SSH instead (a foreign guest has no agent; QEMU's end of the port
/// accepts the connection, and nothing answers).
const AGENT_HELLO: Duration = Duration::from_secs(2);

/// A connected guest for lanes and checks: over its agent's channel where
/// the cluster asked for it and the agent answered at start
/// (`RunningNode::channel`) and answers now, else over SSH.
pub fn connect(record: &RunningCluster, node: &str) -> Result<Guest> {
    let ssh_only = connect_ssh_checked(record, node, false)?;
    if let Some(g) = ssh_only {
        return Ok(g);
    }
    let n = &record.nodes[node];
    let endpoint = endpoint(record, node)?;
    // Only where the cluster asked for the agent and it answered at start.
    if n.channel != Some(ChannelKind::Agent) {
        return Guest::connect(&endpoint, Duration::from_secs(20));
    }
    match Channel::connect(node, &n.dir.join("agent.sock"), AGENT_HELLO) {
        Ok(ch) => Ok(Guest::over_agent(&endpoint, ch)),
        Err(e) => {
            tracing::warn!("{node}: its agent does not answer ({e:#}); driven over SSH");
            Guest::connect(&endpoint, Duration::from_secs(20))
        }
    }
}

/// A connected guest over SSH only (`photon-cluster ssh`, the ssh2 side of `bench`).
pub fn connect_ssh(record: &RunningCluster, node: &str) -> Result<Guest> {
    Ok(connect_ssh_checked(record, node, true)?.expect("asked for SSH"))
}

/// Refuses an unknown or stopped node; connects over SSH if `ssh` asks.
fn connect_ssh_checked(record: &RunningCluster, node: &str, ssh: bool) -> Result<Option<Guest>> {
    let n = record
        .nodes
        .get(node)
        .ok_or_else(|| GuestError::UnknownNode {
            node: node.to_string(),
            nodes: record.nodes.keys().cloned().collect::<Vec<_>>().join(", "),
        })?;
    if !crate::machine::is_running(n.pid_now()) {
        return Err(GuestError::NotRunning {
            node: node.to_string(),
            pid: n.pid_now(),
            console: n.dir.join("vm.log").display().to_string(),
        }
        .into());
    }
    if !ssh {
        return Ok(None);
    }
    Guest::connect(&endpoint(record, node)?, Duration::from_secs(20)).map(Some)
}

/// OpenSSH to `node` with the cluster's key and known hosts (strict):
/// `photon-cluster ssh` and the baseline of `bench` use it.
pub fn openssh(record: &RunningCluster, node: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new("ssh");
    cmd.arg("-i")
        .arg(&record.ssh_key)
        .args(["-p", &record.nodes[node].ssh_port.to_string()])
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            record.known_hosts.display()
        ))
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
        ])
        .arg("root@127.0.0.1");
    cmd
}

/// The endpoint of a node of a running cluster, host key from known_hosts.
pub fn endpoint(record: &RunningCluster, node: &str) -> Result<Endpoint> {
    let n = &record.nodes[node];
    let known = std::fs::read_to_string(&record.known_hosts)
        .with_context(|| format!("reading {}", record.known_hosts.display()))?;
    let prefix = format!("[127.0.0.1]:{} ", n.ssh_port);
    let host_key = known
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .with_context(|| format!("{node}: no host key in {}", record.known_hosts.display()))?
        .to_string();
    Ok(Endpoint {
        node: node.to_string(),
        port: n.ssh_port,
        key: record.ssh_key.clone(),
        host_key,
    })
}
