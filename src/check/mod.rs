//! Check kinds: what a lane can ask of a cluster, and how each one is
//! judged. Each kind is one struct in its own file (named like the kind),
//! deserialized by serde straight from the lane file, and implementing
//! [`Check`]. The `kinds!` list registers them, one line each.
//!
//! An attempt yields a [`Verdict`] (outcome, one-line message, evidence as
//! JSON); the engine adds timing and retries. An attempt returns `Err` when
//! it could not judge at all (the SSH session broke, a file could not be
//! read): the engine records that as a failure and, if the session broke,
//! the next attempt gets a new one.
//!
//! Guest-side probes run real clients inside the guest over the driver's SSH
//! session (curl, etcdctl, redis-cli, qemu). Host-side probes (`dns`,
//! `host_forward`, `remote_write`) go through the node's 127.0.0.1
//! forwards, the way a user on the workstation would reach the cluster.

use crate::fabric::PortForward;
use crate::guest::{Guest, GuestPool};
use crate::spec::{Cluster, Node, Proto};
use crate::state::RunningCluster;
use anyhow::{Result, anyhow};
pub use http::HttpExpect;
pub use nested_guest::{multiboot, print_to_com1};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

mod etcd_gateway;
pub mod figures;
mod fio;
mod ovn;
mod procedure;
mod scenario;
mod vm_port;

// The kinds' modules are declared here, outside the `kinds!` macro, so that
// rustfmt (which cannot see into a macro's body) reaches their files.
mod dns;
mod dns_update;
mod etcd_faults;
mod exec;
mod export_matrix;
mod fault;
mod fio_bench;
mod host_forward;
mod http;
mod image;
mod kube_bundle;
mod lb_drain;
mod lb_failover;
mod lb_listener;
mod materialize;
mod metrics;
mod nested_guest;
mod port_closed;
mod redis_faults;
mod remote_write;
mod replicated_kv;
mod s3_bench;
mod script;
mod service_auth;
mod tcp_open;
mod tenant_network;
mod unit_active;
mod vm_migration;
mod volume_bench;

/// Registers each kind with one line: `module::Struct => SHAPE`. The module
/// is the kind's file (`src/check/<module>.rs`), and its name is the
/// `kind = "..."` of lane files, so a kind's name, file and registration
/// cannot disagree. The shape says how the engine runs it (see [`Shape`]).
macro_rules! kinds {
    ($($module:ident :: $kind:ident => $shape:ident),* $(,)?) => {
        /// Every kind a lane file can name (`kind = "..."`).
        pub const KINDS: &[Kind] = &[$(Kind::of::<$module::$kind>(stringify!($module), Shape::$shape)),*];
    };
}

kinds! {
    image::Image => CLUSTER_PROBE,
    unit_active::UnitActive => PROBE,
    exec::Exec => PROBE,
    tcp_open::TcpOpen => PROBE,
    port_closed::PortClosed => PROBE,
    http::Http => PROBE,
    host_forward::HostForward => PROBE,
    dns::Dns => PROBE,
    dns_update::DnsUpdate => ONCE,
    metrics::Metrics => PROBE,
    replicated_kv::ReplicatedKv => ONCE_PER_TARGET,
    nested_guest::NestedGuest => ONCE_PER_TARGET,
    service_auth::ServiceAuth => PROBE,
    remote_write::RemoteWrite => PROBE,
    lb_drain::LbDrain => ONCE_PER_TARGET,
    vm_migration::VmMigration => ONCE_PER_TARGET,
    volume_bench::VolumeBench => ONCE_PER_TARGET,
    fio_bench::FioBench => ONCE_PER_TARGET,
    export_matrix::ExportMatrix => ONCE_PER_TARGET,
    materialize::Materialize => ONCE_PER_TARGET,
    s3_bench::S3Bench => ONCE_PER_TARGET,
    fault::Fault => ONCE,
    etcd_faults::EtcdFaults => ONCE,
    redis_faults::RedisFaults => ONCE,
    lb_failover::LbFailover => ONCE,
    lb_listener::LbListener => ONCE,
    tenant_network::TenantNetwork => ONCE,
    kube_bundle::KubeBundle => ONCE_PER_TARGET,
    // A script keeps its own timeline: running it twice would repeat its
    // side effects.
    script::Script => ONCE,
}

/// How the engine runs a kind: on each of the lane's targets or once for
/// the cluster, and whether a failed attempt is tried again until the
/// check's deadline. A kind states it in its registration line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Runs on the lane's `targets` (which it then requires).
    pub on_targets: bool,
    /// A failed attempt is tried again until the deadline: services
    /// settle after boot. Kinds that manage their own timeline (a
    /// procedure, a migration, a benchmark) run once.
    pub retried: bool,
}

impl Shape {
    /// A question asked of each target, retried until its deadline.
    pub const PROBE: Shape = Shape {
        on_targets: true,
        retried: true,
    };
    /// A question asked once of the cluster, retried until its deadline.
    pub const CLUSTER_PROBE: Shape = Shape {
        on_targets: false,
        retried: true,
    };
    /// A procedure or benchmark on each target, run once.
    pub const ONCE_PER_TARGET: Shape = Shape {
        on_targets: true,
        retried: false,
    };
    /// A procedure on the cluster as a whole, run once.
    pub const ONCE: Shape = Shape {
        on_targets: false,
        retried: false,
    };
}

/// What a check of a kind does: how it binds to the cluster, and how one
/// attempt runs (how the engine runs it is the kind's [`Shape`]).
pub trait Check: Debug + Send + Sync {
    /// Verifies the references this check makes into the cluster, once
    /// placeholders are filled for `target` (forwards, other nodes,
    /// members). The message of an error is shown at the check's line.
    fn bind(&mut self, _target: Option<&str>, _cluster: &Cluster) -> Result<(), String> {
        Ok(())
    }

    /// One attempt, spending at most `budget`.
    fn attempt(&self, ctx: &Ctx, target: Option<&str>, budget: Duration) -> Result<Verdict>;
}

/// A registered kind: its name in lane files, and how to read one.
#[derive(Debug)]
pub struct Kind {
    pub name: &'static str,
    pub shape: Shape,
    parse: fn(toml::Value) -> Result<Box<dyn Check>, String>,
}

impl Kind {
    const fn of<T: Check + DeserializeOwned + 'static>(name: &'static str, shape: Shape) -> Kind {
        Kind {
            name,
            shape,
            parse: parse_as::<T>,
        }
    }

    /// The kind called `name`, or an error that lists the known ones.
    pub fn named(name: &str) -> Result<&'static Kind, String> {
        KINDS.iter().find(|k| k.name == name).ok_or_else(|| {
            format!(
                "unknown check kind {name:?} (known kinds: {})",
                KINDS.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
            )
        })
    }

    /// Reads a check of this kind from its table in the lane file (without
    /// the lane's own keys: name, kind, targets, deadline, artifact).
    pub fn parse(&self, table: toml::Table) -> Result<Box<dyn Check>, String> {
        (self.parse)(toml::Value::Table(table))
    }
}

fn parse_as<T: Check + DeserializeOwned + 'static>(
    value: toml::Value,
) -> Result<Box<dyn Check>, String> {
    T::deserialize(value)
        .map(|c| Box::new(c) as Box<dyn Check>)
        .map_err(|e| e.message().to_string())
}

/// pass / fail / degraded / flaky / skipped, in that vocabulary everywhere
/// (result.json, JUnit, the report, the terminal). `flaky` is a check that
/// failed and then passed when it ran again from the snapshot: never a
/// plain pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Degraded,
    Flaky,
    Skipped,
    Fail,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Degraded => "degraded",
            Outcome::Flaky => "flaky",
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
    /// Named parts of the attempt that are reported as checks of their own
    /// (a script's subtests), each right after this check. Empty for most kinds.
    pub parts: Vec<Part>,
}

/// A named part of one attempt (a script's subtest). The engine turns it
/// into a check of its own, `<check id>/<name>`, so that result.json,
/// JUnit, the reports, `rerun` and `compare` see it without knowing the
/// kind; the check's own verdict must already account for it (a failed
/// part fails its check: the engine makes sure of that).
#[derive(Debug, Clone)]
pub struct Part {
    pub name: String,
    /// The kind shown for it (`subtest`); not a kind a lane file can name.
    pub kind: &'static str,
    pub outcome: Outcome,
    pub message: String,
    /// From the start of the attempt to the start of the part.
    pub offset: Duration,
    pub duration: Duration,
    /// Where the part is written, `file:line`, when the kind knows it;
    /// else the check's own origin.
    pub origin: Option<String>,
    pub evidence: Value,
}

impl Verdict {
    pub fn pass(message: impl Into<String>, evidence: Value) -> Verdict {
        Verdict {
            outcome: Outcome::Pass,
            message: message.into(),
            evidence,
            parts: Vec::new(),
        }
    }
    pub fn fail(message: impl Into<String>, evidence: Value) -> Verdict {
        Verdict {
            outcome: Outcome::Fail,
            message: message.into(),
            evidence,
            parts: Vec::new(),
        }
    }
    pub fn degraded(message: impl Into<String>, evidence: Value) -> Verdict {
        Verdict {
            outcome: Outcome::Degraded,
            message: message.into(),
            evidence,
            parts: Vec::new(),
        }
    }
    pub fn with_parts(self, parts: Vec<Part>) -> Verdict {
        Verdict { parts, ..self }
    }
}

/// What every check can reach: the cluster's definition and its running
/// record, SSH sessions to its nodes, and the image the current recipe
/// builds (resolved once, before the lane runs).
#[derive(Clone, Copy)]
pub struct Ctx<'a> {
    pub cluster: &'a Cluster,
    pub record: &'a RunningCluster,
    pub guests: &'a GuestPool,
    /// The id of the image the cluster's recipe builds now, if known.
    pub current_image: Option<&'a str>,
    /// The lane's artifact directory, for checks that keep files of their
    /// own (a pcap, a workload history). None when there is none (tests).
    pub artifacts: Option<&'a std::path::Path>,
}

impl Ctx<'_> {
    /// The target node, for checks that need one.
    pub fn node<'t>(&self, target: Option<&'t str>) -> Result<&'t str> {
        target.ok_or_else(|| anyhow!("this check needs a target node"))
    }

    /// A session to the target node.
    pub fn guest(&self, target: Option<&str>) -> Result<Arc<Guest>> {
        self.guests.get(self.node(target)?)
    }

    /// Writes `bytes` to `rel` under the artifact directory; returns `rel`
    /// for the evidence's `files` list (report.rs lists them in result.json).
    pub fn keep_file(&self, rel: &str, bytes: &[u8]) -> Result<Option<String>> {
        let Some(dir) = self.artifacts else {
            return Ok(None);
        };
        crate::files::write_atomic(&dir.join(rel), bytes)?;
        Ok(Some(rel.to_string()))
    }

    /// Where a file of this check goes under the artifact directory (for
    /// files written by someone else, like the switch's pcap).
    pub fn artifact_path(&self, rel: &str) -> Option<std::path::PathBuf> {
        self.artifacts.map(|d| d.join(rel))
    }

    /// The host side of `node`'s forward called `name`.
    pub fn forward(&self, node: &str, name: &str) -> Result<PortForward> {
        self.record
            .nodes
            .get(node)
            .and_then(|n| n.forwards.get(name))
            .copied()
            .ok_or_else(|| anyhow!("{node} has no forward {name:?}"))
    }
}

/// For `bind`: the target node must have a forward `name` of `proto`.
pub fn require_forward(
    target: Option<&str>,
    cluster: &Cluster,
    name: &str,
    proto: Proto,
) -> Result<(), String> {
    let node: Option<&Node> = target.and_then(|t| cluster.node(t));
    let found = node.is_some_and(|n| {
        n.forwards
            .iter()
            .any(|f| f.name == name && f.proto == proto)
    });
    if found {
        Ok(())
    } else {
        Err(format!(
            "{} has no {} forward named {name:?} in the cluster file",
            target.unwrap_or("-"),
            proto.name()
        ))
    }
}

pub fn no_evidence() -> Value {
    serde_json::json!({})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_registered_kind_has_a_unique_name_and_rejects_unknown_fields() {
        let mut names: Vec<&str> = KINDS.iter().map(|k| k.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), KINDS.len());
        for kind in KINDS {
            let mut t = toml::Table::new();
            t.insert("no_such_field".into(), toml::Value::Integer(1));
            let e = kind.parse(t).unwrap_err();
            assert!(
                e.contains("no_such_field") || e.contains("missing field"),
                "{}: {e}",
                kind.name
            );
        }
    }

    #[test]
    fn unknown_kind_lists_the_known_ones() {
        let e = Kind::named("warp").unwrap_err();
        assert!(e.contains("\"warp\"") && e.contains("tcp_open"), "{e}");
    }
}
