//! Replicated state: write a fresh value through one node, then read it on
//! every member from that member's own copy (etcd serializable reads, redis
//! replicas) until each has it, and report how long that took.

use super::{Check, Ctx, Verdict};
use crate::spec::Cluster;
use crate::text::shell_quote;
use crate::wait::{Pause, Probe, Wait};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// `replicated_kv`: write through the target, read the same value on every
/// member from its own copy.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicatedKv {
    store: Store,
    /// Node names, `all` or `role:<role>`; expanded when the lane is loaded.
    members: Vec<String>,
}

impl Check for ReplicatedKv {
    fn bind(&mut self, _target: Option<&str>, cluster: &Cluster) -> Result<(), String> {
        self.members = cluster.select(&self.members)?;
        Ok(())
    }

    fn attempt(&self, ctx: &Ctx, target: Option<&str>, budget: Duration) -> Result<Verdict> {
        converge(ctx, self.store, ctx.node(target)?, &self.members, budget)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Store {
    Etcd,
    Redis,
}

impl Store {
    fn write(self, key: &str, value: &str) -> String {
        match self {
            Store::Etcd => format!(
                "ETCDCTL_API=3 etcdctl --endpoints=http://127.0.0.1:2379 put {} {}",
                shell_quote(key),
                shell_quote(value)
            ),
            Store::Redis => format!(
                "redis-cli -h 127.0.0.1 SET {} {}",
                shell_quote(key),
                shell_quote(value)
            ),
        }
    }

    /// A read served by the member itself, not forwarded to a leader.
    fn read_local(self, key: &str) -> String {
        match self {
            Store::Etcd => format!(
                "ETCDCTL_API=3 etcdctl --endpoints=http://127.0.0.1:2379 get \
                 --consistency=s --print-value-only {}",
                shell_quote(key)
            ),
            Store::Redis => format!("redis-cli -h 127.0.0.1 GET {}", shell_quote(key)),
        }
    }
}

pub fn converge(
    ctx: &Ctx,
    store: Store,
    writer: &str,
    members: &[String],
    budget: Duration,
) -> Result<Verdict> {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    let key = format!("photon/smoke/{writer}/{nanos}");
    let value = format!("v{nanos}");
    let guest = ctx.guests.get(writer)?;
    let wrote = guest.exec(&store.write(&key, &value), Duration::from_secs(15))?;
    let mut evidence = json!({ "store": store, "writer": writer, "key": key, "value": value });
    if !wrote.ok() {
        evidence["write_error"] = json!(format!("{}{}", wrote.stdout, wrote.stderr));
        return Ok(Verdict::fail(
            format!("write through {writer} failed"),
            evidence,
        ));
    }
    let written = Instant::now();
    let deadline = written + budget;

    // Poll every member at once; each answers from its own copy.
    let results: Vec<(String, Result<f64, String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = members
            .iter()
            .map(|m| {
                let (key, value) = (&key, &value);
                s.spawn(move || {
                    let got = poll(ctx, store, m, key, value, written, deadline);
                    (m.clone(), got)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("poll thread"))
            .collect()
    });

    let mut per_member = serde_json::Map::new();
    let mut slowest = 0.0f64;
    let mut behind = Vec::new();
    for (m, r) in &results {
        match r {
            Ok(s) => {
                slowest = slowest.max(*s);
                per_member.insert(m.clone(), json!({ "converged_after_s": s }));
            }
            Err(last) => {
                behind.push(format!("{m} ({last})"));
                per_member.insert(
                    m.clone(),
                    json!({ "converged_after_s": null, "last_read": last }),
                );
            }
        }
    }
    evidence["members"] = json!(per_member);
    evidence["converged_after_s"] = json!(slowest);
    if !behind.is_empty() {
        return Ok(Verdict::fail(
            format!(
                "not converged within {:.0} s on: {}",
                budget.as_secs_f64(),
                behind.join(", ")
            ),
            evidence,
        ));
    }
    Ok(Verdict::pass(
        format!("{} members converged in {slowest:.2} s", results.len()),
        evidence,
    ))
}

/// Seconds until `member` returned `value`, or the last thing it said.
fn poll(
    ctx: &Ctx,
    store: Store,
    member: &str,
    key: &str,
    value: &str,
    written: Instant,
    deadline: Instant,
) -> Result<f64, String> {
    let mut last = String::from("never read");
    Wait::new(format!("{member} has the value"), Duration::ZERO)
        .until(deadline)
        .pause(Pause::Every(Duration::from_millis(100)))
        .run(|| {
            let read = ctx
                .guests
                .get(member)
                .and_then(|g| g.exec(&store.read_local(key), Duration::from_secs(10)));
            Ok(match read {
                Ok(out) if out.stdout.trim() == value => {
                    Probe::Done(written.elapsed().as_secs_f64())
                }
                Ok(out) => {
                    last = format!("read {:?}", out.stdout.trim());
                    Probe::Pending(last.clone())
                }
                Err(e) => {
                    if crate::guest::breaks_session(&e) {
                        ctx.guests.forget(member);
                    }
                    last = format!("{e:#}");
                    Probe::Pending(last.clone())
                }
            })
        })
        .map_err(|_| last)
}
