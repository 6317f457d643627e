//! Benchmark figures: what a benchmark check measured, in one shape for
//! every bench kind (fio, S3, materialization, the local export matrix), so
//! the benchmark report, result.json, Hydra's metrics and the opt-in gates
//! all read them the same way.
//!
//! A check puts its figures under `evidence.figures` (see [`verdict`]). By
//! default figures are reported, not judged: these machines are noisy. A
//! lane makes a figure a gate with `gates = { <figure> = { min_ratio = 0.5 } }`.

use super::Verdict;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// One side's runs of a figure, with their spread.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub min: f64,
    pub median: f64,
    pub max: f64,
    pub runs: Vec<f64>,
}

impl Stats {
    /// None for no runs (nothing was measured).
    pub fn of(runs: Vec<f64>) -> Option<Stats> {
        let mut sorted = runs.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        if n == 0 {
            return None;
        }
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Stats {
            min: sorted[0],
            median,
            max: sorted[n - 1],
            runs,
        })
    }
}

/// One measured quantity: a subject, and the baseline it is compared with
/// when there is one (a remote export against the node-local one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    /// Stable key, used by gates and metrics: `seq_read`, `randwrite_p99`.
    pub name: String,
    /// What a person reads: "sequential read".
    pub label: String,
    /// "MB/s", "IOPS", "ms", "ops/s".
    pub unit: String,
    /// Whether a larger number is better (throughput) or worse (latency).
    pub higher_is_better: bool,
    pub subject: Stats,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Stats>,
    /// subject median / baseline median.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
}

impl Figure {
    /// A figure with only a subject (S3 throughput, a latency).
    pub fn single(
        name: &str,
        label: &str,
        unit: &str,
        higher: bool,
        runs: Vec<f64>,
    ) -> Option<Figure> {
        Some(Figure {
            name: name.into(),
            label: label.into(),
            unit: unit.into(),
            higher_is_better: higher,
            subject: Stats::of(runs)?,
            baseline: None,
            ratio: None,
        })
    }

    /// A figure measured on a subject and a baseline side by side.
    pub fn paired(
        name: &str,
        label: &str,
        unit: &str,
        higher: bool,
        subject: Vec<f64>,
        baseline: Vec<f64>,
    ) -> Option<Figure> {
        let mut f = Figure::single(name, label, unit, higher, subject)?;
        let base = Stats::of(baseline)?;
        f.ratio = Some(f.subject.median / base.median.max(1e-9));
        f.baseline = Some(base);
        Some(f)
    }

    /// "sequential read 41.2 MB/s vs 80.3 (0.51x)".
    pub fn summary(&self) -> String {
        let s = format!("{} {:.1} {}", self.label, self.subject.median, self.unit);
        match (&self.baseline, self.ratio) {
            (Some(b), Some(r)) => format!("{s} vs {:.1} ({r:.2}x)", b.median),
            _ => s,
        }
    }
}

/// An opt-in limit on one figure's median (or its ratio).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gate {
    pub min_ratio: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
}

/// Gates by figure name, as a lane writes them.
pub type Gates = BTreeMap<String, Gate>;

/// Refuses gates on figures the check does not produce (at parse time),
/// and `min_ratio` on figures without a baseline.
pub fn check_gates(gates: &Gates, known: &[&str], paired: &[&str]) -> Result<(), String> {
    for (name, gate) in gates {
        if !known.contains(&name.as_str()) {
            return Err(format!(
                "gates: no figure {name:?} (this check measures: {})",
                known.join(", ")
            ));
        }
        if gate.min_ratio.is_some() && !paired.contains(&name.as_str()) {
            return Err(format!(
                "gates.{name}: min_ratio needs a baseline, and {name} has none"
            ));
        }
    }
    Ok(())
}

/// What the gates say about the figures: one line per limit broken.
pub fn judge(gates: &Gates, figures: &[Figure]) -> Vec<String> {
    let mut broken = Vec::new();
    for (name, gate) in gates {
        let Some(f) = figures.iter().find(|f| &f.name == name) else {
            broken.push(format!("{name}: not measured"));
            continue;
        };
        let m = f.subject.median;
        if let Some(min) = gate.min
            && m < min
        {
            broken.push(format!("{name} {m:.2} {} < min {min}", f.unit));
        }
        if let Some(max) = gate.max
            && m > max
        {
            broken.push(format!("{name} {m:.2} {} > max {max}", f.unit));
        }
        if let (Some(min), Some(r)) = (gate.min_ratio, f.ratio)
            && r < min
        {
            broken.push(format!("{name} ratio {r:.2} < min_ratio {min}"));
        }
    }
    broken
}

/// The verdict of a benchmark: `pass` with the figures as evidence, unless
/// a gate is broken. `evidence` is the check's own (an object); the figures
/// go in beside it under `figures`, and the gates under `gates_broken`.
pub fn verdict(
    message: String,
    figures: Vec<Figure>,
    mut evidence: Value,
    gates: &Gates,
) -> Verdict {
    let broken = judge(gates, &figures);
    evidence["figures"] = json!(figures);
    if broken.is_empty() {
        Verdict::pass(message, evidence)
    } else {
        evidence["gates_broken"] = json!(broken);
        Verdict::fail(format!("{message}; gate: {}", broken.join("; ")), evidence)
    }
}

/// The figures in a check's evidence (none for other kinds).
pub fn from_evidence(evidence: &Value) -> Vec<Figure> {
    evidence
        .get("figures")
        .and_then(|f| serde_json::from_value(f.clone()).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_and_ratio() {
        let s = Stats::of(vec![3.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!((s.min, s.median, s.max), (1.0, 2.5, 10.0));
        assert_eq!(s.runs, vec![3.0, 1.0, 2.0, 10.0]);
        assert!(Stats::of(vec![]).is_none());
        let f = Figure::paired(
            "seq_read",
            "sequential read",
            "MB/s",
            true,
            vec![10.0],
            vec![40.0],
        )
        .unwrap();
        assert_eq!(f.ratio, Some(0.25));
        assert_eq!(f.summary(), "sequential read 10.0 MB/s vs 40.0 (0.25x)");
    }

    #[test]
    fn gates_fail_only_when_a_limit_is_broken() {
        let f = vec![
            Figure::paired("seq_read", "r", "MB/s", true, vec![10.0], vec![40.0]).unwrap(),
            Figure::single("p99", "p99", "ms", false, vec![12.0]).unwrap(),
        ];
        let ok: Gates =
            toml::from_str("seq_read = { min_ratio = 0.2 }\np99 = { max = 20 }").unwrap();
        assert!(judge(&ok, &f).is_empty());
        assert_eq!(
            verdict("m".into(), f.clone(), json!({}), &ok).outcome,
            super::super::Outcome::Pass
        );
        let bad: Gates =
            toml::from_str("seq_read = { min_ratio = 0.5 }\np99 = { max = 5 }").unwrap();
        let v = verdict("m".into(), f.clone(), json!({}), &bad);
        assert_eq!(v.outcome, super::super::Outcome::Fail);
        assert_eq!(v.evidence["gates_broken"].as_array().unwrap().len(), 2);
        assert_eq!(from_evidence(&v.evidence), f);
    }

    #[test]
    fn gates_on_unknown_figures_are_refused() {
        let g: Gates = toml::from_str("nope = { max = 1 }").unwrap();
        assert!(
            check_gates(&g, &["seq_read"], &["seq_read"])
                .unwrap_err()
                .contains("no figure \"nope\"")
        );
        let g: Gates = toml::from_str("p99 = { min_ratio = 1 }").unwrap();
        assert!(
            check_gates(&g, &["p99"], &[])
                .unwrap_err()
                .contains("needs a baseline")
        );
    }
}
