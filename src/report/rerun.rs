//! The rerun report: one lane run N times from the same snapshot, summed
//! up per check (passes, failures, pass rate, the spread of its duration
//! and figures) into the layers, steps and `rerun` section of a
//! result.json-shaped report whose checks carry the verdict over every run:
//! `pass`, `fail`, or `flaky` when the same check both passed and failed
//! (with a failing run's evidence beside a passing one's). The command that
//! runs the lane, and records the summary in its ledger, is `crate::rerun`.

use super::{RunReport, Step};
use crate::check::Outcome;
use crate::engine::{CheckResult, LayerResult};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;

/// result.json's `rerun`: how the lane was rerun, and each check's record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rerun {
    /// Runs asked for (`--times`); `runs` has fewer when one was interrupted.
    pub times: u32,
    /// The snapshot every run started from.
    pub snapshot: String,
    pub runs: Vec<RunSummary>,
    pub checks: Vec<CheckStats>,
}

/// One run: its artifact root (relative to the rerun's) and how it ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSummary {
    pub index: u32,
    pub dir: String,
    pub status: crate::error::RunStatus,
    pub duration_s: f64,
}

/// A check over every run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckStats {
    pub id: String,
    pub layer: String,
    /// pass (passed or degraded every time it ran), fail (failed every
    /// time), flaky (both), skipped (never ran).
    pub verdict: Outcome,
    /// The outcome of each run, in order.
    pub outcomes: Vec<Outcome>,
    /// Runs it passed (pass or degraded), failed, was `flaky` in (a marked
    /// check that passed after a rerun), and was skipped in.
    pub passes: u32,
    pub failures: u32,
    pub flaky: u32,
    pub skipped: u32,
    /// passes / runs it was not skipped in (0 when it never ran).
    pub pass_rate: f64,
    pub duration_s: Spread,
    /// Its figures (as Hydra's metrics name them), min..max over the runs.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub figures: BTreeMap<String, Spread>,
    /// The evidence of a failing run and of a passing one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing: Option<EvidenceRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passing: Option<EvidenceRef>,
}

/// min..max over the runs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Spread {
    pub min: f64,
    pub max: f64,
}

/// Where one run's evidence of a check is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvidenceRef {
    pub run: u32,
    /// That run's result.json, relative to the rerun's root.
    pub result: String,
    /// The check's own evidence file in that run, when its lane names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<String>,
    pub message: String,
}

impl Spread {
    fn of(values: impl IntoIterator<Item = f64>) -> Option<Spread> {
        values.into_iter().fold(None, |s, v| {
            Some(match s {
                None => Spread { min: v, max: v },
                Some(s) => Spread {
                    min: s.min.min(v),
                    max: s.max.max(v),
                },
            })
        })
    }
}

/// The runs summed up: what the rerun records (its ledger's layers and
/// steps) and its `rerun` section.
pub struct Summary {
    /// The checks in lane order, with their verdict over every run.
    pub layers: Vec<LayerResult>,
    /// One step per run.
    pub steps: Vec<Step>,
    pub rerun: Rerun,
}

/// Sums up the runs (`(dir, report)`, dir relative to the rerun's root).
/// The rerun's error and cluster come from the runs too; `crate::rerun`
/// records them, beside this, in its ledger.
pub fn summarize(times: u32, snapshot: &str, runs: &[(String, RunReport)]) -> Summary {
    let (layers, checks) = summed_layers(runs);
    let rerun = Rerun {
        times,
        snapshot: snapshot.into(),
        runs: run_summaries(runs),
        checks,
    };
    Summary {
        layers,
        steps: run_steps(runs),
        rerun,
    }
}

/// Each layer once, in the order the runs met them, with each check's
/// verdict over every run; and those checks' records.
fn summed_layers(runs: &[(String, RunReport)]) -> (Vec<LayerResult>, Vec<CheckStats>) {
    let mut stats: Vec<CheckStats> = Vec::new();
    let mut layers: Vec<LayerResult> = Vec::new();
    for layer in runs.iter().flat_map(|(_, r)| &r.layers) {
        if layers.iter().any(|l| l.name == layer.name) {
            continue;
        }
        let mut checks = Vec::new();
        for c in checks_of(&layer.name, runs) {
            let s = check_stats(&c.id, &layer.name, runs);
            checks.push(summary_check(c, &s));
            stats.push(s);
        }
        let duration = runs
            .iter()
            .flat_map(|(_, r)| r.layers.iter().filter(|l| l.name == layer.name))
            .map(|l| l.duration_s)
            .fold(0.0, f64::max);
        layers.push(LayerResult::new(
            &layer.name,
            &layer.description,
            checks,
            duration,
        ));
    }
    (layers, stats)
}

fn run_steps(runs: &[(String, RunReport)]) -> Vec<Step> {
    runs.iter()
        .enumerate()
        .map(|(i, (dir, r))| Step {
            name: format!("run {}", i + 1),
            outcome: run_outcome(r),
            duration_s: r.duration_s,
            message: format!("{} ({dir})", r.status.name()),
        })
        .collect()
}

fn run_summaries(runs: &[(String, RunReport)]) -> Vec<RunSummary> {
    runs.iter()
        .enumerate()
        .map(|(i, (dir, r))| RunSummary {
            index: i as u32 + 1,
            dir: dir.clone(),
            status: r.status,
            duration_s: r.duration_s,
        })
        .collect()
}

/// Every check of the layer `name` in any run, each where its run had it:
/// a script's subtests differ between runs (one that a run never reached
/// is not among its checks, and counts as skipped there), and the first
/// run need not have them all.
fn checks_of<'a>(name: &str, runs: &'a [(String, RunReport)]) -> Vec<&'a CheckResult> {
    let mut out: Vec<&CheckResult> = Vec::new();
    let layers = runs.iter().flat_map(|(_, r)| &r.layers);
    for l in layers.filter(|l| l.name == name) {
        let mut next = 0;
        for c in &l.checks {
            next = match out.iter().position(|o| o.id == c.id) {
                Some(i) => i + 1,
                None => {
                    out.insert(next, c);
                    next + 1
                }
            };
        }
    }
    out
}

/// A run as one step: it failed only when it did not finish (an error, a
/// timeout, an interrupt). Its checks are judged over every run instead.
fn run_outcome(r: &RunReport) -> Outcome {
    use crate::error::RunStatus;
    match r.status {
        RunStatus::Pass | RunStatus::Degraded | RunStatus::Flaky | RunStatus::Fail => Outcome::Pass,
        _ => Outcome::Fail,
    }
}

/// One check over every run.
fn check_stats(id: &str, layer: &str, runs: &[(String, RunReport)]) -> CheckStats {
    let mut found: Vec<(u32, &str, &CheckResult, &RunReport)> = Vec::new();
    for (i, (dir, r)) in runs.iter().enumerate() {
        if let Some(c) = r.layers.iter().flat_map(|l| &l.checks).find(|c| c.id == id) {
            found.push((i as u32 + 1, dir, c, r));
        }
    }
    // Each run's outcome; a run without the check (a subtest its script
    // never reached) skipped it, so that every run is counted.
    let outcomes: Vec<Outcome> = runs
        .iter()
        .enumerate()
        .map(|(i, _)| match found.iter().find(|x| x.0 == i as u32 + 1) {
            Some(x) => x.2.outcome,
            None => Outcome::Skipped,
        })
        .collect();
    let count = |f: &dyn Fn(Outcome) -> bool| outcomes.iter().filter(|o| f(**o)).count() as u32;
    let passes = count(&|o| matches!(o, Outcome::Pass | Outcome::Degraded));
    let failures = count(&|o| o == Outcome::Fail);
    let flaky = count(&|o| o == Outcome::Flaky);
    let skipped = count(&|o| o == Outcome::Skipped);
    let ran = passes + failures + flaky;
    let verdict = match (passes + flaky > 0, failures > 0) {
        _ if flaky > 0 => Outcome::Flaky,
        (true, true) => Outcome::Flaky,
        (false, true) => Outcome::Fail,
        // Degraded (a nested guest under TCG) is no failure, but it is
        // never reported as a pass either.
        (true, false) if count(&|o| o == Outcome::Degraded) > 0 => Outcome::Degraded,
        (true, false) => Outcome::Pass,
        (false, false) => Outcome::Skipped,
    };
    let evidence_of = |want: &dyn Fn(Outcome) -> bool| {
        found
            .iter()
            .find(|x| want(x.2.outcome))
            .map(|(run, dir, c, _)| EvidenceRef {
                run: *run,
                result: format!("{dir}/result.json"),
                artifact: c.artifact.as_ref().map(|a| format!("{dir}/{a}")),
                message: c.message.clone(),
            })
    };
    let ran_checks = found.iter().filter(|x| x.2.outcome != Outcome::Skipped);
    CheckStats {
        id: id.into(),
        layer: layer.into(),
        verdict,
        outcomes,
        passes,
        failures,
        flaky,
        skipped,
        pass_rate: if ran == 0 {
            0.0
        } else {
            passes as f64 / ran as f64
        },
        duration_s: Spread::of(ran_checks.map(|x| x.2.duration_s))
            .unwrap_or(Spread { min: 0.0, max: 0.0 }),
        figures: figures_of(id, &found.iter().map(|x| x.3).collect::<Vec<_>>()),
        failing: evidence_of(&|o| matches!(o, Outcome::Fail | Outcome::Flaky)),
        passing: evidence_of(&|o| matches!(o, Outcome::Pass | Outcome::Degraded)),
    }
}

/// The check's figures in each run (the names Hydra's metrics give them:
/// `<id with @ as .>.<path>`), min..max over the runs.
fn figures_of(id: &str, runs: &[&RunReport]) -> BTreeMap<String, Spread> {
    let prefix = format!("{}.", id.replace(['@', ' '], "."));
    let mut values: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for r in runs {
        for (name, v, _) in r.metrics() {
            if let Some(rest) = name.strip_prefix(&prefix) {
                values.entry(rest.to_string()).or_default().push(v);
            }
        }
    }
    values
        .into_iter()
        .filter_map(|(k, v)| Some((k, Spread::of(v)?)))
        .collect()
}

/// The check as the rerun's result.json shows it: its verdict, a one-line
/// account, and its record as evidence.
fn summary_check(first: &CheckResult, s: &CheckStats) -> CheckResult {
    let runs = s.outcomes.len();
    let mut message = format!(
        "passed {}/{} run(s) (pass rate {:.0}%), {:.1}..{:.1} s",
        s.passes,
        runs,
        s.pass_rate * 100.0,
        s.duration_s.min,
        s.duration_s.max
    );
    if s.skipped > 0 {
        message.push_str(&format!(", skipped in {}", s.skipped));
    }
    if s.verdict == Outcome::Flaky
        && let Some(f) = &s.failing
    {
        message.push_str(&format!("; flaky: run {} failed: {}", f.run, f.message));
    }
    CheckResult {
        id: first.id.clone(),
        kind: first.kind.clone(),
        target: first.target.clone(),
        outcome: s.verdict,
        message,
        started_s: first.started_s,
        duration_s: s.duration_s.max,
        attempts: runs as u32,
        origin: first.origin.clone(),
        evidence: json!({ "rerun": s }),
        artifact: None,
        flaky: None,
        part_of: first.part_of.clone(),
    }
}

/// The per-check table for the terminal: flaky and failed checks first.
pub fn render(r: &RunReport) -> String {
    use std::fmt::Write;
    let Some(rr) = &r.rerun else {
        return String::new();
    };
    let mut out = format!(
        "\n{} run(s) of {} from snapshot {:?}\n{:<36} {:<8} {:>7} {:>6} {:>16}\n",
        rr.runs.len(),
        r.lane,
        rr.snapshot,
        "check",
        "verdict",
        "passed",
        "rate",
        "time min..max"
    );
    let mut checks: Vec<&CheckStats> = rr.checks.iter().collect();
    checks.sort_by_key(|c| {
        std::cmp::Reverse(c.verdict == Outcome::Flaky || c.verdict == Outcome::Fail)
    });
    for c in checks {
        let _ = writeln!(
            out,
            "{:<36} {:<8} {:>3}/{:<3} {:>5.0}% {:>7.1}..{:<7.1}s",
            c.id,
            c.verdict.name(),
            c.passes,
            c.outcomes.len(),
            c.pass_rate * 100.0,
            c.duration_s.min,
            c.duration_s.max
        );
        for (label, e) in [("failing", &c.failing), ("passing", &c.passing)] {
            if let Some(e) = e.as_ref().filter(|_| c.verdict == Outcome::Flaky) {
                let file = e.artifact.as_ref().unwrap_or(&e.result);
                let _ = writeln!(out, "    {label}: run {} {file}: {}", e.run, e.message);
            }
        }
    }
    out
}

/// The exit code of a rerun: 0 when every check passed every time, 1 when
/// one failed or was flaky; an error, timeout or interrupt keeps its own.
pub fn exit_code(r: &RunReport) -> u8 {
    use crate::error::RunStatus;
    match r.status {
        RunStatus::Pass | RunStatus::Degraded => crate::error::for_status(RunStatus::Pass),
        RunStatus::Flaky | RunStatus::Fail => crate::error::for_status(RunStatus::Fail),
        s => crate::error::for_status(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(outcomes: &[(&str, Outcome, f64)], status: crate::error::RunStatus) -> RunReport {
        let checks: Vec<CheckResult> = outcomes
            .iter()
            .map(|(id, o, d)| {
                serde_json::from_value(json!({
                    "id": id, "kind": "exec", "target": null, "outcome": o,
                    "message": format!("{id} {}", o.name()), "started_s": 0.0,
                    "duration_s": d, "attempts": 1, "origin": "l.toml:3",
                    "evidence": { "latency_ms": d * 1000.0 }, "artifact": "ev/x.json"
                }))
                .unwrap()
            })
            .collect();
        let mut r: RunReport = serde_json::from_value(json!({
            "schema": super::super::SCHEMA, "command": "smoke", "lane": "l", "lane_source": "l",
            "cluster": "c", "cluster_source": "c", "status": status, "exit_code": 0,
            "started": "", "finished": "", "duration_s": 10.0, "accel": null,
            "image": null, "nodes": {}, "steps": [], "layers": [], "findings": [],
            "error": null, "artifacts": {}
        }))
        .unwrap();
        r.layers.push(LayerResult::new("x", "", checks, 1.0));
        r
    }

    /// The rerun's report as `crate::rerun` makes it from runs without
    /// errors: the summary in a ledger, turned into a report.
    fn concluded(times: u32, snapshot: &str, runs: &[(String, RunReport)]) -> RunReport {
        let s = summarize(times, snapshot, runs);
        let mut ledger = crate::ledger::Ledger::default();
        (ledger.layers, ledger.steps) = (s.layers, s.steps);
        let mut header = runs[0].1.clone();
        header.rerun = Some(s.rerun);
        ledger.into_report(header, std::time::Instant::now(), None)
    }

    #[test]
    fn a_check_that_passed_and_failed_is_flaky_with_both_runs_evidence() {
        use crate::error::RunStatus as S;
        use Outcome::*;
        let runs = vec![
            (
                "run-1".to_string(),
                run(&[("a", Pass, 1.0), ("b", Fail, 2.0)], S::Fail),
            ),
            (
                "run-2".to_string(),
                run(&[("a", Pass, 3.0), ("b", Pass, 1.5)], S::Pass),
            ),
            (
                "run-3".to_string(),
                run(&[("a", Pass, 2.0), ("b", Fail, 2.5)], S::Fail),
            ),
        ];
        let r = concluded(3, "rerun", &runs);
        let stats = &r.rerun.as_ref().unwrap().checks;
        let a = &stats[0];
        assert_eq!(
            (a.verdict, a.passes, a.failures, a.pass_rate),
            (Pass, 3, 0, 1.0)
        );
        assert_eq!(a.duration_s, Spread { min: 1.0, max: 3.0 });
        assert_eq!(
            a.figures["latency_ms"],
            Spread {
                min: 1000.0,
                max: 3000.0
            }
        );
        let b = &stats[1];
        assert_eq!((b.verdict, b.passes, b.failures), (Flaky, 1, 2));
        assert!((b.pass_rate - 1.0 / 3.0).abs() < 1e-9);
        assert_eq!(b.outcomes, [Fail, Pass, Fail]);
        let failing = b.failing.as_ref().unwrap();
        assert_eq!(
            (failing.run, failing.result.as_str()),
            (1, "run-1/result.json")
        );
        assert_eq!(failing.artifact.as_deref(), Some("run-1/ev/x.json"));
        assert_eq!(b.passing.as_ref().unwrap().run, 2);
        // The summed-up report: checks carry the verdict; flaky exits 1.
        assert_eq!(r.layers[0].checks[1].outcome, Flaky);
        assert!(
            r.layers[0].checks[1].message.contains("run 1 failed"),
            "{}",
            r.layers[0].checks[1].message
        );
        assert_eq!(r.steps.len(), 3);
        assert_eq!(r.status, crate::error::RunStatus::Flaky);
        assert_eq!(exit_code(&r), 1);
    }

    #[test]
    fn a_subtest_only_a_later_run_reached_is_listed_after_its_script_and_skipped_before() {
        use crate::error::RunStatus as S;
        use Outcome::*;
        let runs = vec![
            (
                "run-1".to_string(),
                run(
                    &[("s", Fail, 1.0), ("s/a", Fail, 1.0), ("t", Pass, 1.0)],
                    S::Fail,
                ),
            ),
            (
                "run-2".to_string(),
                run(
                    &[
                        ("s", Pass, 1.0),
                        ("s/a", Pass, 1.0),
                        ("s/b", Pass, 1.0),
                        ("t", Pass, 1.0),
                    ],
                    S::Pass,
                ),
            ),
        ];
        let r = summarize(2, "s", &runs);
        let ids: Vec<&str> = r.layers[0].checks.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["s", "s/a", "s/b", "t"]);
        // Run 1 never reached s/b: skipped there, so both runs count.
        let b = &r.rerun.checks[2];
        assert_eq!(
            (b.verdict, b.outcomes.as_slice()),
            (Pass, &[Skipped, Pass][..])
        );
        assert_eq!((b.passes, b.skipped, b.pass_rate), (1, 1, 1.0));
        let line = &r.layers[0].checks[2].message;
        assert!(line.starts_with("passed 1/2 run(s)"), "{line}");
        assert!(line.contains("skipped in 1"), "{line}");
    }

    #[test]
    fn every_run_passing_exits_0_and_every_run_failing_is_fail() {
        use crate::error::RunStatus as S;
        use Outcome::*;
        let runs: Vec<_> = (1..=2)
            .map(|i| {
                (
                    format!("run-{i}"),
                    run(&[("a", Pass, 1.0), ("s", Skipped, 0.0)], S::Pass),
                )
            })
            .collect();
        let r = concluded(2, "s", &runs);
        assert_eq!(exit_code(&r), 0);
        let s = &r.rerun.as_ref().unwrap().checks[1];
        assert_eq!((s.verdict, s.skipped, s.pass_rate), (Skipped, 2, 0.0));
        let runs: Vec<_> = (1..=2)
            .map(|i| {
                (
                    format!("run-{i}"),
                    run(&[("d", Degraded, 1.0)], S::Degraded),
                )
            })
            .collect();
        let r = concluded(2, "s", &runs);
        let d = &r.rerun.as_ref().unwrap().checks[0];
        assert_eq!(
            (d.verdict, d.pass_rate),
            (Degraded, 1.0),
            "degraded is never a pass"
        );
        let runs: Vec<_> = (1..=2)
            .map(|i| (format!("run-{i}"), run(&[("a", Fail, 1.0)], S::Fail)))
            .collect();
        let r = concluded(2, "s", &runs);
        assert_eq!(r.rerun.as_ref().unwrap().checks[0].verdict, Fail);
        assert_eq!(exit_code(&r), 1);
        assert!(r.rerun.as_ref().unwrap().checks[0].passing.is_none());
    }
}
