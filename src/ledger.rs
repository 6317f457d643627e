//! A run's bookkeeping while it runs: the steps taken, the layers' results,
//! the log findings, the fabric's counters, the cluster it ran on and the
//! first infrastructure error. `smoke`, `rerun` and `layered` record into a
//! `Ledger`; once the run is over, `Ledger::into_report` decides its status
//! and exit code and hands on the `report::RunReport` that result.json is
//! written from. The report is never edited as the run goes: what it says
//! follows from the ledger in one place.

use crate::check::Outcome;
use crate::engine::LayerResult;
use crate::error::{ErrorKind, RunStatus, for_status};
use crate::evidence::Finding;
use crate::fabric::switch;
use crate::machine::accel::AccelChoice;
use crate::report::{Boot, NodeSummary, RunReport, Step};
use crate::state::{ImageRecord, RunningCluster};
use anyhow::Result;
use std::collections::BTreeMap;
use std::time::Instant;

/// What a run recorded so far.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    /// Steps around the lane (clean, build, start, smoke, stop, ...), in order.
    pub steps: Vec<Step>,
    pub layers: Vec<LayerResult>,
    pub findings: Vec<Finding>,
    /// The fabric switch at the end of the lane.
    pub fabric: Option<switch::Status>,
    /// Only through `fail`: the first error is the one that counts.
    error: Option<RunError>,
    /// Only through `describe`/`describe_as`.
    cluster: Description,
}

/// The infrastructure error that ended a run early.
#[derive(Debug, Clone, PartialEq)]
pub struct RunError {
    pub message: String,
    /// None only for an error carried over from a result.json written
    /// before errors had stable names.
    pub kind: Option<ErrorKind>,
}

/// The cluster a run ran on, as result.json describes it.
#[derive(Debug, Clone, Default)]
struct Description {
    accel: Option<AccelChoice>,
    boot: Option<Boot>,
    image: Option<ImageRecord>,
    nodes: BTreeMap<String, NodeSummary>,
}

impl Description {
    fn of(record: &RunningCluster) -> Self {
        let mode = match record.restored_from {
            Some(_) => "warm",
            None => "cold",
        };
        let boot = Boot {
            mode: mode.into(),
            snapshot: record.restored_from.clone(),
        };
        let nodes = record.nodes.iter().map(|(name, n)| {
            let summary = NodeSummary {
                role: n.role,
                address: n.address.clone(),
                ready_after_s: n.ready_after_s,
                channel: n.channel,
                phases: n.phases.clone(),
            };
            (name.clone(), summary)
        });
        Description {
            accel: Some(record.accel.clone()),
            boot: Some(boot),
            image: Some(record.image.clone()),
            nodes: nodes.collect(),
        }
    }

    fn of_report(r: &RunReport) -> Self {
        Description {
            accel: r.accel.clone(),
            boot: r.boot.clone(),
            image: r.image.clone(),
            nodes: r.nodes.clone(),
        }
    }
}

impl Ledger {
    /// Records the run's infrastructure error unless one is recorded
    /// already: the first error is what ended the run, and later ones
    /// (a stop after a failed start, a node gone after a timeout) follow
    /// from it.
    pub fn fail(&mut self, message: impl Into<String>, kind: Option<ErrorKind>) {
        if self.error.is_none() {
            let message = message.into();
            self.error = Some(RunError { message, kind });
        }
    }

    /// `fail` with the error's chain as the message and its stable name.
    pub fn fail_with(&mut self, e: &anyhow::Error) {
        self.fail(format!("{e:#}"), Some(crate::error::kind_of(e)));
    }

    /// `fail` with another run's error, if it had one, as `<label>: <error>`
    /// (a rerun's runs, an assembled lane's layers).
    pub fn carry_error(&mut self, label: &str, from: &RunReport) {
        if let Some(e) = &from.error {
            self.fail(format!("{label}: {e}"), from.error_kind);
        }
    }

    pub fn error(&self) -> Option<&RunError> {
        self.error.as_ref()
    }

    /// Runs one step, times it and records it; an error becomes the run's
    /// error (when it is the first). Returns whether the step succeeded.
    pub fn step(&mut self, name: &str, f: impl FnOnce() -> Result<String>) -> bool {
        tracing::info!("== {name}");
        let t = Instant::now();
        let result = f();
        let (outcome, message) = match &result {
            Ok(m) => (Outcome::Pass, m.clone()),
            Err(e) => (Outcome::Fail, format!("{e:#}")),
        };
        if let Err(e) = &result {
            self.fail(format!("{name}: {message}"), Some(crate::error::kind_of(e)));
        }
        self.steps.push(Step {
            name: name.into(),
            outcome,
            duration_s: t.elapsed().as_secs_f64(),
            message,
        });
        result.is_ok()
    }

    /// Records what the running cluster is (accel, image, boot times).
    pub fn describe(&mut self, record: &RunningCluster) {
        self.cluster = Description::of(record);
    }

    /// Records the cluster as another run's report described it (a rerun's
    /// last run, an assembled lane's first layer).
    pub fn describe_as(&mut self, r: &RunReport) {
        self.cluster = Description::of_report(r);
    }

    /// The run's status: how it was stopped (`timeout`, `interrupted`) if
    /// it was, else `error` after an infrastructure error, else the worst
    /// outcome of its layers and steps (fail, then flaky, then degraded).
    pub fn status(&self, stopped: Option<RunStatus>) -> RunStatus {
        if let Some(s) = stopped {
            return s;
        }
        if self.error.is_some() {
            return RunStatus::Error;
        }
        let layers = self.layers.iter().map(|l| l.outcome);
        let outcomes = layers.chain(self.steps.iter().map(|s| s.outcome));
        match crate::engine::overall(outcomes) {
            Outcome::Fail => RunStatus::Fail,
            Outcome::Degraded => RunStatus::Degraded,
            Outcome::Flaky => RunStatus::Flaky,
            _ => RunStatus::Pass,
        }
    }

    /// The run's report: `header` (what ran: command, lane, cluster, start
    /// time, and `hermetic` or `rerun` when set) with what the ledger
    /// recorded, its status and exit code, and the time it took from
    /// `started`. `stopped` says how the run was cut short, if it was; it
    /// is the run's error unless an earlier one ended it.
    pub fn into_report(
        mut self,
        header: RunReport,
        started: Instant,
        stopped: Option<RunStatus>,
    ) -> RunReport {
        if stopped.is_some() {
            self.fail_with(&crate::stop_error());
        }
        let status = self.status(stopped);
        let (error, error_kind) = match self.error {
            Some(e) => (Some(e.message), e.kind),
            None => (None, None),
        };
        let c = self.cluster;
        RunReport {
            status,
            exit_code: for_status(status),
            finished: chrono::Utc::now().to_rfc3339(),
            duration_s: started.elapsed().as_secs_f64(),
            accel: c.accel,
            boot: c.boot,
            image: c.image,
            nodes: c.nodes,
            steps: self.steps,
            layers: self.layers,
            findings: self.findings,
            error,
            error_kind,
            fabric: self.fabric,
            ..header
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn layer(o: Outcome) -> LayerResult {
        let check = serde_json::from_value(json!({
            "id": "a@node01", "kind": "exec", "target": "node01", "outcome": o,
            "message": "", "started_s": 0.0, "duration_s": 1.0, "attempts": 1,
            "origin": "l.toml:3", "evidence": {}
        }))
        .unwrap();
        LayerResult::new("x", "", vec![check], 1.0)
    }

    fn ledger_of(outcomes: &[Outcome]) -> Ledger {
        Ledger {
            layers: outcomes.iter().map(|o| layer(*o)).collect(),
            ..Ledger::default()
        }
    }

    fn record() -> RunningCluster {
        serde_json::from_value(json!({
            "name": "t", "source": "t.toml", "started_unix": 0,
            "accel": { "used": "tcg", "requested": "tcg", "fallback_reason": null },
            "ssh_key": "/nonexistent", "known_hosts": "/nonexistent",
            "image": { "provider": "prebuilt", "kernel": "k", "initrd": "i", "rootfs": "r", "id": "x" },
            "nodes": { "node01": { "role": "control", "address": "10.0.0.1", "pid": 1,
                "ssh_port": 22, "forwards": {}, "units": [], "dir": "/x", "booted_unix": 0,
                "ready_after_s": 3.5 } },
            "restored_from": "ready"
        }))
        .unwrap()
    }

    fn header() -> RunReport {
        let cluster = crate::spec::Cluster::profile("reference").unwrap();
        RunReport::new("smoke", "smoke", std::path::Path::new("l.toml"), &cluster)
    }

    /// The top-level keys of a pretty-printed JSON object, in order.
    fn top_keys(text: &str) -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix("  \""))
            .filter_map(|l| l.split('"').next())
            .map(String::from)
            .collect()
    }

    #[test]
    fn the_first_error_wins() {
        let mut l = Ledger::default();
        assert!(l.error().is_none());
        l.fail("start: kernel panic", Some(ErrorKind::KernelPanic));
        l.fail("QEMU is not running for node01", Some(ErrorKind::NodeGone));
        let earlier = RunReport {
            error: Some("gone".into()),
            ..header()
        };
        l.carry_error("run 2", &earlier);
        let want = RunError {
            message: "start: kernel panic".into(),
            kind: Some(ErrorKind::KernelPanic),
        };
        assert_eq!(l.error(), Some(&want));
        // A step that fails later is recorded, its error is not the run's.
        assert!(!l.step("stop", || Err(anyhow::anyhow!("no such pid"))));
        assert_eq!(l.steps[0].outcome, Outcome::Fail);
        assert_eq!(l.error(), Some(&want));
    }

    #[test]
    fn a_step_records_its_outcome_and_its_error() {
        let mut l = Ledger::default();
        assert!(l.step("clean", || Ok("removed".into())));
        l.carry_error("layer a", &header());
        assert!(
            l.error().is_none(),
            "a report without an error carries none"
        );
        assert!(!l.step("build", || Err(anyhow::anyhow!("no space"))));
        let names: Vec<_> = l.steps.iter().map(|s| (&*s.name, s.outcome)).collect();
        assert_eq!(names, [("clean", Outcome::Pass), ("build", Outcome::Fail)]);
        assert_eq!(l.steps[1].message, "no space");
        let e = l.error().unwrap();
        assert_eq!(e.message, "build: no space");
        assert_eq!(e.kind, Some(ErrorKind::Infra));
    }

    #[test]
    fn status_is_the_worst_outcome_unless_an_error_or_a_stop() {
        use Outcome::*;
        let status = |o: &[Outcome]| ledger_of(o).status(None);
        assert_eq!(status(&[]), RunStatus::Pass);
        assert_eq!(status(&[Pass, Skipped]), RunStatus::Pass);
        assert_eq!(status(&[Pass, Degraded]), RunStatus::Degraded);
        assert_eq!(status(&[Degraded, Flaky]), RunStatus::Flaky);
        assert_eq!(status(&[Flaky, Fail, Degraded]), RunStatus::Fail);
        // Steps count as much as layers.
        let mut l = ledger_of(&[Pass]);
        l.step("stop", || Ok(String::new()));
        l.steps[0].outcome = Fail;
        assert_eq!(l.status(None), RunStatus::Fail);
        // An error makes `error`, whatever passed.
        let mut l = ledger_of(&[Pass]);
        l.fail("start: boom", None);
        assert_eq!(l.status(None), RunStatus::Error);
        // A stop wins over both.
        assert_eq!(l.status(Some(RunStatus::Timeout)), RunStatus::Timeout);
        let l = ledger_of(&[Fail]);
        assert_eq!(
            l.status(Some(RunStatus::Interrupted)),
            RunStatus::Interrupted
        );
    }

    #[test]
    fn the_report_has_the_status_exit_code_and_the_stop_as_its_error() {
        let r = ledger_of(&[Outcome::Fail]).into_report(header(), Instant::now(), None);
        assert_eq!((r.status, r.exit_code), (RunStatus::Fail, 1));
        assert_eq!((r.error, r.error_kind), (None, None));
        let stopped = Some(RunStatus::Interrupted);
        let r = ledger_of(&[Outcome::Pass]).into_report(header(), Instant::now(), stopped);
        assert_eq!((r.status, r.exit_code), (RunStatus::Interrupted, 130));
        assert!(r.error.is_some() && r.error_kind.is_some());
        // An earlier error stays the run's error; the stop still decides.
        let mut l = ledger_of(&[Outcome::Pass]);
        l.fail("start: boom", Some(ErrorKind::QemuExited));
        let r = l.into_report(header(), Instant::now(), stopped);
        assert_eq!(r.error.as_deref(), Some("start: boom"));
        assert_eq!(r.error_kind, Some(ErrorKind::QemuExited));
        assert_eq!(r.status, RunStatus::Interrupted);
    }

    /// result.json's keys, in order, as `RunReport::finish` left them
    /// before the ledger: one recorded field missing would be a key less.
    #[test]
    fn a_ledger_makes_the_same_result_json_keys() {
        let mut l = ledger_of(&[Outcome::Pass]);
        l.describe(&record());
        l.step("start", || Ok("1 node ready".into()));
        l.findings.push(Finding {
            node: "node01".into(),
            file: "nodes/node01/vm.log".into(),
            line: 1,
            what: "Kernel panic".into(),
            excerpt: String::new(),
        });
        l.fabric = Some(switch::Status::default());
        l.fail("QEMU is not running for node01", Some(ErrorKind::NodeGone));
        let r = l.into_report(header(), Instant::now(), None);
        let keys = top_keys(&serde_json::to_string_pretty(&r).unwrap());
        let before = "schema command command_line commit lane lane_source cluster \
            cluster_source status exit_code started finished duration_s accel boot image \
            nodes steps layers findings error error_kind artifacts fabric";
        assert_eq!(keys.join(" "), before);
        assert_eq!(r.boot.unwrap().snapshot.as_deref(), Some("ready"));
        assert_eq!(r.nodes["node01"].ready_after_s, Some(3.5));
        // And every key docs/result-schema.md shows is there.
        let doc = include_str!("../docs/result-schema.md");
        let block = doc.split("```jsonc").nth(1).unwrap().split("```").next();
        let documented = top_keys(block.unwrap());
        assert!(documented.len() > 20, "{documented:?}");
        for k in documented {
            assert!(keys.contains(&k), "{k} is documented but not written");
        }
    }
}
