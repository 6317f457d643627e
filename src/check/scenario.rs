//! What fault scenarios share (etcd_faults, redis_faults): the workload's
//! shared state, its write loop, and the frame around a scenario that
//! captures the fabric, heals it whatever happened, and keeps the pcap and
//! the history as artifacts.

use super::{Ctx, Verdict};
use crate::fault;
use crate::history::{self, Ack, Op};
use crate::wait::{Pause, Probe, Wait};
use anyhow::Result;
use serde_json::json;
use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What the workload shares with the scenario driving the faults.
pub struct Workload {
    started: Instant,
    phase: Mutex<&'static str>,
    ops: Mutex<Vec<Op>>,
    stop: AtomicBool,
}

impl Workload {
    pub fn new() -> Workload {
        Workload {
            started: Instant::now(),
            phase: Mutex::new("healthy"),
            ops: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        }
    }

    pub fn set_phase(&self, p: &'static str) {
        *self.phase.lock().expect("phase") = p;
        tracing::info!("scenario: phase {p}");
    }

    /// The writes acknowledged so far.
    pub fn acked(&self) -> Vec<Op> {
        let ops = self.ops.lock().expect("ops");
        ops.iter()
            .filter(|o| o.result == Ack::Acknowledged)
            .cloned()
            .collect()
    }

    /// The writes of `phase` to members other than `except` that were acknowledged.
    pub fn acked_in(&self, phase: &str, except: &str) -> usize {
        let ops = self.ops.lock().expect("ops");
        ops.iter()
            .filter(|o| o.phase == phase && o.member != except)
            .filter(|o| o.result == Ack::Acknowledged)
            .count()
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    pub fn into_ops(self) -> Vec<Op> {
        self.ops.into_inner().expect("ops")
    }

    /// The client: one write at a time at `rate` (per second), key
    /// `<prefix><seq>`, recorded with what `write` learned, until stopped.
    /// `write(seq, key)` returns the member it wrote through, the result
    /// and the error text. It never stops on an error.
    pub fn write_loop(
        &self,
        prefix: &str,
        rate: f64,
        mut write: impl FnMut(u64, &str) -> (String, Ack, String),
    ) {
        let every = Duration::from_secs_f64(1.0 / rate);
        let mut seq = 0u64;
        while !self.stop.load(Ordering::SeqCst) {
            let tick = Instant::now();
            let key = format!("{prefix}{seq:06}");
            let phase = *self.phase.lock().expect("phase");
            let start_ms = self.started.elapsed().as_millis() as u64;
            let (member, result, error) = write(seq, &key);
            self.ops.lock().expect("ops").push(Op {
                seq,
                key,
                member,
                start_ms,
                end_ms: self.started.elapsed().as_millis() as u64,
                result,
                phase: phase.into(),
                error,
            });
            seq += 1;
            // The pacing of the writes; Ctrl-C and --timeout end the loop.
            let pace = every.saturating_sub(tick.elapsed());
            if crate::wait::Wait::hold("the next write", pace).is_err() {
                break;
            }
        }
    }
}

/// Runs `scenario` with the fabric captured into `faults/<name>.pcap`,
/// heals the fabric whatever happened, and keeps the history as
/// `faults/<name>-history.jsonl`; both are listed in `evidence.files`.
pub fn framed(
    ctx: &Ctx,
    name: &str,
    scenario: impl FnOnce() -> Result<(Verdict, Vec<Op>)>,
) -> Result<Verdict> {
    let pcap = format!("faults/{name}.pcap");
    if let Some(path) = ctx.artifact_path(&pcap) {
        fault::capture_start(ctx.record, &path)?;
    }
    let outcome = scenario();
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
    let rel = format!("faults/{name}-history.jsonl");
    if let Some(kept) = ctx.keep_file(&rel, history::to_jsonl(&ops).as_bytes())? {
        files.insert("history".into(), json!(kept));
    }
    verdict.evidence["files"] = json!(files);
    Ok(verdict)
}

/// Every node but `node`: the other side of a partition that isolates it.
pub fn all_but(ctx: &Ctx, node: &str) -> Vec<String> {
    ctx.record
        .nodes
        .keys()
        .filter(|n| *n != node)
        .cloned()
        .collect()
}

/// Seconds until `member` holds every key of `acked`, reading its keys with
/// `read` every `every`; or what it still lacked when `within` ran out.
pub fn until_holds(
    member: &str,
    acked: &[Op],
    within: Duration,
    every: Duration,
    mut read: impl FnMut() -> Result<BTreeSet<String>>,
) -> Result<f64, String> {
    let t = Instant::now();
    let mut last = String::from("never read");
    Wait::new(format!("{member} holds every acknowledged key"), within)
        .pause(Pause::Every(every))
        .run(|| {
            match read() {
                Ok(keys) => {
                    let absent = history::absent(acked, &keys);
                    if absent.is_empty() {
                        return Ok(Probe::Done(t.elapsed().as_secs_f64()));
                    }
                    last = format!(
                        "{} acknowledged key(s) absent, e.g. {}",
                        absent.len(),
                        absent[0]
                    );
                }
                Err(e) => last = format!("{e:#}"),
            }
            Ok(Probe::Pending(last.clone()))
        })
        .map_err(|_| {
            format!(
                "{member} did not hold every acknowledged key within {} s: {last}",
                within.as_secs()
            )
        })
}
