//! `redis_faults`: asynchronous replication under a partition, judged for
//! what redis promises. A client on the primary writes distinct keys at a
//! steady rate; the primary is partitioned away from its replicas (and
//! every other node) for `phase_s`, then healed. Redis promises that the
//! replicas converge on the primary once the link is back, and the check
//! times that per replica.
//!
//! It does not promise durability of acknowledged writes: with no
//! failover in this cluster none should be lost, but if some are, the check
//! reports them by key as acknowledged-then-lost and is `degraded`, never a
//! pass. Replicas that do not converge fail it.

use super::scenario::{self, Workload};
use super::{Check, Ctx, Verdict};
use crate::guest::{self, Guest};
use crate::history::{Ack, Op, Tally};
use crate::spec::Cluster;
use crate::text::shell_quote;
use crate::wait::Wait;
use anyhow::Result;
use serde::Deserialize;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisFaults {
    primary: String,
    /// Selections like `role:control` work; the primary is left out.
    replicas: Vec<String>,
    /// Writes per second.
    #[serde(default = "default_rate")]
    rate: f64,
    /// Seconds healthy, and seconds partitioned.
    #[serde(default = "crate::spec::default::u64::<12>")]
    phase_s: u64,
    /// Seconds a replica may take to converge after the heal.
    #[serde(default = "crate::spec::default::u64::<90>")]
    converge_s: u64,
}

fn default_rate() -> f64 {
    4.0
}

impl Check for RedisFaults {
    fn bind(&mut self, _target: Option<&str>, cluster: &Cluster) -> Result<(), String> {
        if cluster.node(&self.primary).is_none() {
            return Err(format!("no node {:?} in the cluster", self.primary));
        }
        self.replicas = cluster.select(&self.replicas)?;
        self.replicas.retain(|r| *r != self.primary);
        if self.replicas.is_empty() {
            return Err("no replicas besides the primary".into());
        }
        if !(self.rate > 0.0 && self.rate <= 50.0) {
            return Err("rate must be between 0 and 50 writes per second".into());
        }
        Ok(())
    }

    fn attempt(&self, ctx: &Ctx, _target: Option<&str>, _budget: Duration) -> Result<Verdict> {
        scenario::framed(ctx, "redis", || self.scenario(ctx))
    }
}

impl RedisFaults {
    fn scenario(&self, ctx: &Ctx) -> Result<(Verdict, Vec<Op>)> {
        let nanos = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
        let prefix = format!("photon:faults:{nanos}:");
        let w = Workload::new();
        let phase = Duration::from_secs(self.phase_s);
        let mut ev = json!({ "primary": self.primary, "replicas": self.replicas,
                             "prefix": prefix, "rate": self.rate });
        let mut problems = Vec::new();
        let steps = std::thread::scope(|s| -> Result<()> {
            let writer = s.spawn(|| {
                let mut session: Option<Guest> = None;
                w.write_loop(&prefix, self.rate, |seq, key| {
                    let (result, error) = set(ctx, &self.primary, &mut session, key, seq);
                    (self.primary.clone(), result, error)
                })
            });
            let steps = (|| -> Result<()> {
                Wait::hold("the workload's phase", phase)?;
                let cut = vec![
                    vec![self.primary.clone()],
                    scenario::all_but(ctx, &self.primary),
                ];
                ev["partition"] = json!({ "said": crate::fault::partition(ctx.record, &cut)? });
                w.set_phase("partitioned");
                Wait::hold("the workload's phase", phase)?;
                // The replicas know they lost the primary (repl-timeout may be
                // longer than the phase: then they still say "up").
                let mut links = BTreeMap::new();
                for r in &self.replicas {
                    links.insert(
                        r.clone(),
                        link_status(ctx, r).unwrap_or_else(|e| format!("{e:#}")),
                    );
                }
                ev["partition"]["replica_link_status"] = json!(links);
                ev["partition"]["primary_acknowledged"] = json!(w.acked_in("partitioned", ""));
                crate::fault::heal(ctx.record)?;
                w.set_phase("healed");
                let acked = w.acked();
                let mut converged = BTreeMap::new();
                for r in &self.replicas {
                    let within = Duration::from_secs(self.converge_s);
                    match converge_time(ctx, r, &prefix, &acked, within) {
                        Ok(secs) => {
                            converged.insert(r.clone(), json!(secs));
                        }
                        Err(e) => {
                            converged.insert(r.clone(), json!(null));
                            problems.push(e);
                        }
                    }
                }
                ev["converged_after_heal_s"] = json!(converged);
                Wait::hold("writes after the heal", Duration::from_secs(2))?;
                Ok(())
            })();
            w.stop();
            writer.join().expect("workload thread");
            steps
        });
        if let Err(e) = steps {
            // Stopped midway: leave no partition behind.
            let _ = crate::fault::heal(ctx.record);
            problems.push(format!("the scenario stopped: {e:#}"));
        }
        let ops = w.into_ops();
        let acked: Vec<Op> = ops
            .iter()
            .filter(|o| o.result == Ack::Acknowledged)
            .cloned()
            .collect();
        let mut held = BTreeMap::new();
        for m in std::iter::once(&self.primary).chain(&self.replicas) {
            let _ = converge_time(ctx, m, &prefix, &acked, Duration::from_secs(20));
            held.insert(m.clone(), keys(&guest::connect(ctx.record, m)?, &prefix)?);
        }
        let tally = Tally::of(&ops, &held);
        ev["tally"] = json!(tally);
        let counts = format!(
            "{} acknowledged, {} refused, {} indeterminate, {} lost",
            tally.acknowledged, tally.refused, tally.indeterminate, tally.lost
        );
        let verdict = if !problems.is_empty() {
            Verdict::fail(format!("{}; {counts}", problems.join("; ")), ev)
        } else if tally.lost > 0 {
            let named: Vec<String> = tally
                .missing
                .iter()
                .map(|(m, k)| {
                    format!(
                        "{m} lacks {}",
                        k.iter().take(5).cloned().collect::<Vec<_>>().join(" ")
                    )
                })
                .collect();
            Verdict::degraded(
                format!(
                    "{counts}: acknowledged-then-lost writes ({}); redis replication is \
                     asynchronous and does not promise them",
                    named.join("; ")
                ),
                ev,
            )
        } else {
            let slowest = ev["converged_after_heal_s"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(_, v)| v.as_f64())
                .fold(0.0, f64::max);
            Verdict::pass(
                format!(
                    "{counts}; every replica converged on the primary {slowest:.1} s after the heal"
                ),
                ev,
            )
        };
        Ok((verdict, ops))
    }
}

/// One SET on the primary, through its own session.
fn set(
    ctx: &Ctx,
    primary: &str,
    session: &mut Option<Guest>,
    key: &str,
    seq: u64,
) -> (Ack, String) {
    if session.is_none() {
        *session = guest::connect(ctx.record, primary).ok();
    }
    let Some(g) = session.as_ref() else {
        return (Ack::Indeterminate, "no session to the primary".into());
    };
    let cmd = format!("redis-cli -h 127.0.0.1 SET {} {seq}", shell_quote(key));
    match g.exec(&cmd, Duration::from_secs(5)) {
        Ok(out) if out.ok() && out.stdout.trim() == "OK" => (Ack::Acknowledged, String::new()),
        Ok(out) => {
            let said = format!("{}{}", out.stdout, out.stderr).trim().to_string();
            // Answers given before the write was applied.
            let refused = ["Connection refused", "READONLY", "NOREPLICAS"]
                .iter()
                .any(|r| said.contains(r));
            (
                if refused {
                    Ack::Refused
                } else {
                    Ack::Indeterminate
                },
                said,
            )
        }
        Err(e) => {
            *session = None;
            (Ack::Indeterminate, format!("client session: {e:#}"))
        }
    }
}

/// The replica's `master_link_status` (up or down).
fn link_status(ctx: &Ctx, replica: &str) -> Result<String> {
    let out = guest::connect(ctx.record, replica)?.succeed(
        "redis-cli -h 127.0.0.1 INFO replication",
        Duration::from_secs(10),
    )?;
    Ok(out
        .lines()
        .find_map(|l| l.trim().strip_prefix("master_link_status:"))
        .unwrap_or("not a replica")
        .to_string())
}

/// The keys under `prefix` in a member's own data set.
fn keys(g: &Guest, prefix: &str) -> Result<BTreeSet<String>> {
    let out = g.succeed(
        &format!(
            "redis-cli -h 127.0.0.1 --scan --pattern {}",
            shell_quote(&format!("{prefix}*"))
        ),
        Duration::from_secs(20),
    )?;
    Ok(out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// Seconds until `member` holds every acknowledged key, or why not.
fn converge_time(
    ctx: &Ctx,
    member: &str,
    prefix: &str,
    acked: &[Op],
    within: Duration,
) -> Result<f64, String> {
    let mut session: Option<Guest> = None;
    scenario::until_holds(member, acked, within, Duration::from_millis(250), || {
        if session.is_none() {
            session = guest::connect(ctx.record, member).ok();
        }
        let read = match &session {
            Some(g) => keys(g, prefix),
            None => Err(anyhow::anyhow!("no SSH session")),
        };
        if read.is_err() {
            session = None;
        }
        read
    })
}
