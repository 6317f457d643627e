//! Check kinds: what a lane can ask of a cluster, and how each one is
//! judged. A check yields a `Verdict` (outcome, one-line message, evidence
//! as JSON); the engine adds timing and retries.
//!
//! Guest-side probes run real clients inside the guest over the driver's SSH
//! session (curl, etcdctl, redis-cli, qemu). Host-side probes (`dns`,
//! `host_forward`) go through the node's 127.0.0.1 forwards, the way a user
//! on the workstation would reach the cluster.

mod auth;
mod dns;
mod http;
mod kv;
mod lb;
mod metrics;
mod nested;
mod remote_write;
mod system;
mod vm;
mod volume;

use crate::guest::Guest;
use crate::spec::{Cluster, Proto};
use crate::state::{RunningCluster, StateDir};
use anyhow::{Result, anyhow};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use http::HttpExpect;

/// Every kind of check a lane file can name (`kind = "..."`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum CheckKind {
    /// The cluster runs the image the current recipe builds, and its files exist.
    Image {},
    /// systemd units are active (default: the node's `units` from the cluster file).
    UnitActive {
        #[serde(default)]
        units: Vec<String>,
    },
    /// An HTTP request made with curl inside the target node.
    Http {
        url: String,
        #[serde(default)]
        expect: HttpExpect,
    },
    /// A TCP connect from the target node to `host:port`.
    TcpOpen {
        port: u16,
        #[serde(default = "loopback")]
        host: String,
    },
    /// A DNS query over UDP from the host, through the node's UDP forward.
    Dns {
        #[serde(default = "dns_forward")]
        forward: String,
        /// The name to look up (`name` is the check's own name).
        query: String,
        #[serde(default = "record_a")]
        record: String,
        expect: Vec<String>,
        #[serde(default = "yes")]
        authoritative: bool,
    },
    /// A Prometheus text endpoint has a series, optionally with a value condition.
    Metrics {
        url: String,
        series: String,
        #[serde(default)]
        labels: BTreeMap<String, String>,
        /// `> 0`, `>= 1`, `== 1`, `< 5`, `!= 0`, `<= 3`.
        condition: Option<String>,
    },
    /// A command in the target node: its exit code and output.
    Exec {
        command: String,
        #[serde(default)]
        exit: i32,
        stdout_contains: Option<String>,
        stdout_equals: Option<String>,
    },
    /// Write through the target, read the same value on every member.
    ReplicatedKv {
        store: kv::Store,
        members: Vec<String>,
    },
    /// Boot an inner guest with qemu inside the target; KVM first, else TCG (degraded).
    NestedGuest {
        /// `auto` (linux on a KVM cluster, multiboot otherwise), `linux`, `multiboot`.
        #[serde(default)]
        payload: nested::Payload,
        #[serde(default = "nested_memory")]
        memory_mib: u32,
    },
    /// An HTTP request from the host through one of the target's forwards.
    HostForward {
        forward: String,
        #[serde(default = "slash")]
        path: String,
        #[serde(default)]
        expect: HttpExpect,
    },
    /// A consumer authenticated to its provider, proven by Prometheus' own
    /// scrape state for `job`, and by `protected_url` refusing anonymous access.
    ServiceAuth {
        job: String,
        #[serde(default = "prometheus_url")]
        prometheus: String,
        protected_url: String,
    },
    /// A Prometheus remote-write request (protobuf + snappy) from the host
    /// through the target's forward; an instant query must return the sample.
    RemoteWrite {
        #[serde(default = "prometheus_forward")]
        forward: String,
        #[serde(default = "remote_write_path")]
        path: String,
    },
    /// Drain a load balancer backend server through HAProxy's runtime API,
    /// then restore it; traffic through `frontend` must follow both times.
    LbDrain {
        #[serde(default = "lb_frontend")]
        frontend: String,
        #[serde(default = "lb_runtime")]
        runtime: String,
        backend: String,
        server: String,
        #[serde(default = "lb_requests")]
        requests: u32,
    },
    /// Live-migrate a VM whose disk is the shared NBD `volume` from the
    /// target node to `to`; it must continue there and restart there.
    VmMigration {
        to: String,
        volume: String,
        #[serde(default = "vm_memory")]
        memory_mib: u32,
        #[serde(default = "vm_port")]
        port: u16,
    },
    /// `qemu-img bench` of a `subject` volume against a `baseline` one, side
    /// by side from the target node; read and write MB/s and their ratio.
    VolumeBench {
        baseline: String,
        subject: String,
        #[serde(default = "bench_block_kib")]
        block_kib: u32,
        #[serde(default = "bench_count")]
        count: u32,
        #[serde(default = "bench_runs")]
        runs: u32,
        min_ratio: Option<f64>,
    },
}

fn prometheus_forward() -> String {
    "prometheus".into()
}
fn remote_write_path() -> String {
    "/api/v1/write".into()
}
fn lb_frontend() -> String {
    "http://127.0.0.1/".into()
}
fn lb_runtime() -> String {
    "127.0.0.1:9999".into()
}
fn lb_requests() -> u32 {
    8
}
fn vm_memory() -> u32 {
    32
}
fn vm_port() -> u16 {
    4444
}
fn bench_block_kib() -> u32 {
    64
}
fn bench_count() -> u32 {
    1000
}
fn bench_runs() -> u32 {
    3
}

fn loopback() -> String {
    "127.0.0.1".into()
}
fn dns_forward() -> String {
    "dns".into()
}
fn record_a() -> String {
    "A".into()
}
fn yes() -> bool {
    true
}
fn nested_memory() -> u32 {
    192
}
fn slash() -> String {
    "/".into()
}
fn prometheus_url() -> String {
    "http://127.0.0.1:9090".into()
}

impl CheckKind {
    pub fn name(&self) -> &'static str {
        match self {
            CheckKind::Image {} => "image",
            CheckKind::UnitActive { .. } => "unit_active",
            CheckKind::Http { .. } => "http",
            CheckKind::TcpOpen { .. } => "tcp_open",
            CheckKind::Dns { .. } => "dns",
            CheckKind::Metrics { .. } => "metrics",
            CheckKind::Exec { .. } => "exec",
            CheckKind::ReplicatedKv { .. } => "replicated_kv",
            CheckKind::NestedGuest { .. } => "nested_guest",
            CheckKind::HostForward { .. } => "host_forward",
            CheckKind::ServiceAuth { .. } => "service_auth",
            CheckKind::RemoteWrite { .. } => "remote_write",
            CheckKind::LbDrain { .. } => "lb_drain",
            CheckKind::VmMigration { .. } => "vm_migration",
            CheckKind::VolumeBench { .. } => "volume_bench",
        }
    }

    pub fn needs_target(&self) -> bool {
        !matches!(self, CheckKind::Image {})
    }

    /// Checks that manage their own deadline run once; the rest are retried
    /// until they pass or the deadline passes (services settle after boot).
    pub fn retried(&self) -> bool {
        !matches!(
            self,
            CheckKind::NestedGuest { .. }
                | CheckKind::ReplicatedKv { .. }
                | CheckKind::LbDrain { .. }
                | CheckKind::VmMigration { .. }
                | CheckKind::VolumeBench { .. }
        )
    }

    /// This check bound to one target: placeholders filled in (`{node}`,
    /// `{address}`, `{domain}`, `{address:<node>}`) and references to the
    /// cluster (forwards, members) verified.
    pub fn for_target(&self, target: Option<&str>, cluster: &Cluster) -> Result<CheckKind, String> {
        let mut value = serde_json::to_value(self).map_err(|e| e.to_string())?;
        fill(&mut value, target, cluster)?;
        let mut kind: CheckKind = serde_json::from_value(value).map_err(|e| e.to_string())?;
        let node = target.and_then(|t| cluster.node(t));
        match &mut kind {
            CheckKind::Dns { forward, .. }
            | CheckKind::HostForward { forward, .. }
            | CheckKind::RemoteWrite { forward, .. } => {
                let want = if matches!(self, CheckKind::Dns { .. }) {
                    Proto::Udp
                } else {
                    Proto::Tcp
                };
                let found = node
                    .map(|n| {
                        n.forwards
                            .iter()
                            .any(|f| f.name == *forward && f.proto == want)
                    })
                    .unwrap_or(false);
                if !found {
                    return Err(format!(
                        "{} has no {} forward named {forward:?} in the cluster file",
                        target.unwrap_or("-"),
                        want.name()
                    ));
                }
            }
            CheckKind::ReplicatedKv { members, .. } => {
                *members = crate::lane::expand_targets(members, cluster)?;
            }
            CheckKind::VmMigration { to, .. }
                if cluster.node(to).is_none() || Some(to.as_str()) == target =>
            {
                return Err(format!(
                    "`to` must name another node of the cluster, not {to:?}"
                ));
            }
            _ => {}
        }
        Ok(kind)
    }
}

fn fill(v: &mut Value, target: Option<&str>, cluster: &Cluster) -> Result<(), String> {
    match v {
        Value::String(s) => *s = placeholders(s, target, cluster)?,
        Value::Array(items) => {
            for i in items {
                fill(i, target, cluster)?;
            }
        }
        Value::Object(map) => {
            for (_, i) in map.iter_mut() {
                fill(i, target, cluster)?;
            }
        }
        _ => {}
    }
    Ok(())
}

pub fn placeholders(s: &str, target: Option<&str>, cluster: &Cluster) -> Result<String, String> {
    let address = |n: &str| {
        cluster
            .node(n)
            .map(|n| n.address.to_string())
            .ok_or_else(|| format!("`{{address:{n}}}`: no node {n:?}"))
    };
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let Some(len) = rest[start..].find('}') else {
            break;
        };
        let key = &rest[start + 1..start + len];
        let needs = |what: &str| format!("`{{{what}}}` needs a target node");
        let value = match key.split_once(':') {
            Some(("address", n)) => address(n)?,
            _ => match key {
                "node" => target.ok_or_else(|| needs("node"))?.to_string(),
                "address" => address(target.ok_or_else(|| needs("address"))?)?,
                "domain" => cluster.network.domain.clone(),
                // Not ours (JSON in a command, for example): keep it.
                _ => rest[start..=start + len].to_string(),
            },
        };
        out.push_str(&value);
        rest = &rest[start + len + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// pass / fail / degraded / skipped, in that vocabulary everywhere
/// (result.json, JUnit, the report, the terminal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Degraded,
    Skipped,
    Fail,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Degraded => "degraded",
            Outcome::Skipped => "skipped",
            Outcome::Fail => "fail",
        }
    }
}

/// What one attempt of a check concluded.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub outcome: Outcome,
    pub message: String,
    pub evidence: Value,
}

impl Verdict {
    pub fn pass(message: impl Into<String>, evidence: Value) -> Verdict {
        Verdict {
            outcome: Outcome::Pass,
            message: message.into(),
            evidence,
        }
    }
    pub fn fail(message: impl Into<String>, evidence: Value) -> Verdict {
        Verdict {
            outcome: Outcome::Fail,
            message: message.into(),
            evidence,
        }
    }
    pub fn degraded(message: impl Into<String>, evidence: Value) -> Verdict {
        Verdict {
            outcome: Outcome::Degraded,
            message: message.into(),
            evidence,
        }
    }
}

/// What every check can reach: the cluster record, its definition, its
/// state directory, and SSH sessions to its nodes.
pub struct Ctx<'a> {
    pub cluster: &'a Cluster,
    pub record: &'a RunningCluster,
    pub state: &'a StateDir,
    pub guests: &'a GuestPool,
}

impl Ctx<'_> {
    /// The host side of `node`'s forward called `name`.
    pub fn forward(&self, node: &str, name: &str) -> Result<crate::fabric::PortForward> {
        self.record
            .nodes
            .get(node)
            .and_then(|n| n.forwards.get(name))
            .copied()
            .ok_or_else(|| anyhow!("{node} has no forward {name:?}"))
    }
}

/// SSH sessions to the nodes, opened on first use and shared by the
/// engine's threads. A session that broke is dropped, so the next attempt
/// reconnects.
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
        if let Some(g) = self
            .guests
            .lock()
            .map_err(|_| anyhow!("poisoned"))?
            .get(node)
        {
            return Ok(g.clone());
        }
        let guest = Arc::new(crate::cluster::connect(&self.record, node)?);
        self.guests
            .lock()
            .map_err(|_| anyhow!("poisoned"))?
            .insert(node.to_string(), guest.clone());
        Ok(guest)
    }

    pub fn forget(&self, node: &str) {
        if let Ok(mut g) = self.guests.lock() {
            g.remove(node);
        }
    }
}

/// One attempt of `kind` against `target`, with at most `budget` to spend.
pub fn attempt(
    ctx: &Ctx,
    kind: &CheckKind,
    target: Option<&str>,
    budget: Duration,
) -> Result<Verdict> {
    let node = || target.ok_or_else(|| anyhow!("this check needs a target node"));
    let guest = || ctx.guests.get(node()?);
    let result = match kind {
        CheckKind::Image {} => system::image(ctx),
        CheckKind::UnitActive { units } => system::units(ctx, &*guest()?, node()?, units, budget),
        CheckKind::Exec {
            command,
            exit,
            stdout_contains,
            stdout_equals,
        } => system::exec(
            &*guest()?,
            command,
            *exit,
            stdout_contains.as_deref(),
            stdout_equals.as_deref(),
            budget,
        ),
        CheckKind::TcpOpen { port, host } => system::tcp_open(&*guest()?, host, *port, budget),
        CheckKind::Http { url, expect } => http::in_guest(&*guest()?, url, expect, budget),
        CheckKind::HostForward {
            forward,
            path,
            expect,
        } => http::from_host(ctx, node()?, forward, path, expect, budget),
        CheckKind::Dns {
            forward,
            query,
            record,
            expect,
            authoritative,
        } => dns::query(
            ctx,
            node()?,
            forward,
            query,
            record,
            expect,
            *authoritative,
            budget,
        ),
        CheckKind::Metrics {
            url,
            series,
            labels,
            condition,
        } => metrics::series(
            &*guest()?,
            url,
            series,
            labels,
            condition.as_deref(),
            budget,
        ),
        CheckKind::ReplicatedKv { store, members } => {
            kv::converge(ctx, *store, node()?, members, budget)
        }
        CheckKind::NestedGuest {
            payload,
            memory_mib,
        } => nested::boot(ctx, &*guest()?, *payload, *memory_mib, budget),
        CheckKind::ServiceAuth {
            job,
            prometheus,
            protected_url,
        } => auth::prometheus_job(&*guest()?, job, prometheus, protected_url, budget),
        CheckKind::RemoteWrite { forward, path } => {
            remote_write::write_then_query(ctx, node()?, forward, path, budget)
        }
        CheckKind::LbDrain {
            frontend,
            runtime,
            backend,
            server,
            requests,
        } => lb::drain(
            &*guest()?,
            &lb::Drain {
                frontend,
                runtime,
                backend,
                server,
                requests: *requests,
            },
            budget,
        ),
        CheckKind::VmMigration {
            to,
            volume,
            memory_mib,
            port,
        } => vm::migrate(
            ctx,
            node()?,
            &vm::Request {
                to,
                volume,
                memory_mib: *memory_mib,
                port: *port,
            },
            budget,
        ),
        CheckKind::VolumeBench {
            baseline,
            subject,
            block_kib,
            count,
            runs,
            min_ratio,
        } => volume::run(
            &*guest()?,
            &volume::Bench {
                baseline,
                subject,
                block_kib: *block_kib,
                count: *count,
                runs: *runs,
                min_ratio: *min_ratio,
            },
        ),
    };
    // A broken session (an SSH or socket error anywhere in the chain) is
    // dropped so the next attempt reconnects; a probe that merely failed
    // keeps it.
    if let (Err(e), Some(t)) = (&result, target)
        && e.chain()
            .any(|c| c.is::<ssh2::Error>() || c.is::<std::io::Error>())
    {
        ctx.guests.forget(t);
    }
    result
}

/// Quotes `s` for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The last `n` lines of `text`, for evidence.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn no_evidence() -> Value {
    json!({})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_fill_node_address_and_domain() {
        let c = Cluster::profile("reference").unwrap();
        let s = placeholders(
            "{node}.{domain} {address} {address:node06} {x}",
            Some("node02"),
            &c,
        );
        assert_eq!(s.unwrap(), "node02.photon.test 10.77.0.12 10.77.0.16 {x}");
        assert!(placeholders("{node}", None, &c).is_err());
        assert!(placeholders("{address:nope}", None, &c).is_err());
    }

    #[test]
    fn shell_quote_survives_single_quotes() {
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
    }
}
