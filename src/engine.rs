//! The check engine: runs a lane's layers in order against a running
//! cluster and turns each check into a `CheckResult`.
//!
//! Within a layer, checks on different nodes run in parallel (one thread
//! per node, that node's checks in lane order); checks on one node share
//! its SSH session, so they run one after another. A layer that fails
//! stops the lane: later layers are recorded as skipped, because they
//! depend on what failed (`--keep-going` runs them anyway).
//!
//! A check marked flaky in its lane (`flaky = { reason, reruns }`) that
//! fails, in a layer where every failed check is so marked, is retried
//! from the snapshot: the `reset` hook brings the cluster back to it, and
//! the lane runs again from its first layer (what the check stands on is
//! rebuilt too). A pass after that is `flaky`, with the failures it
//! followed kept beside it; never a plain pass.
//!
//! A retried check is tried again after a pause that grows (50 ms doubling
//! to 1 s) until it passes or its deadline passes; an attempt that would
//! not end before the deadline (it takes as long as the last one) is not
//! begun. An attempt whose SSH
//! session broke drops that session, so the next attempt opens a new one,
//! whatever the check's kind.

use crate::check::{Ctx, Outcome, Part, Verdict};
use crate::guest::GuestPool;
use crate::lane::{Lane, PlannedCheck};
use crate::progress::Progress;
use crate::state::RunningCluster;
use crate::wait::Pause;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Brings the cluster back to its snapshot before a flaky check's rerun;
/// says what it did, with the restored cluster's record when the guests
/// were replaced (new processes, host ports and sessions: the engine runs
/// on from that record), or none when the lane ran again in place.
pub type Reset<'a> = &'a (dyn Fn() -> anyhow::Result<Restored> + Sync);

/// What a reset did.
pub struct Restored {
    pub note: String,
    pub record: Option<RunningCluster>,
}

/// How a lane runs.
#[derive(Clone, Copy)]
pub struct RunOptions<'a> {
    /// Run every layer even after one failed.
    pub keep_going: bool,
    /// Whether the user asked to stop (Ctrl-C); checked before every check
    /// and attempt.
    pub interrupted: fn() -> bool,
    /// The pause between attempts of a retried check.
    pub retry: Pause,
    /// Undoes faults a layer left behind (a failed scenario's partition, a
    /// paused or crashed node) before the next layer; says what it did.
    pub restore: fn(&Ctx) -> Option<String>,
    /// Brings the cluster back to its snapshot before a flaky check is
    /// retried. None: marked checks are not retried.
    pub reset: Option<Reset<'a>>,
}

impl<'a> RunOptions<'a> {
    pub fn new(keep_going: bool, reset: Option<Reset<'a>>) -> Self {
        RunOptions {
            keep_going,
            interrupted: crate::interrupted,
            retry: Pause::RETRY,
            restore: |ctx| crate::fault::restore(ctx.record),
            reset,
        }
    }
}

/// A flaky-marked check's record: its mark, and each failure that was
/// retried from the snapshot (the evidence of the failing run).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FlakyRecord {
    pub reason: String,
    /// Reruns the mark allows.
    pub reruns: u32,
    pub failures: Vec<EarlierFailure>,
    /// What each reset did (restored the snapshot, or why it could not).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resets: Vec<String>,
}

/// One failed run of a marked check, before it was run again.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EarlierFailure {
    pub message: String,
    pub duration_s: f64,
    pub evidence: Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckResult {
    pub id: String,
    pub kind: String,
    pub target: Option<String>,
    pub outcome: Outcome,
    pub message: String,
    /// Seconds from the start of the lane to the start of this check.
    pub started_s: f64,
    pub duration_s: f64,
    pub attempts: u32,
    /// Where the check is defined, `file:line`.
    pub origin: String,
    pub evidence: Value,
    /// The file (relative to the run directory) that holds this check's evidence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<String>,
    /// A check marked flaky in its lane: the reason and the failures it was
    /// retried after (its outcome is `flaky` when it passed after them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flaky: Option<FlakyRecord>,
    /// A part of another check (a script's subtest): that check's id. It
    /// comes right after that check, and that check failed if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part_of: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerResult {
    pub name: String,
    pub description: String,
    pub outcome: Outcome,
    pub duration_s: f64,
    pub checks: Vec<CheckResult>,
    /// What was undone after the layer: faults its checks left in place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored: Option<String>,
}

/// The outcome that sums up a set of outcomes: any fail fails; otherwise
/// any flaky is flaky; any degraded degrades; all skipped is skipped; else
/// pass.
pub fn overall(outcomes: impl IntoIterator<Item = Outcome>) -> Outcome {
    let all: Vec<Outcome> = outcomes.into_iter().collect();
    if all.contains(&Outcome::Fail) {
        Outcome::Fail
    } else if all.contains(&Outcome::Flaky) {
        Outcome::Flaky
    } else if all.contains(&Outcome::Degraded) {
        Outcome::Degraded
    } else if !all.is_empty() && all.iter().all(|o| *o == Outcome::Skipped) {
        Outcome::Skipped
    } else {
        Outcome::Pass
    }
}

impl LayerResult {
    pub fn new(name: &str, description: &str, checks: Vec<CheckResult>, duration_s: f64) -> Self {
        LayerResult {
            name: name.to_string(),
            description: description.to_string(),
            outcome: overall(checks.iter().map(|c| c.outcome)),
            duration_s,
            checks,
            restored: None,
        }
    }
}

/// Runs every layer of `lane`. Never fails: a check that errors is a
/// failed check with the error as its message. Returns the layers, and the
/// cluster's record when a flaky check's reset replaced the guests (the
/// caller's record then names processes and ports that are gone).
pub fn run(
    lane: &Lane,
    ctx: &Ctx,
    opts: RunOptions,
    lane_start: Instant,
) -> (Vec<LayerResult>, Option<RunningCluster>) {
    let mut earlier: BTreeMap<String, FlakyRecord> = BTreeMap::new();
    let mut replaced: Option<(RunningCluster, GuestPool)> = None;
    loop {
        let current = match &replaced {
            Some((record, guests)) => Ctx {
                record,
                guests,
                ..*ctx
            },
            None => *ctx,
        };
        match run_once(lane, &current, opts, lane_start, &mut earlier) {
            Pass::Done(layers) => return (layers, replaced.map(|(r, _)| r)),
            Pass::Again(Some(record)) => {
                let guests = GuestPool::new(&record);
                replaced = Some((*record, guests));
            }
            Pass::Again(None) => {}
        }
    }
}

/// How one pass over the lane ended.
enum Pass {
    Done(Vec<LayerResult>),
    /// The cluster was reset to its snapshot for a flaky check: run the
    /// lane again from its first layer, on the restored cluster if the
    /// guests were replaced.
    Again(Option<Box<RunningCluster>>),
}

/// One pass over the layers; `earlier` keeps the failures of marked checks
/// across passes.
fn run_once(
    lane: &Lane,
    ctx: &Ctx,
    opts: RunOptions,
    lane_start: Instant,
    earlier: &mut BTreeMap<String, FlakyRecord>,
) -> Pass {
    let mut out = Vec::new();
    let mut blocked: Option<String> = None;
    for layer in &lane.layers {
        let started = Instant::now();
        let _layer = tracing::info_span!("layer", name = %layer.name).entered();
        let mut results: Vec<CheckResult> = if let Some(reason) = &blocked {
            layer
                .checks
                .iter()
                .map(|c| skipped(c, reason, lane_start))
                .collect()
        } else {
            tracing::info!("== layer {}: {} checks", layer.name, layer.checks.len());
            run_layer(&layer.checks, ctx, opts, lane_start)
        };
        if blocked.is_none()
            && let Some(restored) = retry_from_snapshot(&layer.checks, &results, ctx, opts, earlier)
        {
            return Pass::Again(restored);
        }
        for r in &mut results {
            judge_marked(r, earlier);
        }
        let mut result = LayerResult::new(
            &layer.name,
            &layer.description,
            results,
            started.elapsed().as_secs_f64(),
        );
        if blocked.is_none() {
            result.restored = (opts.restore)(ctx);
            if let Some(note) = &result.restored {
                tracing::warn!("after layer {}: {note}", layer.name);
            }
        }
        if blocked.is_none() {
            if (opts.interrupted)() {
                blocked = Some("interrupted".into());
            } else if result.outcome == Outcome::Fail && !opts.keep_going {
                blocked = Some(format!("layer {} failed", layer.name));
            }
        }
        out.push(result);
    }
    Pass::Done(out)
}

/// Whether the layer's failures are all marked flaky with reruns left; if
/// so, records them, resets the cluster to its snapshot, and says yes
/// (with the restored cluster's record, if the guests were replaced). An
/// unmarked failure fails the layer whatever a rerun would do.
fn retry_from_snapshot(
    planned: &[PlannedCheck],
    results: &[CheckResult],
    ctx: &Ctx,
    opts: RunOptions,
    earlier: &mut BTreeMap<String, FlakyRecord>,
) -> Option<Option<Box<RunningCluster>>> {
    let reset = opts.reset?;
    let failed: Vec<(&CheckResult, &PlannedCheck)> = results
        .iter()
        // A part's failure is its check's failure: the check decides.
        .filter(|r| r.outcome == Outcome::Fail && r.part_of.is_none())
        .filter_map(|r| Some((r, planned.iter().find(|p| p.id == r.id)?)))
        .collect();
    let retriable = |(r, p): &(&CheckResult, &PlannedCheck)| {
        p.flaky.as_ref().is_some_and(|m| {
            let used = earlier.get(&r.id).map_or(0, |e| e.failures.len());
            (used as u32) < m.reruns
        })
    };
    if failed.is_empty() || !failed.iter().all(retriable) || (opts.interrupted)() {
        return None;
    }
    tracing::warn!(
        "flaky check(s) {} failed: back to the snapshot, the lane runs again",
        failed
            .iter()
            .map(|(r, _)| r.id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let (note, restored) = match reset() {
        Ok(done) => (done.note, Ok(done.record.map(Box::new))),
        Err(e) => (format!("reset failed: {e:#}"), Err(())),
    };
    for (r, p) in &failed {
        let mark = p.flaky.as_ref().expect("only marked checks are retried");
        let rec = earlier.entry(r.id.clone()).or_insert_with(|| FlakyRecord {
            reason: mark.reason.clone(),
            reruns: mark.reruns,
            failures: Vec::new(),
            resets: Vec::new(),
        });
        rec.failures.push(EarlierFailure {
            message: r.message.clone(),
            duration_s: r.duration_s,
            evidence: r.evidence.clone(),
        });
        rec.resets.push(note.clone());
    }
    // The guests were reset: every kept session is gone.
    for node in ctx.record.nodes.keys() {
        ctx.guests.forget(node);
    }
    restored.ok()
}

/// A marked check's result after its reruns: a pass that followed failures
/// is `flaky`, and every marked check carries its record.
fn judge_marked(r: &mut CheckResult, earlier: &BTreeMap<String, FlakyRecord>) {
    let Some(rec) = earlier.get(&r.id) else {
        return;
    };
    if matches!(r.outcome, Outcome::Pass | Outcome::Degraded) {
        r.outcome = Outcome::Flaky;
        r.message = format!(
            "{} (flaky: passed after {} failure(s) retried from the snapshot; {})",
            r.message,
            rec.failures.len(),
            rec.reason
        );
    }
    r.flaky = Some(rec.clone());
}

fn run_layer(
    checks: &[PlannedCheck],
    ctx: &Ctx,
    opts: RunOptions,
    lane_start: Instant,
) -> Vec<CheckResult> {
    let ids: Vec<String> = checks.iter().map(|c| c.id.clone()).collect();
    let progress = Progress::new(&ids);
    // One queue per target node; host-only checks get their own queue.
    let mut queues: BTreeMap<String, Vec<&PlannedCheck>> = BTreeMap::new();
    for c in checks {
        let key = c.target.clone().unwrap_or_else(|| "(host)".into());
        queues.entry(key).or_default().push(c);
    }
    // Each check's results: itself, then its parts.
    let mut results: Vec<Vec<CheckResult>> = std::thread::scope(|s| {
        let handles: Vec<_> = queues
            .values()
            .map(|queue| {
                let progress = &progress;
                s.spawn(move || {
                    queue
                        .iter()
                        .map(|c| {
                            if (opts.interrupted)() {
                                return vec![skipped(c, "interrupted", lane_start)];
                            }
                            progress.set(&c.id, &format!("running ({})", c.kind));
                            let rs = run_check(c, ctx, opts, lane_start);
                            progress.done(
                                &c.id,
                                &format!("{}: {}", rs[0].outcome.name(), rs[0].message),
                            );
                            rs
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("check thread"))
            .collect()
    });
    progress.finish();
    // Back into lane order, each check's parts right after it.
    results.sort_by_key(|rs| ids.iter().position(|i| *i == rs[0].id));
    results.into_iter().flatten().collect()
}

/// One check: attempts until it passes, the kind says not to retry, or the
/// deadline has passed. The last attempt's verdict and evidence stand, and
/// so do its parts only (those of earlier attempts are dropped with them):
/// the check's result comes first, then one per part.
fn run_check(
    c: &PlannedCheck,
    ctx: &Ctx,
    opts: RunOptions,
    lane_start: Instant,
) -> Vec<CheckResult> {
    let _check = tracing::info_span!("check", id = %c.id, kind = c.kind).entered();
    let started = Instant::now();
    let deadline = started + c.deadline;
    let mut attempts = 0;
    let (mut verdict, attempt_started) = loop {
        let attempt_started = Instant::now();
        let budget = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(2));
        let mut final_error = false;
        let result = match dead_target(ctx, c.target.as_deref()) {
            // Host-side checks too: a node whose QEMU is gone fails at once.
            Some(gone) => Err(gone),
            None => c.check.attempt(ctx, c.target.as_deref(), budget),
        };
        let v = match result {
            Ok(v) => v,
            Err(e) => {
                final_error = crate::guest::is_final(&e);
                tracing::debug!("attempt {attempts}: {e:#}");
                if let Some(t) = &c.target
                    && crate::guest::breaks_session(&e)
                {
                    ctx.guests.forget(t);
                }
                Verdict::fail(format!("{e:#}"), json!({}))
            }
        };
        let pause = opts.retry.nth(attempts);
        attempts += 1;
        let out_of_time =
            !time_for_another(Instant::now(), pause, attempt_started.elapsed(), deadline);
        let stop = !c.shape.retried || out_of_time || final_error || (opts.interrupted)();
        // The pause goes through the wait helper: Ctrl-C or --timeout ends
        // it, and the last attempt stands.
        if v.outcome != Outcome::Fail
            || stop
            || crate::wait::Wait::hold("the pause between attempts", pause).is_err()
        {
            break (v, attempt_started);
        }
    };
    let parts = std::mem::take(&mut verdict.parts);
    fail_with_parts(&mut verdict, &parts);
    let mut message = verdict.message;
    if verdict.outcome == Outcome::Fail && attempts > 1 {
        message = format!(
            "{message} (still failing after {attempts} attempts in {:.0} s)",
            started.elapsed().as_secs_f64()
        );
    }
    let check = CheckResult {
        id: c.id.clone(),
        kind: c.kind.to_string(),
        target: c.target.clone(),
        outcome: verdict.outcome,
        message,
        started_s: started.duration_since(lane_start).as_secs_f64(),
        duration_s: started.elapsed().as_secs_f64(),
        attempts,
        origin: c.origin.clone(),
        evidence: verdict.evidence,
        artifact: c.artifact.clone(),
        flaky: None,
        part_of: None,
    };
    let attempt_s = attempt_started.duration_since(lane_start).as_secs_f64();
    let mut out = vec![check];
    out.extend(part_results(&out[0], parts, attempt_s));
    out
}

/// Whether another attempt fits before the deadline: after its pause, as
/// long as the last one took. One that cannot finish would end as "did not
/// complete" and replace the judged failure and its evidence (on a loaded
/// host a curl of 10 s left 4 s to the next one).
fn time_for_another(now: Instant, pause: Duration, took: Duration, deadline: Instant) -> bool {
    now + pause + took < deadline
}

/// A check stands for its parts: if one failed, so did the check, so that
/// the layer, the exit code and a flaky check's rerun are all decided by
/// the check alone.
fn fail_with_parts(verdict: &mut Verdict, parts: &[Part]) {
    if verdict.outcome == Outcome::Fail {
        return;
    }
    if let Some(p) = parts.iter().find(|p| p.outcome == Outcome::Fail) {
        verdict.outcome = Outcome::Fail;
        verdict.message = format!("{} {:?} failed: {}", p.kind, p.name, p.message);
    }
}

/// The results of `check`'s parts, whose attempt started `attempt_s`
/// seconds into the lane: ids `<check id>/<name>`, a repeated name with
/// `#2`, `#3`, ... so that every id stays unique.
fn part_results(check: &CheckResult, parts: Vec<Part>, attempt_s: f64) -> Vec<CheckResult> {
    let mut seen = std::collections::BTreeSet::new();
    parts
        .into_iter()
        .map(|p| {
            let base = format!("{}/{}", check.id, p.name);
            let mut id = base.clone();
            let mut n = 1;
            while !seen.insert(id.clone()) {
                n += 1;
                id = format!("{base}#{n}");
            }
            CheckResult {
                id,
                kind: p.kind.to_string(),
                target: check.target.clone(),
                outcome: p.outcome,
                message: p.message,
                started_s: attempt_s + p.offset.as_secs_f64(),
                duration_s: p.duration.as_secs_f64(),
                attempts: 1,
                origin: p.origin.unwrap_or_else(|| check.origin.clone()),
                evidence: p.evidence,
                artifact: None,
                flaky: None,
                part_of: Some(check.id.clone()),
            }
        })
        .collect()
}

/// The error for a target whose QEMU is no longer running, if it is gone.
fn dead_target(ctx: &Ctx, target: Option<&str>) -> Option<anyhow::Error> {
    let node = ctx.record.nodes.get(target?)?;
    (!crate::machine::is_running(node.pid_now())).then(|| {
        crate::guest::GuestError::NotRunning {
            node: target.unwrap_or_default().to_string(),
            pid: node.pid_now(),
            console: node.dir.join("vm.log").display().to_string(),
        }
        .into()
    })
}

/// Every layer of `lane` with every check skipped for `reason`: a lane
/// that could not start (its ready cluster is missing), reported in full.
pub fn skipped_lane(lane: &Lane, reason: &str, lane_start: Instant) -> Vec<LayerResult> {
    lane.layers
        .iter()
        .map(|l| {
            let checks = l.checks.iter().map(|c| skipped(c, reason, lane_start));
            LayerResult::new(&l.name, &l.description, checks.collect(), 0.0)
        })
        .collect()
}

fn skipped(c: &PlannedCheck, reason: &str, lane_start: Instant) -> CheckResult {
    CheckResult {
        id: c.id.clone(),
        kind: c.kind.to_string(),
        target: c.target.clone(),
        outcome: Outcome::Skipped,
        message: format!("skipped: {reason}"),
        started_s: lane_start.elapsed().as_secs_f64(),
        duration_s: 0.0,
        attempts: 0,
        origin: c.origin.clone(),
        evidence: json!({}),
        artifact: None,
        flaky: None,
        part_of: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Check;
    use crate::guest::GuestPool;
    use crate::lane::Layer;
    use crate::spec::Cluster;
    use crate::state::RunningCluster;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    #[test]
    fn overall_outcome_rules() {
        use Outcome::*;
        assert_eq!(overall([Pass, Degraded, Pass]), Degraded);
        assert_eq!(overall([Pass, Fail, Degraded]), Fail);
        assert_eq!(overall([Skipped, Skipped]), Skipped);
        assert_eq!(overall([Skipped, Pass]), Pass);
        assert_eq!(overall([]), Pass);
    }

    /// A stand-in kind: fails its first `fail_first` attempts, then gives
    /// `then`. Counts its attempts; can raise the test's interrupt flag.
    #[derive(Debug)]
    struct Scripted {
        fail_first: u32,
        then: Outcome,
        retried: bool,
        attempts: AtomicU32,
        interrupt: Option<&'static AtomicBool>,
    }

    impl Scripted {
        fn new(fail_first: u32, then: Outcome) -> Self {
            Scripted {
                fail_first,
                then,
                retried: true,
                attempts: AtomicU32::new(0),
                interrupt: None,
            }
        }
    }

    impl Check for Scripted {
        fn attempt(&self, _: &Ctx, _: Option<&str>, _: Duration) -> anyhow::Result<Verdict> {
            let n = self.attempts.fetch_add(1, Ordering::SeqCst);
            if let Some(flag) = self.interrupt {
                flag.store(true, Ordering::SeqCst);
            }
            Ok(if n < self.fail_first {
                Verdict::fail(format!("attempt {n} failed"), json!({ "n": n }))
            } else {
                Verdict {
                    outcome: self.then,
                    message: format!("attempt {n}"),
                    evidence: json!({ "n": n }),
                    parts: Vec::new(),
                }
            })
        }
    }

    fn planned(id: &str, check: Arc<Scripted>, deadline_ms: u64) -> PlannedCheck {
        PlannedCheck {
            id: id.into(),
            layer: "l".into(),
            target: None,
            deadline: Duration::from_millis(deadline_ms),
            kind: "scripted",
            shape: if check.retried {
                crate::check::Shape::CLUSTER_PROBE
            } else {
                crate::check::Shape::ONCE
            },
            check,
            origin: "test.toml:1".into(),
            artifact: None,
            flaky: None,
        }
    }

    fn lane(layers: Vec<Vec<PlannedCheck>>) -> Lane {
        Lane {
            name: "t".into(),
            description: String::new(),
            source: "test.toml".into(),
            cluster: "t".into(),
            layers: layers
                .into_iter()
                .enumerate()
                .map(|(i, checks)| Layer {
                    name: format!("layer{i}"),
                    description: String::new(),
                    after: None,
                    checks,
                })
                .collect(),
        }
    }

    fn record() -> RunningCluster {
        serde_json::from_value(json!({
            "name": "t", "source": "t.toml", "started_unix": 0,
            "accel": { "used": "tcg", "requested": "tcg", "fallback_reason": null },
            "ssh_key": "/nonexistent", "known_hosts": "/nonexistent",
            "image": { "provider": "prebuilt", "kernel": "k", "initrd": "i", "rootfs": "r", "id": "x" },
            "nodes": {}
        }))
        .unwrap()
    }

    fn never() -> bool {
        false
    }

    fn fast(keep_going: bool, interrupted: fn() -> bool) -> RunOptions<'static> {
        RunOptions {
            keep_going,
            interrupted,
            retry: Pause::Every(Duration::from_millis(1)),
            restore: |_| None,
            reset: None,
        }
    }

    /// Runs `lane` with a context that has no VM behind it.
    fn run_lane(lane: &Lane, opts: RunOptions) -> Vec<LayerResult> {
        let cluster = Cluster::profile("reference").unwrap();
        let record = record();
        let pool = GuestPool::new(&record);
        let ctx = Ctx {
            cluster: &cluster,
            record: &record,
            guests: &pool,
            current_image: None,
            artifacts: None,
        };
        run(lane, &ctx, opts, Instant::now()).0
    }

    #[test]
    fn a_retried_check_passes_once_it_settles() {
        let c = Arc::new(Scripted::new(3, Outcome::Pass));
        let layers = run_lane(
            &lane(vec![vec![planned("a", c.clone(), 5000)]]),
            fast(false, never),
        );
        let r = &layers[0].checks[0];
        assert_eq!(r.outcome, Outcome::Pass, "{}", r.message);
        assert_eq!(r.attempts, 4);
        assert_eq!(r.evidence["n"], 3);
    }

    #[test]
    fn retries_stop_at_the_deadline_and_the_last_attempt_stands() {
        let c = Arc::new(Scripted::new(u32::MAX, Outcome::Pass));
        let layers = run_lane(
            &lane(vec![vec![planned("a", c.clone(), 150)]]),
            fast(false, never),
        );
        let r = &layers[0].checks[0];
        assert_eq!(r.outcome, Outcome::Fail);
        assert!(r.attempts > 1, "{}", r.attempts);
        assert!(r.message.contains("still failing after"), "{}", r.message);
        assert!(r.duration_s < 1.0, "{}", r.duration_s);
        assert_eq!(r.evidence["n"], r.attempts - 1);
    }

    #[test]
    fn no_attempt_begins_that_cannot_finish_before_the_deadline() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        let deadline = now + ms(1000);
        assert!(time_for_another(now, ms(100), ms(800), deadline));
        assert!(!time_for_another(now, ms(100), ms(900), deadline));
        assert!(!time_for_another(now, ms(1000), ms(0), deadline));
        assert!(time_for_another(now, ms(0), ms(0), deadline));
    }

    #[test]
    fn kinds_that_are_not_retried_run_once() {
        let mut s = Scripted::new(1, Outcome::Pass);
        s.retried = false;
        let c = Arc::new(s);
        let layers = run_lane(
            &lane(vec![vec![planned("a", c.clone(), 5000)]]),
            fast(false, never),
        );
        assert_eq!(layers[0].checks[0].outcome, Outcome::Fail);
        assert_eq!(c.attempts.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_failed_layer_skips_the_rest_unless_keep_going() {
        let make = || {
            lane(vec![
                vec![planned(
                    "bad",
                    Arc::new(Scripted::new(u32::MAX, Outcome::Pass)),
                    20,
                )],
                vec![planned(
                    "later",
                    Arc::new(Scripted::new(0, Outcome::Degraded)),
                    1000,
                )],
            ])
        };
        let layers = run_lane(&make(), fast(false, never));
        assert_eq!(layers[0].outcome, Outcome::Fail);
        assert_eq!(layers[1].outcome, Outcome::Skipped);
        assert_eq!(layers[1].checks[0].message, "skipped: layer layer0 failed");
        assert_eq!(layers[1].checks[0].attempts, 0);

        let layers = run_lane(&make(), fast(true, never));
        assert_eq!(layers[0].outcome, Outcome::Fail);
        assert_eq!(layers[1].outcome, Outcome::Degraded);
    }

    static STOP: AtomicBool = AtomicBool::new(false);
    fn stop_requested() -> bool {
        STOP.load(Ordering::SeqCst)
    }

    #[test]
    fn an_interrupt_ends_retries_and_skips_what_is_left() {
        let mut s = Scripted::new(u32::MAX, Outcome::Pass);
        s.interrupt = Some(&STOP);
        let first = Arc::new(s);
        let after = Arc::new(Scripted::new(0, Outcome::Pass));
        let l = lane(vec![
            vec![
                planned("a", first.clone(), 60_000),
                planned("b", after.clone(), 1000),
            ],
            vec![planned(
                "c",
                Arc::new(Scripted::new(0, Outcome::Pass)),
                1000,
            )],
        ]);
        let layers = run_lane(&l, fast(true, stop_requested));
        assert_eq!(
            first.attempts.load(Ordering::SeqCst),
            1,
            "no retry after Ctrl-C"
        );
        assert_eq!(layers[0].checks[1].message, "skipped: interrupted");
        assert_eq!(after.attempts.load(Ordering::SeqCst), 0);
        assert_eq!(layers[1].outcome, Outcome::Skipped);
        assert_eq!(layers[1].checks[0].message, "skipped: interrupted");
    }

    /// A node whose QEMU is gone fails its check at once, named.
    #[derive(Debug)]
    struct DeadNode(AtomicU32);

    impl Check for DeadNode {
        fn attempt(&self, _: &Ctx, _: Option<&str>, _: Duration) -> anyhow::Result<Verdict> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Err(crate::guest::GuestError::NotRunning {
                node: "node04".into(),
                pid: 4242,
                console: "nodes/node04/vm.log".into(),
            }
            .into())
        }
    }

    #[test]
    fn a_dead_node_fails_its_check_at_once_not_at_the_deadline() {
        let dead = Arc::new(DeadNode(AtomicU32::new(0)));
        let mut c = planned("a", Arc::new(Scripted::new(0, Outcome::Pass)), 60_000);
        c.check = dead.clone();
        let layers = run_lane(&lane(vec![vec![c]]), fast(false, never));
        let r = &layers[0].checks[0];
        assert_eq!(r.outcome, Outcome::Fail);
        assert_eq!(
            dead.0.load(Ordering::SeqCst),
            1,
            "no retry against a dead node"
        );
        assert!(
            r.message.contains("node04: QEMU (pid 4242) is not running"),
            "{}",
            r.message
        );
        assert!(r.duration_s < 1.0);
    }

    #[test]
    fn any_check_on_a_node_whose_qemu_is_gone_fails_at_once() {
        let cluster = Cluster::profile("reference").unwrap();
        let mut record = record();
        record.nodes.insert(
            "node04".into(),
            serde_json::from_value(json!({
                "role": "worker", "address": "10.77.0.14", "pid": 0, "ssh_port": 1,
                "forwards": {}, "units": [], "dir": "/nonexistent/node04",
                "booted_unix": 0, "ready_after_s": null
            }))
            .unwrap(),
        );
        let pool = GuestPool::new(&record);
        let ctx = Ctx {
            cluster: &cluster,
            record: &record,
            guests: &pool,
            current_image: None,
            artifacts: None,
        };
        let check = Arc::new(Scripted::new(0, Outcome::Pass));
        let mut c = planned("dns", check.clone(), 60_000);
        c.target = Some("node04".into());
        let (layers, _) = run(
            &lane(vec![vec![c]]),
            &ctx,
            fast(false, never),
            Instant::now(),
        );
        let r = &layers[0].checks[0];
        assert_eq!(r.outcome, Outcome::Fail);
        assert!(
            r.message.starts_with("node04: QEMU (pid 0) is not running"),
            "{}",
            r.message
        );
        assert_eq!(
            check.attempts.load(Ordering::SeqCst),
            0,
            "the check itself never ran"
        );
        assert_eq!(r.attempts, 1);
    }

    fn marked(id: &str, check: Arc<Scripted>, reruns: u32) -> PlannedCheck {
        let mut c = planned(id, check, 1000);
        c.flaky = Some(crate::lane::FlakyMark {
            reason: "known race".into(),
            reruns,
        });
        c
    }

    static RESETS: AtomicU32 = AtomicU32::new(0);
    fn counting_reset() -> anyhow::Result<Restored> {
        RESETS.fetch_add(1, Ordering::SeqCst);
        Ok(Restored {
            note: "restored".into(),
            record: None,
        })
    }

    /// Runs once, failing its first `fail_first` runs (each run one attempt).
    fn once(fail_first: u32) -> Arc<Scripted> {
        let mut s = Scripted::new(fail_first, Outcome::Pass);
        s.retried = false;
        Arc::new(s)
    }

    #[test]
    fn a_marked_check_that_passes_after_a_reset_is_flaky_with_its_failure_kept() {
        let before = once(0);
        let flaky = once(1);
        let l = lane(vec![
            vec![planned("before", before.clone(), 1000)],
            vec![marked("flaky", flaky.clone(), 2)],
        ]);
        let mut opts = fast(false, never);
        opts.reset = Some(&counting_reset);
        let r0 = RESETS.load(Ordering::SeqCst);
        let layers = run_lane(&l, opts);
        assert_eq!(RESETS.load(Ordering::SeqCst) - r0, 1);
        // The lane ran again from its first layer after the reset.
        assert_eq!(before.attempts.load(Ordering::SeqCst), 2);
        let r = &layers[1].checks[0];
        assert_eq!(r.outcome, Outcome::Flaky, "{}", r.message);
        assert_eq!(layers[1].outcome, Outcome::Flaky);
        let rec = r.flaky.as_ref().unwrap();
        assert_eq!(rec.reason, "known race");
        assert_eq!(rec.failures.len(), 1);
        assert_eq!(rec.failures[0].message, "attempt 0 failed");
        assert_eq!(rec.resets, ["restored"]);
        assert!(r.message.contains("flaky"), "{}", r.message);
    }

    /// Fails until it runs on the cluster record named "restored".
    #[derive(Debug)]
    struct NeedsRestored(std::sync::Mutex<Vec<String>>);

    impl Check for NeedsRestored {
        fn attempt(&self, ctx: &Ctx, _: Option<&str>, _: Duration) -> anyhow::Result<Verdict> {
            self.0.lock().unwrap().push(ctx.record.name.clone());
            Ok(match ctx.record.name.as_str() {
                "restored" => Verdict::pass("on the restored cluster", json!({})),
                other => Verdict::fail(format!("on {other}"), json!({})),
            })
        }
    }

    fn replacing_reset() -> anyhow::Result<Restored> {
        let mut record = record();
        record.name = "restored".into();
        Ok(Restored {
            note: "restored snapshot".into(),
            record: Some(record),
        })
    }

    #[test]
    fn after_a_reset_that_replaced_the_guests_the_lane_runs_on_the_new_record() {
        let check = Arc::new(NeedsRestored(Default::default()));
        let mut p = planned("flaky", once(0), 1000);
        p.check = check.clone();
        p.flaky = Some(crate::lane::FlakyMark {
            reason: "known race".into(),
            reruns: 1,
        });
        let l = lane(vec![vec![p]]);
        let mut opts = fast(false, never);
        opts.reset = Some(&replacing_reset);
        let cluster = Cluster::profile("reference").unwrap();
        let first = record();
        let pool = GuestPool::new(&first);
        let ctx = Ctx {
            cluster: &cluster,
            record: &first,
            guests: &pool,
            current_image: None,
            artifacts: None,
        };
        let (layers, last) = run(&l, &ctx, opts, Instant::now());
        assert_eq!(*check.0.lock().unwrap(), ["t", "restored"]);
        assert_eq!(layers[0].checks[0].outcome, Outcome::Flaky);
        assert_eq!(last.map(|r| r.name).as_deref(), Some("restored"));
    }

    #[test]
    fn a_marked_check_fails_once_its_reruns_are_spent_and_unmarked_failures_never_rerun() {
        let l = lane(vec![vec![marked("flaky", once(u32::MAX), 2)]]);
        let mut opts = fast(false, never);
        opts.reset = Some(&counting_reset);
        let layers = run_lane(&l, opts);
        let r = &layers[0].checks[0];
        assert_eq!(r.outcome, Outcome::Fail);
        assert_eq!(r.flaky.as_ref().unwrap().failures.len(), 2);

        // One unmarked failure in the layer: no rerun can make it pass.
        let plain = once(1);
        let l = lane(vec![vec![
            marked("flaky", once(1), 2),
            planned("plain", plain.clone(), 1000),
        ]]);
        let layers = run_lane(&l, opts);
        assert_eq!(layers[0].checks[0].outcome, Outcome::Fail);
        assert_eq!(plain.attempts.load(Ordering::SeqCst), 1);
        // Without a reset hook a mark changes nothing.
        let layers = run_lane(
            &lane(vec![vec![marked("f", once(1), 2)]]),
            fast(false, never),
        );
        assert_eq!(layers[0].checks[0].outcome, Outcome::Fail);
    }

    /// A stand-in script: fails its first `fail_first` attempts (each with a
    /// part named after it), then gives `then` with `parts`.
    #[derive(Debug)]
    struct WithParts {
        fail_first: u32,
        then: Outcome,
        parts: Vec<Part>,
        attempts: AtomicU32,
    }

    /// A part that starts `offset_ms` into its attempt and lasts `ms`.
    fn part(name: &str, outcome: Outcome, offset_ms: u64, ms: u64) -> Part {
        Part {
            name: name.into(),
            kind: "subtest",
            outcome,
            message: format!("{name}: {}", outcome.name()),
            offset: Duration::from_millis(offset_ms),
            duration: Duration::from_millis(ms),
            origin: (name != "no line").then(|| format!("s.py:{}", name.len())),
            evidence: json!({ "name": name }),
        }
    }

    impl Check for WithParts {
        fn attempt(&self, _: &Ctx, _: Option<&str>, _: Duration) -> anyhow::Result<Verdict> {
            let n = self.attempts.fetch_add(1, Ordering::SeqCst);
            if n < self.fail_first {
                let p = part(&format!("attempt {n}"), Outcome::Fail, 0, 1);
                return Ok(Verdict::fail("early", json!({})).with_parts(vec![p]));
            }
            let v = Verdict::pass("script ran", json!({})).with_parts(self.parts.clone());
            Ok(Verdict {
                outcome: self.then,
                ..v
            })
        }
    }

    fn with_parts(id: &str, fail_first: u32, then: Outcome, parts: Vec<Part>) -> PlannedCheck {
        let mut c = planned(id, Arc::new(Scripted::new(0, Outcome::Pass)), 5000);
        c.check = Arc::new(WithParts {
            fail_first,
            then,
            parts,
            attempts: AtomicU32::new(0),
        });
        c.shape = crate::check::Shape::ONCE;
        c
    }

    #[test]
    fn a_check_with_parts_is_followed_by_one_result_per_part() {
        let parts = vec![
            part("one", Outcome::Pass, 30, 20),
            part("no line", Outcome::Pass, 60, 5),
            part("one", Outcome::Pass, 70, 5),
        ];
        let l = lane(vec![vec![
            with_parts("s", 0, Outcome::Pass, parts),
            planned("after", Arc::new(Scripted::new(0, Outcome::Pass)), 1000),
        ]]);
        let layers = run_lane(&l, fast(false, never));
        let rs = &layers[0].checks;
        let ids: Vec<&str> = rs.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["s", "s/one", "s/no line", "s/one#2", "after"]);
        let (check, one) = (&rs[0], &rs[1]);
        assert_eq!(
            (check.outcome, check.part_of.as_deref()),
            (Outcome::Pass, None)
        );
        assert_eq!(one.kind, "subtest");
        assert_eq!(one.part_of.as_deref(), Some("s"));
        assert_eq!(
            (one.origin.as_str(), rs[2].origin.as_str()),
            ("s.py:3", "test.toml:1")
        );
        assert_eq!(
            (one.attempts, &one.evidence),
            (1, &json!({ "name": "one" }))
        );
        // The offset counts from the attempt, which began with the check.
        let offset = one.started_s - check.started_s;
        assert!((0.030..0.080).contains(&offset), "{offset}");
        assert!((one.duration_s - 0.020).abs() < 1e-9, "{}", one.duration_s);
        assert!(rs[3].started_s > rs[2].started_s);
    }

    #[test]
    fn a_failed_part_fails_its_check_and_the_layer() {
        let parts = vec![
            part("fine", Outcome::Pass, 0, 1),
            part("broken", Outcome::Fail, 1, 1),
        ];
        let l = lane(vec![
            vec![with_parts("s", 0, Outcome::Pass, parts)],
            vec![planned(
                "later",
                Arc::new(Scripted::new(0, Outcome::Pass)),
                1000,
            )],
        ]);
        let layers = run_lane(&l, fast(false, never));
        let rs = &layers[0].checks;
        assert_eq!(rs[1].outcome, Outcome::Pass);
        assert_eq!(rs[2].outcome, Outcome::Fail);
        assert_eq!(rs[2].message, "broken: fail");
        // The kind said pass, but a check stands for its parts.
        assert_eq!(rs[0].outcome, Outcome::Fail);
        assert_eq!(rs[0].message, "subtest \"broken\" failed: broken: fail");
        assert_eq!(layers[0].outcome, Outcome::Fail);
        assert_eq!(layers[1].outcome, Outcome::Skipped);
    }

    #[test]
    fn only_the_last_attempts_parts_are_kept() {
        let mut c = with_parts(
            "s",
            2,
            Outcome::Pass,
            vec![part("last", Outcome::Pass, 0, 1)],
        );
        c.shape = crate::check::Shape::CLUSTER_PROBE;
        let layers = run_lane(&lane(vec![vec![c]]), fast(false, never));
        let rs = &layers[0].checks;
        let ids: Vec<&str> = rs.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["s", "s/last"]);
        assert_eq!(rs[0].attempts, 3);
        assert!(
            rs[1].started_s > rs[0].started_s,
            "the third attempt began later"
        );
    }

    #[test]
    fn a_marked_check_with_failed_parts_reruns_once_and_keeps_the_last_parts() {
        let mut c = with_parts("s", 1, Outcome::Pass, vec![part("ok", Outcome::Pass, 0, 1)]);
        c.flaky = Some(crate::lane::FlakyMark {
            reason: "known race".into(),
            reruns: 1,
        });
        let mut opts = fast(false, never);
        opts.reset = Some(&counting_reset);
        let layers = run_lane(&lane(vec![vec![c]]), opts);
        let rs = &layers[0].checks;
        let ids: Vec<&str> = rs.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["s", "s/ok"], "no part of the failed run is left");
        assert_eq!(rs[0].outcome, Outcome::Flaky);
        assert_eq!(rs[0].flaky.as_ref().unwrap().failures.len(), 1);
        assert_eq!(
            (rs[1].outcome, rs[1].flaky.is_none()),
            (Outcome::Pass, true)
        );
    }

    #[test]
    fn checks_come_back_in_lane_order() {
        let l = lane(vec![vec![
            planned("z", Arc::new(Scripted::new(0, Outcome::Pass)), 1000),
            planned("a", Arc::new(Scripted::new(0, Outcome::Pass)), 1000),
        ]]);
        let ids: Vec<String> = run_lane(&l, fast(false, never))[0]
            .checks
            .iter()
            .map(|c| c.id.clone())
            .collect();
        assert_eq!(ids, ["z", "a"]);
    }
}
