//! The artifacts of a lane run: the directory, `result.json` (the schema is
//! docs/result-schema.md), `junit.xml` and `report.md`, plus the per-layer
//! table printed at the end.

pub mod bench;
mod html;
mod junit;
mod markdown;
pub mod rerun;
mod timeline;

use crate::check::Outcome;
use crate::engine::LayerResult;
use crate::error::{RunStatus, for_status};
use crate::evidence::Finding;
use crate::files::write_atomic;
use crate::machine::accel::AccelChoice;
use crate::secrets::Secrets;
use crate::state::ImageRecord;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const SCHEMA: &str = "photon-cluster/result/v1";

/// `result.json`. A run does not edit it as it goes: it records into a
/// `ledger::Ledger`, which makes the report once the run is over.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    pub schema: String,
    /// The command that ran the lane: `smoke`, `fresh-smoke`, `run`.
    pub command: String,
    /// The whole command line, as typed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_line: Option<String>,
    /// The checkout's commit (`git describe --always --dirty`) when the
    /// driver ran from one, else its version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    pub lane: String,
    pub lane_source: String,
    pub cluster: String,
    pub cluster_source: String,
    pub status: RunStatus,
    pub exit_code: u8,
    pub started: String,
    pub finished: String,
    pub duration_s: f64,
    pub accel: Option<AccelChoice>,
    /// How the cluster came up: booted (`cold`) or restored from a snapshot (`warm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<Boot>,
    pub image: Option<ImageRecord>,
    pub nodes: BTreeMap<String, NodeSummary>,
    /// fresh-smoke's clean, build, start, smoke and stop, in order.
    pub steps: Vec<Step>,
    pub layers: Vec<LayerResult>,
    pub findings: Vec<Finding>,
    /// The infrastructure error that ended the run early, if any.
    pub error: Option<String>,
    /// Its stable name (docs/troubleshooting.md): `kernel_panic`,
    /// `ssh_unreachable`, `disk_full`, `timeout`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<crate::error::ErrorKind>,
    /// Artifact name -> path relative to the artifact root.
    pub artifacts: BTreeMap<String, String>,
    /// `run` only: the store paths checked, and the impure ones allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hermetic: Option<crate::hermetic::Hermetic>,
    /// The fabric switch at the end of the lane: frames and drops per port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fabric: Option<crate::fabric::switch::Status>,
    /// `rerun` only: the lane run N times from one snapshot, per check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerun: Option<rerun::Rerun>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Boot {
    /// `cold` or `warm`.
    pub mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeSummary {
    pub role: crate::spec::Role,
    pub address: String,
    pub ready_after_s: Option<f64>,
    /// `agent` or `ssh`: how the driver reached the node (docs/result-schema.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<crate::state::ChannelKind>,
    /// When each boot phase was seen, from the first QEMU launch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phases: Option<crate::state::BootPhases>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    pub outcome: Outcome,
    pub duration_s: f64,
    pub message: String,
}

impl RunReport {
    /// The header of a run's report: what runs, and when it started. Its
    /// status stays `error` until `Ledger::into_report` decides it.
    pub fn new(
        command: &str,
        lane: &str,
        lane_source: &Path,
        cluster: &crate::spec::Cluster,
    ) -> Self {
        RunReport {
            schema: SCHEMA.into(),
            command: command.into(),
            command_line: Some(std::env::args().collect::<Vec<_>>().join(" ")),
            commit: Some(bench::commit()),
            lane: lane.into(),
            lane_source: lane_source.display().to_string(),
            cluster: cluster.name.clone(),
            cluster_source: cluster.source.display().to_string(),
            status: RunStatus::Error,
            exit_code: for_status(RunStatus::Error),
            started: chrono::Utc::now().to_rfc3339(),
            finished: String::new(),
            duration_s: 0.0,
            accel: None,
            boot: None,
            image: None,
            nodes: BTreeMap::new(),
            steps: Vec::new(),
            layers: Vec::new(),
            findings: Vec::new(),
            error: None,
            error_kind: None,
            artifacts: BTreeMap::new(),
            hermetic: None,
            fabric: None,
            rerun: None,
        }
    }

    /// The run's figures, for Hydra's `nix-support/hydra-metrics`: name,
    /// value, unit. Boot-to-ready (the slowest node), the lane's duration,
    /// the checks by outcome, and every benchmark figure in the checks'
    /// evidence (numbers under keys ending in `_mb_s` or `_ms`, QEMU's
    /// migration `downtime`, and `ratio`s), named `<check id>.<path>`.
    pub fn metrics(&self) -> Vec<(String, f64, &'static str)> {
        let mut out = Vec::new();
        let ready = self.nodes.values().filter_map(|n| n.ready_after_s);
        if let Some(slowest) = ready.reduce(f64::max) {
            out.push(("boot-to-ready".into(), slowest, "s"));
        }
        out.push(("lane-duration".into(), self.duration_s, "s"));
        let checks: Vec<_> = self.layers.iter().flat_map(|l| &l.checks).collect();
        for o in [
            Outcome::Pass,
            Outcome::Fail,
            Outcome::Degraded,
            Outcome::Flaky,
            Outcome::Skipped,
        ] {
            let n = checks.iter().filter(|c| c.outcome == o).count();
            out.push((format!("checks-{}", o.name()), n as f64, ""));
        }
        for c in checks {
            let id = c.id.replace(['@', ' '], ".");
            figures(&id, &c.evidence, 0, &mut out);
            // The benchmark kinds' figures (check::figures): median and ratio.
            for f in crate::check::figures::from_evidence(&c.evidence) {
                let unit = bench::metric_unit(&f.unit);
                out.push((format!("{id}.{}", f.name), f.subject.median, unit));
                if let Some(r) = f.ratio {
                    out.push((format!("{id}.{}.ratio", f.name), r, "x"));
                }
            }
        }
        out
    }

    pub fn failed_checks(&self) -> Vec<&crate::engine::CheckResult> {
        self.layers
            .iter()
            .flat_map(|l| &l.checks)
            .filter(|c| c.outcome == Outcome::Fail)
            .collect()
    }
}

/// The benchmark figures in one check's evidence (see `RunReport::metrics`).
fn figures(
    prefix: &str,
    v: &serde_json::Value,
    depth: usize,
    out: &mut Vec<(String, f64, &'static str)>,
) {
    let Some(map) = v.as_object().filter(|_| depth < 3) else {
        return;
    };
    for (k, v) in map {
        let name = format!("{prefix}.{k}");
        let unit = if k.ends_with("_mb_s") {
            Some("MB/s")
        } else if (k.ends_with("_ms") && !k.starts_with("timestamp")) || k == "downtime" {
            // `downtime` is QEMU's migration statistic, in ms.
            Some("ms")
        } else if k == "ratio" {
            Some("x")
        } else {
            None
        };
        match (unit, v.as_f64()) {
            (Some(u), Some(x)) => out.push((name, x, u)),
            _ => figures(&name, v, depth + 1, out),
        }
    }
}

/// Creates `<root>/<lane>/<timestamp>` and points `<root>/<lane>/latest` at it.
pub fn create_dir(root: &Path, lane: &str) -> Result<PathBuf> {
    let base = root.join(lane);
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    let mut dir = base.join(&stamp);
    let mut n = 1;
    while dir.exists() {
        n += 1;
        dir = base.join(format!("{stamp}-{n}"));
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let link = base.join("latest");
    let tmp = base.join(".latest.tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(dir.file_name().expect("named"), &tmp)?;
    std::fs::rename(&tmp, &link).with_context(|| format!("updating {}", link.display()))?;
    Ok(dir)
}

/// Writes result.json, junit.xml, report.md, report.html and driver.log
/// (and the checks' evidence files), each with the cluster's secrets redacted.
pub fn write(dir: &Path, report: &mut RunReport, secrets: &Secrets) -> Result<()> {
    for (name, file) in [
        ("result", "result.json"),
        ("junit", "junit.xml"),
        ("report", "report.md"),
        ("report-html", "report.html"),
        ("driver-log", "driver.log"),
        ("nodes", "nodes/"),
    ] {
        report.artifacts.insert(name.into(), file.into());
    }
    // Evidence files must not cost the report itself.
    if let Err(e) = write_check_artifacts(dir, report, secrets) {
        tracing::warn!("check artifacts: {e:#}");
    }
    // The benchmark report, when the run measured figures: small, and listed
    // in result.json, so before it; best effort, like the evidence files.
    match bench::write(dir, report) {
        Ok(Some(p)) => {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            report.artifacts.insert("benchmarks".into(), name.into());
        }
        Ok(None) => {}
        Err(e) => tracing::warn!("benchmark report: {e:#}"),
    }
    // result.json first: on a disk that fills up it is the one to keep.
    let json = serde_json::to_string_pretty(report)?;
    write_atomic(&dir.join("result.json"), secrets.redact(&json).as_bytes())?;
    let junit = junit::render(report)?;
    write_atomic(&dir.join("junit.xml"), secrets.redact(&junit).as_bytes())?;
    render(dir, report, secrets)?;
    // The driver's own debug log of this run, so far; best effort.
    let log = crate::log::captured();
    if let Err(e) = write_atomic(&dir.join("driver.log"), &secrets.redact_bytes(&log)) {
        tracing::warn!("driver.log: {e:#}");
    }
    Ok(())
}

/// Writes report.md and report.html from the report (also `report DIR`,
/// which re-renders an old run with this driver).
pub fn render(dir: &Path, report: &RunReport, secrets: &Secrets) -> Result<()> {
    let md = markdown::render(report);
    write_atomic(&dir.join("report.md"), secrets.redact(&md).as_bytes())?;
    let page = html::render(report, dir);
    write_atomic(&dir.join("report.html"), secrets.redact(&page).as_bytes())?;
    Ok(())
}

/// Writes each check's evidence to the file its lane names (`artifact =`),
/// and lists the files in `report.artifacts` under `check:<id>`. JSON
/// files get the whole evidence; other files get its `stdout` or `body`
/// text when it has one (journals, captured answers).
pub fn write_check_artifacts(dir: &Path, report: &mut RunReport, secrets: &Secrets) -> Result<()> {
    for c in report.layers.iter().flat_map(|l| &l.checks) {
        let Some(rel) = &c.artifact else { continue };
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let text = ["stdout", "body"]
            .iter()
            .find_map(|k| c.evidence.get(*k).and_then(|v| v.as_str()))
            .filter(|_| !rel.ends_with(".json"));
        let bytes = match text {
            Some(t) => t.as_bytes().to_vec(),
            None => serde_json::to_vec_pretty(&json!({
                "check": c.id,
                "outcome": c.outcome,
                "message": c.message,
                "evidence": c.evidence,
            }))?,
        };
        write_atomic(&path, &secrets.redact_bytes(&bytes))?;
    }
    let listed: Vec<(String, String)> = report
        .layers
        .iter()
        .flat_map(|l| &l.checks)
        .filter_map(|c| Some((format!("check:{}", c.id), c.artifact.clone()?)))
        .collect();
    report.artifacts.extend(listed);
    // Files a check kept itself (pcaps, histories): `evidence.files`.
    let kept: Vec<(String, String)> = report
        .layers
        .iter()
        .flat_map(|l| &l.checks)
        .flat_map(|c| {
            let files = c.evidence.get("files").and_then(|f| f.as_object());
            files
                .into_iter()
                .flatten()
                .filter_map(|(name, rel)| {
                    Some((format!("check:{}:{name}", c.id), rel.as_str()?.to_string()))
                })
                .collect::<Vec<_>>()
        })
        .collect();
    report.artifacts.extend(kept);
    Ok(())
}

/// Prints the summary on stdout; with `json`, prints the result.json just
/// written (redacted) on stdout and the summary on stderr instead.
pub fn print_summary(report: &RunReport, dir: &Path, json: bool) -> Result<()> {
    let text = summary(report, dir);
    if json {
        let path = dir.join("result.json");
        let doc = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        eprint!("{text}");
        println!("{}", doc.trim_end());
    } else {
        print!("{text}");
    }
    Ok(())
}

/// `report DIR`: reads DIR/result.json and writes report.md and
/// report.html beside it; returns the files written. A missing or
/// unreadable result.json is bad input.
pub fn rerender(dir: &Path) -> Result<Vec<PathBuf>> {
    let path = dir.join("result.json");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        crate::error::bad_input(format!(
            "{}: {e}; `report` needs an artifact root of a run",
            path.display()
        ))
    })?;
    let report: RunReport = serde_json::from_str(&text).map_err(|e| {
        crate::error::bad_input(format!(
            "{}:{}:{}: not a result.json this driver reads: {e}",
            path.display(),
            e.line(),
            e.column()
        ))
    })?;
    // The result.json was redacted when it was written.
    render(dir, &report, &Secrets::default())?;
    let mut written = vec![dir.join("report.md"), dir.join("report.html")];
    written.extend(bench::write(dir, &report)?);
    Ok(written)
}

/// The per-layer table and the checks that did not pass, for the terminal.
fn summary(report: &RunReport, dir: &Path) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    macro_rules! println {
        () => { out.push('\n') };
        ($($t:tt)*) => {{ let _ = writeln!(out, $($t)*); }};
    }
    println!();
    println!(
        "{:<18} {:<9} {:>6} {:>5} {:>5} {:>8} {:>5} {:>7} {:>8}",
        "layer", "outcome", "checks", "pass", "fail", "degraded", "flaky", "skipped", "time"
    );
    for l in &report.layers {
        let count = |o: Outcome| l.checks.iter().filter(|c| c.outcome == o).count();
        println!(
            "{:<18} {:<9} {:>6} {:>5} {:>5} {:>8} {:>5} {:>7} {:>7.1}s",
            l.name,
            l.outcome.name(),
            l.checks.len(),
            count(Outcome::Pass),
            count(Outcome::Fail),
            count(Outcome::Degraded),
            count(Outcome::Flaky),
            count(Outcome::Skipped),
            l.duration_s
        );
    }
    for s in report.steps.iter().filter(|s| s.outcome == Outcome::Fail) {
        println!("step {} failed: {}", s.name, s.message);
    }
    for c in report.layers.iter().flat_map(|l| &l.checks) {
        if matches!(
            c.outcome,
            Outcome::Fail | Outcome::Degraded | Outcome::Flaky
        ) {
            println!("{:<8} {}: {}", c.outcome.name(), c.id, c.message);
        }
    }
    if let Some(e) = &report.error {
        match report.error_kind {
            Some(k) => println!("error[{}]: {e}", k.name()),
            None => println!("error: {e}"),
        }
    }
    println!(
        "{}: {} in {:.0} s (exit {}); artifacts in {}",
        report.lane,
        report.status.name().to_uppercase(),
        report.duration_s,
        report.exit_code,
        dir.display()
    );
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A run of one failed layer: the script check `s` (1-6 s), its
    /// subtests `s/boots` (passed, 1.5-2.5 s) and `s/breaks` (failed,
    /// 3-5 s), and a check `other`; for the renderers' tests.
    pub(crate) fn with_subtests() -> RunReport {
        let check = |id: &str, kind: &str, outcome: &str, at: f64, secs: f64| {
            let c = json!({
                "id": id, "kind": kind, "target": null, "outcome": outcome,
                "message": format!("{id} {outcome}"), "started_s": at, "duration_s": secs,
                "attempts": 1, "origin": "lane.toml:3", "evidence": {}
            });
            serde_json::from_value::<crate::engine::CheckResult>(c).unwrap()
        };
        let mut boots = check("s/boots", "subtest", "pass", 1.5, 1.0);
        let mut breaks = check("s/breaks", "subtest", "fail", 3.0, 2.0);
        breaks.message = "AssertionError: no".into();
        breaks.origin = "s.py:7".into();
        breaks.evidence = json!({ "traceback": "Traceback (most recent call last):\n  boom\n" });
        for p in [&mut boots, &mut breaks] {
            p.part_of = Some("s".into());
        }
        let checks = vec![
            check("s", "script", "fail", 1.0, 5.0),
            boots,
            breaks,
            check("other", "exec", "pass", 0.0, 0.5),
        ];
        let mut r: RunReport = serde_json::from_value(json!({
            "schema": SCHEMA, "command": "script", "lane": "s", "lane_source": "lane.toml",
            "cluster": "c", "cluster_source": "c", "status": "fail", "exit_code": 1,
            "started": "", "finished": "", "duration_s": 7.0, "accel": null,
            "image": null, "nodes": {}, "steps": [], "layers": [], "findings": [],
            "error": null, "artifacts": {}
        }))
        .unwrap();
        r.layers.push(LayerResult::new("script", "", checks, 6.0));
        r
    }

    #[test]
    fn subtests_are_checks_in_the_markdown_report() {
        let md = markdown::render(&with_subtests());
        assert!(md.contains("| s/boots | script | pass | 1.0 s |"), "{md}");
        assert!(md.contains("### s/breaks (fail, s.py:7)"), "{md}");
        assert_eq!(with_subtests().layers[0].outcome, Outcome::Fail);
    }

    #[test]
    fn metrics_carry_boot_duration_counts_and_benchmark_figures() {
        let node = |ready: f64| NodeSummary {
            role: crate::spec::Role::Worker,
            address: "10.0.0.1".into(),
            ready_after_s: Some(ready),
            channel: None,
            phases: None,
        };
        let evidence = json!({
            "read": { "subject_median_mb_s": 9.5, "ratio": 0.63, "subject_mb_s": [9.0, 9.5] },
            "timestamp_ms": 1_700_000_000_000u64,
            "migration": { "stats": { "downtime": 82 } }
        });
        let check: crate::engine::CheckResult = serde_json::from_value(json!({
            "id": "bench@b", "kind": "volume_bench", "target": "b", "outcome": "pass",
            "message": "", "started_s": 0.0, "duration_s": 1.0, "attempts": 1,
            "origin": "l.toml:3", "evidence": evidence
        }))
        .unwrap();
        let mut r: RunReport = serde_json::from_value(json!({
            "schema": SCHEMA, "command": "run", "lane": "l", "lane_source": "l",
            "cluster": "c", "cluster_source": "c", "status": "pass", "exit_code": 0,
            "started": "", "finished": "", "duration_s": 42.5, "accel": null,
            "image": null, "nodes": {}, "steps": [], "layers": [], "findings": [],
            "error": null, "artifacts": {}
        }))
        .unwrap();
        r.nodes.insert("a".into(), node(50.0));
        r.nodes.insert("b".into(), node(61.5));
        r.layers.push(LayerResult::new("x", "", vec![check], 1.0));
        let m = r.metrics();
        let get = |n: &str| m.iter().find(|x| x.0 == n).map(|x| (x.1, x.2));
        assert_eq!(get("boot-to-ready"), Some((61.5, "s")));
        assert_eq!(get("lane-duration"), Some((42.5, "s")));
        assert_eq!(get("checks-pass"), Some((1.0, "")));
        assert_eq!(get("checks-fail"), Some((0.0, "")));
        // A flaky check is counted as such, never among the passes.
        assert_eq!(get("checks-flaky"), Some((0.0, "")));
        let mut flaky = r.layers[0].checks[0].clone();
        flaky.outcome = Outcome::Flaky;
        flaky.id = "other@b".into();
        r.layers[0].checks.push(flaky);
        let m = r.metrics();
        let get = |n: &str| m.iter().find(|x| x.0 == n).map(|x| (x.1, x.2));
        assert_eq!(get("checks-flaky"), Some((1.0, "")));
        assert_eq!(get("checks-pass"), Some((1.0, "")));
        assert_eq!(get("bench.b.read.subject_median_mb_s"), Some((9.5, "MB/s")));
        assert_eq!(get("bench.b.read.ratio"), Some((0.63, "x")));
        assert_eq!(get("bench.b.migration.stats.downtime"), Some((82.0, "ms")));
        assert_eq!(
            get("bench.b.timestamp_ms"),
            None,
            "a timestamp is not a figure"
        );
    }
}
