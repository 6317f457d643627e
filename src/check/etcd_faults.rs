//! `etcd_faults`: replicated state under faults, Jepsen-style. A client on
//! the target node writes distinct keys at a steady rate for the whole
//! scenario, round-robin over the members, and records what each write
//! learned (history.rs). Meanwhile:
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

use super::{Check, Ctx, Verdict};
use crate::fault;
use crate::guest::{self, Guest};
use crate::history::{self, Ack, Op, Tally};
use crate::spec::Cluster;
use crate::text::shell_quote;
use crate::wait::{Pause, Probe, Wait};
use anyhow::Result;
use serde::Deserialize;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdFaults {
    /// The etcd members (selections like `role:control` work).
    members: Vec<String>,
    /// The member partitioned away from every other node.
    isolate: String,
    /// The member crashed and restarted (none: no crash phase).
    #[serde(default)]
    crash: Option<String>,
    /// Writes per second.
    #[serde(default = "default_rate")]
    rate: f64,
    /// Seconds of each phase (healthy, partitioned, crashed).
    #[serde(default = "default_phase")]
    phase_s: u64,
    /// Seconds a member may take to serve every acknowledged key.
    #[serde(default = "default_catch_up")]
    catch_up_s: u64,
    /// Test only: ignore this member's final read (proves the check can fail).
    #[serde(default)]
    discard_reads_of: Option<String>,
}

/// As long as `start` gives a node to become ready.
const RESTART_TIMEOUT: Duration = Duration::from_secs(600);

fn default_rate() -> f64 {
    4.0
}
fn default_phase() -> u64 {
    12
}
fn default_catch_up() -> u64 {
    90
}

impl Check for EtcdFaults {
    fn retried(&self) -> bool {
        false
    }

    fn bind(&mut self, target: Option<&str>, cluster: &Cluster) -> Result<(), String> {
        self.members = cluster.select(&self.members)?;
        let named = [("isolate", Some(&self.isolate)), ("crash", self.crash.as_ref())];
        for (what, m) in named.into_iter().filter_map(|(w, m)| Some((w, m?))) {
            if !self.members.contains(m) {
                return Err(format!("{what} = {m:?} is not one of the members"));
            }
        }
        if let Some(t) = target
            && (t == self.isolate || self.crash.as_deref() == Some(t))
        {
            return Err(format!(
                "the client ({t}) must not be the node the scenario isolates or crashes"
            ));
        }
        if !(self.rate > 0.0 && self.rate <= 50.0) {
            return Err("rate must be between 0 and 50 writes per second".into());
        }
        Ok(())
    }

    fn attempt(&self, ctx: &Ctx, target: Option<&str>, _budget: Duration) -> Result<Verdict> {
        let client = ctx.node(target)?;
        let pcap = format!("faults/etcd-{client}.pcap");
        if let Some(path) = ctx.artifact_path(&pcap) {
            fault::capture_start(ctx.record, &path)?;
        }
        let outcome = self.scenario(ctx, client);
        // Whatever happened, leave the fabric whole for the next check.
        let healed = fault::heal(ctx.record);
        let captured = fault::capture_stop(ctx.record);
        let (mut verdict, ops) = outcome?;
        healed?;
        let mut files = serde_json::Map::new();
        if let Ok((Some(_), frames)) = captured {
            files.insert("pcap".into(), json!(pcap));
            verdict.evidence["captured_frames"] = json!(frames);
        }
        let rel = format!("faults/etcd-{client}-history.jsonl");
        if let Some(kept) = ctx.keep_file(&rel, history::to_jsonl(&ops).as_bytes())? {
            files.insert("history".into(), json!(kept));
        }
        verdict.evidence["files"] = json!(files);
        Ok(verdict)
    }
}

/// What the workload shares with the scenario driving the faults.
struct Workload {
    started: Instant,
    phase: Mutex<&'static str>,
    ops: Mutex<Vec<Op>>,
    stop: AtomicBool,
}

impl Workload {
    fn set_phase(&self, p: &'static str) {
        *self.phase.lock().expect("phase") = p;
        tracing::info!("etcd_faults: phase {p}");
    }
    fn acked(&self) -> Vec<Op> {
        let ops = self.ops.lock().expect("ops");
        ops.iter()
            .filter(|o| o.result == Ack::Acknowledged)
            .cloned()
            .collect()
    }
}

impl EtcdFaults {
    fn scenario(&self, ctx: &Ctx, client: &str) -> Result<(Verdict, Vec<Op>)> {
        let nanos = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
        let prefix = format!("photon/faults/{nanos}/");
        let addrs: Vec<(String, String)> = self
            .members
            .iter()
            .map(|m| {
                let a = ctx.cluster.node(m).map(|n| n.address.to_string());
                (m.clone(), a.unwrap_or_default())
            })
            .collect();
        let w = Workload {
            started: Instant::now(),
            phase: Mutex::new("healthy"),
            ops: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        };
        let mut ev = json!({ "client": client, "members": self.members, "prefix": prefix,
                             "isolate": self.isolate, "crash": self.crash, "rate": self.rate });
        let phase = Duration::from_secs(self.phase_s);
        let catch_up = Duration::from_secs(self.catch_up_s);
        let steps = std::thread::scope(|s| -> Result<Vec<String>> {
            let writer = s.spawn(|| write_loop(ctx, client, &addrs, &prefix, self.rate, &w));
            let steps = (|| -> Result<Vec<String>> {
                let mut problems = Vec::new();
                std::thread::sleep(phase);

                // Partition one member away from every other node.
                let rest: Vec<String> = ctx
                    .record
                    .nodes
                    .keys()
                    .filter(|n| **n != self.isolate)
                    .cloned()
                    .collect();
                let cut = vec![vec![self.isolate.clone()], rest];
                ev["partition"] = json!({ "said": fault::partition(ctx.record, &cut)? });
                w.set_phase("partitioned");
                let cut_at = Instant::now();
                // Past the election timeout (5 s), the isolated member knows.
                std::thread::sleep(Duration::from_secs(6));
                let probe = isolated_probe(ctx, &self.isolate, &prefix)?;
                let refused = probe["linearizable_read_refused"] == json!(true)
                    && probe["write_refused"] == json!(true);
                if !refused {
                    problems.push(format!(
                        "{} served a linearizable read or a write while isolated",
                        self.isolate
                    ));
                }
                ev["partition"]["isolated_member"] = probe;
                std::thread::sleep(phase.saturating_sub(cut_at.elapsed()));
                let majority_acks = w
                    .ops
                    .lock()
                    .expect("ops")
                    .iter()
                    .filter(|o| o.phase == "partitioned" && o.member != self.isolate)
                    .filter(|o| o.result == Ack::Acknowledged)
                    .count();
                ev["partition"]["majority_acknowledged"] = json!(majority_acks);
                if majority_acks == 0 {
                    problems.push("the majority acknowledged no write while partitioned".into());
                }
                fault::heal(ctx.record)?;
                w.set_phase("healed");
                let caught = catch_up_time(ctx, &self.isolate, &prefix, &w.acked(), catch_up);
                ev["partition"]["isolated_caught_up_s"] = json!(caught.as_ref().ok());
                if let Err(e) = caught {
                    problems.push(format!("after the heal, {e}"));
                }

                // Crash a member mid-workload, then restart it from its disks.
                if let Some(crash) = &self.crash {
                    ev["crash"] = json!({ "said": fault::crash(ctx.record, crash)? });
                    w.set_phase("crashed");
                    std::thread::sleep(phase);
                    w.set_phase("restarting");
                    let (said, ready_s) = fault::restart(ctx.record, crash, RESTART_TIMEOUT)?;
                    ctx.guests.forget(crash);
                    ev["crash"]["restart"] = json!({ "said": said, "ready_after_s": ready_s });
                    w.set_phase("recovered");
                    let caught = catch_up_time(ctx, crash, &prefix, &w.acked(), catch_up);
                    ev["crash"]["caught_up_s"] = json!(caught.as_ref().ok());
                    if let Err(e) = caught {
                        problems.push(format!("after the restart, {e}"));
                    }
                }
                std::thread::sleep(Duration::from_secs(3));
                Ok(problems)
            })();
            w.stop.store(true, Ordering::SeqCst);
            writer.join().expect("workload thread");
            steps
        });
        let mut problems = match steps {
            Ok(p) => p,
            Err(e) => vec![format!("the scenario stopped: {e:#}")],
        };

        // The final reads: every member's own copy, once it has had time.
        let ops = w.ops.into_inner().expect("ops");
        let acked: Vec<Op> = ops
            .iter()
            .filter(|o| o.result == Ack::Acknowledged)
            .cloned()
            .collect();
        let mut held = BTreeMap::new();
        for m in &self.members {
            let _ = catch_up_time(ctx, m, &prefix, &acked, Duration::from_secs(30));
            let keys = if self.discard_reads_of.as_deref() == Some(m) {
                BTreeSet::new()
            } else {
                member_keys(&guest::connect(ctx.record, m)?, &prefix)?
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
                        .map(|(m, k)| format!("{m} lacks {}", k.join(" ")))
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

/// The client: one write at a time at `rate`, round-robin over the members,
/// each recorded with what it learned. It never stops on an error.
fn write_loop(
    ctx: &Ctx,
    client: &str,
    members: &[(String, String)],
    prefix: &str,
    rate: f64,
    w: &Workload,
) {
    let every = Duration::from_secs_f64(1.0 / rate);
    let mut session: Option<Guest> = None;
    let mut seq = 0u64;
    while !w.stop.load(Ordering::SeqCst) && !crate::interrupted() {
        let tick = Instant::now();
        let (member, addr) = &members[seq as usize % members.len()];
        let key = format!("{prefix}{seq:06}");
        let cmd = format!(
            "ETCDCTL_API=3 etcdctl --endpoints=http://{addr}:2379 --dial-timeout=1s \
             --command-timeout=2s put {} {seq}",
            shell_quote(&key)
        );
        let phase = *w.phase.lock().expect("phase");
        let start_ms = w.started.elapsed().as_millis() as u64;
        if session.is_none() {
            session = guest::connect(ctx.record, client).ok();
        }
        let (result, error) = match session.as_ref().map(|g| g.exec(&cmd, Duration::from_secs(6))) {
            Some(Ok(out)) if out.ok() && out.stdout.trim() == "OK" => (Ack::Acknowledged, String::new()),
            Some(Ok(out)) => (classify(&out.stderr), out.stderr.trim().to_string()),
            Some(Err(e)) => {
                session = None;
                (Ack::Indeterminate, format!("client session: {e:#}"))
            }
            None => (Ack::Indeterminate, "no session to the client node".into()),
        };
        w.ops.lock().expect("ops").push(Op {
            seq,
            key,
            member: member.clone(),
            start_ms,
            end_ms: w.started.elapsed().as_millis() as u64,
            result,
            phase: phase.into(),
            error,
        });
        seq += 1;
        std::thread::sleep(every.saturating_sub(tick.elapsed()));
    }
}

/// What a failed etcdctl write means. Only answers given before the write
/// was proposed are refusals; a timeout may have been applied.
fn classify(stderr: &str) -> Ack {
    const REFUSED: [&str; 3] = ["connection refused", "etcdserver: no leader", "not capable"];
    if REFUSED.iter().any(|r| stderr.contains(r)) {
        Ack::Refused
    } else {
        Ack::Indeterminate
    }
}

/// Asks the isolated member itself for a linearizable read and a write; both
/// must fail while it cannot reach a quorum.
fn isolated_probe(ctx: &Ctx, member: &str, prefix: &str) -> Result<serde_json::Value> {
    let g = guest::connect(ctx.record, member)?;
    let base = "ETCDCTL_API=3 etcdctl --endpoints=http://127.0.0.1:2379 --command-timeout=3s";
    let key = shell_quote(&format!("{prefix}isolated-probe"));
    let read = g.exec(&format!("{base} get --consistency=l {key}"), Duration::from_secs(10))?;
    let write = g.exec(&format!("{base} put {key} x"), Duration::from_secs(10))?;
    Ok(json!({
        "linearizable_read_refused": !read.ok(),
        "linearizable_read": format!("{}{}", read.stdout, read.stderr).trim(),
        "write_refused": !write.ok(),
        "write": format!("{}{}", write.stdout, write.stderr).trim(),
    }))
}

/// The keys under `prefix` in the member's own copy (a serializable read).
fn member_keys(g: &Guest, prefix: &str) -> Result<BTreeSet<String>> {
    let out = g.succeed(
        &format!(
            "ETCDCTL_API=3 etcdctl --endpoints=http://127.0.0.1:2379 --command-timeout=10s \
             get --prefix --keys-only --consistency=s {}",
            shell_quote(prefix)
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

/// Seconds until `member` holds every key of `acked`, or what it lacked.
fn catch_up_time(
    ctx: &Ctx,
    member: &str,
    prefix: &str,
    acked: &[Op],
    within: Duration,
) -> Result<f64, String> {
    let t = Instant::now();
    let mut session: Option<Guest> = None;
    let mut last = String::from("never read");
    Wait::new(format!("{member} serves every acknowledged key"), within)
        .pause(Pause::Every(Duration::from_millis(250)))
        .run(|| {
            if session.is_none() {
                session = guest::connect(ctx.record, member).ok();
            }
            let Some(g) = &session else {
                last = "no SSH session".into();
                return Ok(Probe::Pending(last.clone()));
            };
            match member_keys(g, prefix) {
                Ok(keys) => {
                    let absent = history::absent(acked, &keys);
                    if absent.is_empty() {
                        return Ok(Probe::Done(t.elapsed().as_secs_f64()));
                    }
                    last = format!("{} acknowledged key(s) absent, e.g. {}", absent.len(), absent[0]);
                }
                Err(e) => {
                    session = None;
                    last = format!("{e:#}");
                }
            }
            Ok(Probe::Pending(last.clone()))
        })
        .map_err(|_| format!("{member} did not serve every acknowledged key within {} s: {last}", within.as_secs()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_answers_before_the_proposal_are_refusals() {
        assert_eq!(classify("Error: etcdserver: no leader"), Ack::Refused);
        assert_eq!(
            classify("dial tcp 10.77.0.13:2379: connect: connection refused"),
            Ack::Refused
        );
        assert_eq!(
            classify("Error: context deadline exceeded"),
            Ack::Indeterminate
        );
        assert_eq!(classify("etcdserver: request timed out"), Ack::Indeterminate);
    }
}
