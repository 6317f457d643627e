//! The check engine: runs a lane's layers in order against a running
//! cluster and turns each check into a `CheckResult`.
//!
//! Within a layer, checks on different nodes run in parallel (one thread
//! per node, that node's checks in lane order); checks on one node share
//! its SSH session, so they run one after another. A layer that fails
//! stops the lane: later layers are recorded as skipped, because they
//! depend on what failed (`--keep-going` runs them anyway).

use crate::check::{self, Ctx, Outcome, Verdict};
use crate::lane::{Lane, PlannedCheck};
use crate::progress::Progress;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Pause between attempts of a retried check.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerResult {
    pub name: String,
    pub description: String,
    pub outcome: Outcome,
    pub duration_s: f64,
    pub checks: Vec<CheckResult>,
}

/// The outcome that sums up a set of outcomes: any fail fails; otherwise
/// any degraded degrades; all skipped is skipped; else pass.
pub fn overall(outcomes: impl IntoIterator<Item = Outcome>) -> Outcome {
    let all: Vec<Outcome> = outcomes.into_iter().collect();
    if all.contains(&Outcome::Fail) {
        Outcome::Fail
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
        }
    }
}

/// Runs every layer of `lane`. Never fails: a check that errors is a
/// failed check with the error as its message.
pub fn run(lane: &Lane, ctx: &Ctx, keep_going: bool, lane_start: Instant) -> Vec<LayerResult> {
    let mut out = Vec::new();
    let mut blocked: Option<String> = None;
    for layer in &lane.layers {
        let started = Instant::now();
        let results: Vec<CheckResult> = if let Some(reason) = &blocked {
            layer
                .checks
                .iter()
                .map(|c| skipped(c, reason, lane_start))
                .collect()
        } else {
            eprintln!("== layer {}: {} checks", layer.name, layer.checks.len());
            run_layer(&layer.checks, ctx, lane_start)
        };
        let result = LayerResult::new(
            &layer.name,
            &layer.description,
            results,
            started.elapsed().as_secs_f64(),
        );
        if blocked.is_none() {
            if crate::interrupted() {
                blocked = Some("interrupted".into());
            } else if result.outcome == Outcome::Fail && !keep_going {
                blocked = Some(format!("layer {} failed", layer.name));
            }
        }
        out.push(result);
    }
    out
}

fn run_layer(checks: &[PlannedCheck], ctx: &Ctx, lane_start: Instant) -> Vec<CheckResult> {
    let ids: Vec<String> = checks.iter().map(|c| c.id.clone()).collect();
    let progress = Progress::new(&ids);
    // One queue per target node; host-only checks get their own queue.
    let mut queues: BTreeMap<String, Vec<&PlannedCheck>> = BTreeMap::new();
    for c in checks {
        let key = c.target.clone().unwrap_or_else(|| "(host)".into());
        queues.entry(key).or_default().push(c);
    }
    let mut results: Vec<CheckResult> = std::thread::scope(|s| {
        let handles: Vec<_> = queues
            .values()
            .map(|queue| {
                let progress = &progress;
                s.spawn(move || {
                    queue
                        .iter()
                        .map(|c| {
                            if crate::interrupted() {
                                return skipped(c, "interrupted", lane_start);
                            }
                            progress.set(&c.id, &format!("running ({})", c.kind.name()));
                            let r = run_check(c, ctx, lane_start);
                            progress.done(&c.id, &format!("{}: {}", r.outcome.name(), r.message));
                            r
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
    // Back into lane order.
    results.sort_by_key(|r| ids.iter().position(|i| *i == r.id));
    results
}

/// One check: attempts until it passes, the kind says not to retry, or the
/// deadline has passed. The last attempt's verdict and evidence stand.
fn run_check(c: &PlannedCheck, ctx: &Ctx, lane_start: Instant) -> CheckResult {
    let started = Instant::now();
    let deadline = started + c.deadline;
    let mut attempts = 0;
    let verdict = loop {
        attempts += 1;
        let budget = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(2));
        let v = match check::attempt(ctx, &c.kind, c.target.as_deref(), budget) {
            Ok(v) => v,
            Err(e) => Verdict::fail(format!("{e:#}"), json!({})),
        };
        let out_of_time = Instant::now() + RETRY_PAUSE >= deadline;
        if v.outcome != Outcome::Fail || !c.kind.retried() || out_of_time || crate::interrupted() {
            break v;
        }
        std::thread::sleep(RETRY_PAUSE);
    };
    let mut message = verdict.message;
    if verdict.outcome == Outcome::Fail && attempts > 1 {
        message = format!(
            "{message} (still failing after {attempts} attempts in {:.0} s)",
            started.elapsed().as_secs_f64()
        );
    }
    CheckResult {
        id: c.id.clone(),
        kind: c.kind.name().to_string(),
        target: c.target.clone(),
        outcome: verdict.outcome,
        message,
        started_s: started.duration_since(lane_start).as_secs_f64(),
        duration_s: started.elapsed().as_secs_f64(),
        attempts,
        origin: c.origin.clone(),
        evidence: verdict.evidence,
        artifact: c.artifact.clone(),
    }
}

fn skipped(c: &PlannedCheck, reason: &str, lane_start: Instant) -> CheckResult {
    CheckResult {
        id: c.id.clone(),
        kind: c.kind.name().to_string(),
        target: c.target.clone(),
        outcome: Outcome::Skipped,
        message: format!("skipped: {reason}"),
        started_s: lane_start.elapsed().as_secs_f64(),
        duration_s: 0.0,
        attempts: 0,
        origin: c.origin.clone(),
        evidence: json!({}),
        artifact: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overall_outcome_rules() {
        use Outcome::*;
        assert_eq!(overall([Pass, Degraded, Pass]), Degraded);
        assert_eq!(overall([Pass, Fail, Degraded]), Fail);
        assert_eq!(overall([Skipped, Skipped]), Skipped);
        assert_eq!(overall([Skipped, Pass]), Pass);
        assert_eq!(overall([]), Pass);
    }
}
