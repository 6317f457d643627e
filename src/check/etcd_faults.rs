//! `etcd_faults`: replicated state under faults, Jepsen-style. A client on
//! the host writes distinct keys at a steady rate for the whole scenario,
//! round-robin over the members through each member's forward to etcd's
//! JSON gateway (etcd_gateway.rs), and records what each write learned
//! (history.rs). Meanwhile:
//!
//! 1. healthy for `phase_s`;
//! 2. `isolate` is partitioned away from every other node: the majority
//!    must keep acknowledging, and the isolated member must refuse a
//!    linearizable read and a write; then heal, and time until the isolated
//!    member serves every acknowledged key;
//! 3. `crash` is killed (no shutdown) mid-workload, restarted from its own
//!    disks, and timed until it serves every acknowledged key.
//!
//! Afterwards every member's own copy is read: an acknowledged key missing
//! anywhere fails the check and is named. The history (one JSON line per
//! write) and the fabric's pcap are kept as artifacts. Whatever happens, the
//! fabric is healed before the check returns.
//!
//! `discard_reads_of = "node03"` throws that member's final read away, so
//! the check is seen to fail on lost writes (tests/cluster_e2e.rs).

use super::etcd_gateway::Gateway;
use super::scenario::{self, Workload};
use super::{Check, Ctx, Verdict};
use crate::fault;
use crate::history::{Ack, Op, Tally};
use crate::spec::{Cluster, Proto};
use crate::wait::Wait;
use anyhow::Result;
use serde::Deserialize;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdFaults {
    /// The etcd members (selections like `role:control` work).
    members: Vec<String>,
    /// The forward to each member's etcd client port.
    #[serde(default = "default_forward")]
    forward: String,
    /// The member partitioned away from every other node.
    isolate: String,
    /// The member crashed and restarted (none: no crash phase).
    #[serde(default)]
    crash: Option<String>,
    /// Writes per second.
    #[serde(default = "default_rate")]
    rate: f64,
    /// Seconds of each phase (healthy, partitioned, crashed).
    #[serde(default = "crate::spec::default::u64::<12>")]
    phase_s: u64,
    /// Seconds a member may take to serve every acknowledged key.
    #[serde(default = "crate::spec::default::u64::<90>")]
    catch_up_s: u64,
    /// Test only: ignore this member's final read (proves the check can fail).
    #[serde(default)]
    discard_reads_of: Option<String>,
}

/// As long as `start` gives a node to become ready.
const RESTART_TIMEOUT: Duration = Duration::from_secs(600);

fn default_forward() -> String {
    "etcd".into()
}
fn default_rate() -> f64 {
    10.0
}

impl Check for EtcdFaults {
    fn bind(&mut self, _target: Option<&str>, cluster: &Cluster) -> Result<(), String> {
        self.members = cluster.select(&self.members)?;
        let named = [
            ("isolate", Some(&self.isolate)),
            ("crash", self.crash.as_ref()),
        ];
        for (what, m) in named.into_iter().filter_map(|(w, m)| Some((w, m?))) {
            if !self.members.contains(m) {
                return Err(format!("{what} = {m:?} is not one of the members"));
            }
        }
        for m in &self.members {
            super::require_forward(Some(m), cluster, &self.forward, Proto::Tcp)?;
        }
        if !(self.rate > 0.0 && self.rate <= 100.0) {
            return Err("rate must be between 0 and 100 writes per second".into());
        }
        Ok(())
    }

    fn attempt(&self, ctx: &Ctx, _target: Option<&str>, _budget: Duration) -> Result<Verdict> {
        scenario::framed(ctx, "etcd", || self.scenario(ctx))
    }
}

impl EtcdFaults {
    /// A gateway client for `member`, with requests cut at `timeout`.
    fn gateway(&self, ctx: &Ctx, member: &str, timeout: Duration) -> Result<Gateway> {
        Ok(Gateway::new(
            ctx.forward(member, &self.forward)?.host,
            timeout,
        ))
    }

    fn scenario(&self, ctx: &Ctx) -> Result<(Verdict, Vec<Op>)> {
        let nanos = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
        let prefix = format!("photon/faults/{nanos}/");
        let gateways: Vec<(String, Gateway)> = self
            .members
            .iter()
            .map(|m| Ok((m.clone(), self.gateway(ctx, m, Duration::from_secs(2))?)))
            .collect::<Result<_>>()?;
        let readers: BTreeMap<String, Gateway> = self
            .members
            .iter()
            .map(|m| Ok((m.clone(), self.gateway(ctx, m, Duration::from_secs(5))?)))
            .collect::<Result<_>>()?;
        let w = Workload::new();
        let mut ev = json!({ "client": "host", "members": self.members, "prefix": prefix,
                             "isolate": self.isolate, "crash": self.crash, "rate": self.rate });
        let phase = Duration::from_secs(self.phase_s);
        let catch_up = Duration::from_secs(self.catch_up_s);
        let steps = std::thread::scope(|s| -> Result<Vec<String>> {
            let writer = s.spawn(|| {
                w.write_loop(&prefix, self.rate, |seq, key| {
                    let (member, gateway) = &gateways[seq as usize % gateways.len()];
                    let (result, error) = gateway.put(key, &seq.to_string());
                    (member.clone(), result, error)
                })
            });
            let steps = (|| -> Result<Vec<String>> {
                let mut problems = Vec::new();
                Wait::hold("the workload's phase", phase)?;

                // Partition one member away from every other node.
                let cut = vec![
                    vec![self.isolate.clone()],
                    scenario::all_but(ctx, &self.isolate),
                ];
                ev["partition"] = json!({ "said": fault::partition(ctx.record, &cut)? });
                w.set_phase("partitioned");
                let cut_at = Instant::now();
                // Past the election timeout (5 s), the isolated member knows.
                Wait::hold("past the election timeout", Duration::from_secs(6))?;
                let probe = isolated_probe(&readers[&self.isolate], &prefix);
                let refused = probe["linearizable_read_refused"] == json!(true)
                    && probe["write_refused"] == json!(true);
                if !refused {
                    problems.push(format!(
                        "{} served a linearizable read or a write while isolated",
                        self.isolate
                    ));
                }
                ev["partition"]["isolated_member"] = probe;
                Wait::hold(
                    "the rest of the phase",
                    phase.saturating_sub(cut_at.elapsed()),
                )?;
                let majority_acks = w.acked_in("partitioned", &self.isolate);
                ev["partition"]["majority_acknowledged"] = json!(majority_acks);
                if majority_acks == 0 {
                    problems.push("the majority acknowledged no write while partitioned".into());
                }
                fault::heal(ctx.record)?;
                w.set_phase("healed");
                let caught = catch_up_time(
                    &readers[&self.isolate],
                    &self.isolate,
                    &prefix,
                    &w.acked(),
                    catch_up,
                );
                ev["partition"]["isolated_caught_up_s"] = json!(caught.as_ref().ok());
                if let Err(e) = caught {
                    problems.push(format!("after the heal, {e}"));
                }

                // Crash a member mid-workload, then restart it from its disks.
                if let Some(crash) = &self.crash {
                    ev["crash"] = json!({ "said": fault::crash(ctx.record, crash)? });
                    w.set_phase("crashed");
                    Wait::hold("the workload's phase", phase)?;
                    w.set_phase("restarting");
                    let (said, ready_s) = fault::restart(ctx.record, crash, RESTART_TIMEOUT)?;
                    ctx.guests.forget(crash);
                    ev["crash"]["restart"] = json!({ "said": said, "ready_after_s": ready_s });
                    w.set_phase("recovered");
                    let caught =
                        catch_up_time(&readers[crash], crash, &prefix, &w.acked(), catch_up);
                    ev["crash"]["caught_up_s"] = json!(caught.as_ref().ok());
                    if let Err(e) = caught {
                        problems.push(format!("after the restart, {e}"));
                    }
                }
                Wait::hold("writes after the last fault", Duration::from_secs(3))?;
                Ok(problems)
            })();
            w.stop();
            writer.join().expect("workload thread");
            steps
        });
        let mut problems = match steps {
            Ok(p) => p,
            Err(e) => {
                // Stopped midway (Ctrl-C, --timeout, a fault that failed):
                // leave no partition behind.
                let _ = fault::heal(ctx.record);
                vec![format!("the scenario stopped: {e:#}")]
            }
        };

        // The final reads: every member's own copy, once it has had time.
        let ops = w.into_ops();
        let acked: Vec<Op> = ops
            .iter()
            .filter(|o| o.result == Ack::Acknowledged)
            .cloned()
            .collect();
        let mut held = BTreeMap::new();
        for m in &self.members {
            let _ = catch_up_time(&readers[m], m, &prefix, &acked, Duration::from_secs(30));
            let keys = if self.discard_reads_of.as_deref() == Some(m) {
                BTreeSet::new()
            } else {
                readers[m].keys(&prefix, true)?
            };
            held.insert(m.clone(), keys);
        }
        let tally = Tally::of(&ops, &held);
        ev["tally"] = json!(tally);
        if !tally.safe() {
            problems.insert(
                0,
                format!(
                    "{} acknowledged write(s) lost: {}",
                    tally.lost,
                    tally
                        .missing
                        .iter()
                        .map(|(m, k)| {
                            let more = if k.len() > 5 { " ..." } else { "" };
                            format!("{m} lacks {}{more}", k[..k.len().min(5)].join(" "))
                        })
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            );
        }
        let counts = format!(
            "{} acknowledged, {} refused, {} indeterminate, {} lost",
            tally.acknowledged, tally.refused, tally.indeterminate, tally.lost
        );
        let verdict = if problems.is_empty() {
            let t = |v: &serde_json::Value| v.as_f64().map_or("-".into(), |s| format!("{s:.1} s"));
            Verdict::pass(
                format!(
                    "{counts}; isolated {} caught up {} after the heal{}",
                    self.isolate,
                    t(&ev["partition"]["isolated_caught_up_s"]),
                    match &self.crash {
                        Some(c) => format!(
                            "; crashed {c} ready {} after its restart, caught up {} later",
                            t(&ev["crash"]["restart"]["ready_after_s"]),
                            t(&ev["crash"]["caught_up_s"])
                        ),
                        None => String::new(),
                    }
                ),
                ev,
            )
        } else {
            Verdict::fail(format!("{}; {counts}", problems.join("; ")), ev)
        };
        Ok((verdict, ops))
    }
}

/// Asks the isolated member itself for a linearizable read and a write;
/// both must fail while it cannot reach a quorum.
fn isolated_probe(member: &Gateway, prefix: &str) -> serde_json::Value {
    let key = format!("{prefix}isolated-probe");
    let read = member.linearizable_read(&key);
    let (write, write_error) = member.put(&key, "x");
    json!({
        "linearizable_read_refused": read.is_err(),
        "linearizable_read": match &read { Ok(()) => "served".to_string(), Err(e) => format!("{e:#}") },
        "write_refused": write != Ack::Acknowledged,
        "write": if write_error.is_empty() { "acknowledged".to_string() } else { write_error },
    })
}

/// Seconds until `member` holds every key of `acked` in its own copy (a
/// serializable read), or what it lacked.
fn catch_up_time(
    gateway: &Gateway,
    member: &str,
    prefix: &str,
    acked: &[Op],
    within: Duration,
) -> Result<f64, String> {
    scenario::until_holds(member, acked, within, Duration::from_millis(100), || {
        gateway.keys(prefix, true)
    })
}
