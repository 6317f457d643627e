//! `photon-cluster compare OLD NEW`: what changed between two lane runs,
//! read from their result.json (docs/compare.md says how to read it).
//!
//! Judged, and a regression (exit 1) when worse:
//! - a check's outcome, ranked pass < degraded < fail. `skipped` is not on
//!   that scale (a check skipped because an earlier layer failed says
//!   nothing of its own), so a change to or from it is only `changed`;
//! - a benchmark figure (`evidence.figures`, check::figures) whose new
//!   min..max lies wholly on the worse side of the old min..max, in the
//!   direction the figure itself records (`higher_is_better`). When either
//!   range has zero width (one run, or runs that all agree) there is no
//!   spread to go by: the figure `moved`, and is a regression only when its
//!   median also moved more than [`ZERO_WIDTH_THRESHOLD`].
//!
//! Reported, never judged: boot and lane times (these machines move them
//! by a factor of five between identical runs), the accelerator, the image
//! and the boot mode of each run. They explain a difference; they are not one.

use crate::check::figures::{self, Figure, Stats};
use crate::error::{EXIT_CHECK_FAILED, EXIT_PASS, bad_input};
use crate::report::RunReport;
use anyhow::Result;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// The schema of `compare --json`.
pub const SCHEMA: &str = "photon-cluster/compare/v1";

/// How far (relative to the old median) a figure with a zero-width range
/// must move before it counts as a regression or an improvement.
pub const ZERO_WIDTH_THRESHOLD: f64 = 0.20;

/// What happened to one check or figure between the runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// Worse: exits 1.
    Regressed,
    Improved,
    /// Different, but neither better nor worse (to or from `skipped`).
    Changed,
    /// A figure left its old range, but by too little to judge.
    Moved,
    /// A figure within its spread.
    Steady,
    New,
    Removed,
}

impl Change {
    pub fn name(self) -> &'static str {
        match self {
            Change::Regressed => "regressed",
            Change::Improved => "improved",
            Change::Changed => "changed",
            Change::Moved => "moved",
            Change::Steady => "steady",
            Change::New => "new",
            Change::Removed => "removed",
        }
    }
}

/// One run, as the comparison shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    pub path: PathBuf,
    pub status: String,
    pub command: String,
    pub lane: String,
    pub cluster: String,
    pub started: String,
    /// The accelerator the guests ran under (`kvm`, `tcg`).
    pub accel: Option<String>,
    /// `<provider> <id>`.
    pub image: Option<String>,
    /// `cold`, or `warm (<snapshot>)`.
    pub boot: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckChange {
    pub id: String,
    pub layer: String,
    pub old: Option<String>,
    pub new: Option<String>,
    pub change: Change,
    /// The newer run's message (the older one's for a removed check).
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct FigureChange {
    pub check: String,
    pub figure: String,
    pub label: String,
    pub unit: String,
    pub higher_is_better: bool,
    pub old: Option<Stats>,
    pub new: Option<Stats>,
    /// (new median - old median) / old median; absent when not defined.
    pub median_change: Option<f64>,
    pub change: Change,
}

/// A duration in both runs (absent where a run did not have it).
#[derive(Debug, Clone, Serialize)]
pub struct Time {
    pub name: String,
    pub old_s: Option<f64>,
    pub new_s: Option<f64>,
}

/// `compare --json`.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub schema: &'static str,
    pub old: Side,
    pub new: Side,
    /// Checks whose outcome changed, new and removed ones (not the same ones).
    pub checks: Vec<CheckChange>,
    /// Every figure of either run, `steady` ones included.
    pub figures: Vec<FigureChange>,
    pub times: Vec<Time>,
    /// Why the newer run itself regressed: it ended early (error, timeout,
    /// interrupted) where the older one did not. Its checks are then
    /// mostly `removed`, which alone would not fail the comparison.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_regressed: Option<String>,
    /// Checks and figures that `regressed`, and the run itself.
    pub regressions: usize,
    /// No check or figure changed, and accel, image and boot mode agree.
    pub nothing_changed: bool,
    pub exit_code: u8,
}

/// Reads a run: an artifact root holding result.json, or the file itself.
/// Anything else is bad input naming the path.
pub fn load(path: &Path) -> Result<(PathBuf, RunReport)> {
    let file = if path.is_dir() {
        path.join("result.json")
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&file).map_err(|e| {
        bad_input(format!(
            "{}: {e}; `compare` needs an artifact root of a run or its result.json",
            file.display()
        ))
    })?;
    let report = serde_json::from_str(&text).map_err(|e| {
        bad_input(format!(
            "{}:{}:{}: not a result.json this driver reads: {e}",
            file.display(),
            e.line(),
            e.column()
        ))
    })?;
    Ok((file, report))
}

/// Loads both runs and compares them.
pub fn compare_paths(old: &Path, new: &Path) -> Result<Comparison> {
    let (old_path, old) = load(old)?;
    let (new_path, new) = load(new)?;
    Ok(compare(&old_path, &old, &new_path, &new))
}

pub fn compare(old_path: &Path, old: &RunReport, new_path: &Path, new: &RunReport) -> Comparison {
    let (old_side, new_side) = (side(old_path, old), side(new_path, new));
    let checks = check_changes(old, new);
    let figures = figure_changes(old, new);
    let run_regressed = ended_early(new)
        .filter(|_| ended_early(old).is_none())
        .map(String::from);
    let regressions = usize::from(run_regressed.is_some())
        + checks
            .iter()
            .map(|c| c.change)
            .chain(figures.iter().map(|f| f.change))
            .filter(|c| *c == Change::Regressed)
            .count();
    let same_setup = (&old_side.accel, &old_side.image, &old_side.boot)
        == (&new_side.accel, &new_side.image, &new_side.boot);
    let nothing_changed =
        checks.is_empty() && figures.iter().all(|f| f.change == Change::Steady) && same_setup;
    Comparison {
        schema: SCHEMA,
        old: old_side,
        new: new_side,
        checks,
        figures,
        times: times(old, new),
        run_regressed,
        regressions,
        nothing_changed,
        exit_code: if regressions > 0 {
            EXIT_CHECK_FAILED
        } else {
            EXIT_PASS
        },
    }
}

/// The run's error, when it ended before its lane finished.
fn ended_early(r: &RunReport) -> Option<&str> {
    use crate::error::RunStatus::{Error, Interrupted, Timeout};
    matches!(r.status, Error | Timeout | Interrupted)
        .then(|| r.error.as_deref().unwrap_or(r.status.name()))
}

fn side(path: &Path, r: &RunReport) -> Side {
    Side {
        path: path.to_path_buf(),
        status: r.status.name().into(),
        command: r.command.clone(),
        lane: r.lane.clone(),
        cluster: r.cluster.clone(),
        started: r.started.clone(),
        accel: r.accel.as_ref().map(|a| a.used.name().to_string()),
        image: r.image.as_ref().map(|i| format!("{} {}", i.provider, i.id)),
        boot: r.boot.as_ref().map(|b| match &b.snapshot {
            Some(s) => format!("{} ({s})", b.mode),
            None => b.mode.clone(),
        }),
    }
}

/// Where a check stands on the better/worse scale; None for `skipped`
/// (and for an outcome this driver does not rank). By name, so that an
/// outcome added later compiles here and is merely `changed`.
fn rank(outcome: &str) -> Option<u8> {
    match outcome {
        "pass" => Some(0),
        // A pass that needed a rerun is weaker than a plain one.
        "degraded" | "flaky" => Some(1),
        "fail" => Some(2),
        _ => None,
    }
}

/// The change of one check's outcome; None when it stayed the same.
fn outcome_change(old: Option<&str>, new: Option<&str>) -> Option<Change> {
    Some(match (old, new) {
        (None, None) => return None,
        (None, Some(_)) => Change::New,
        (Some(_), None) => Change::Removed,
        (Some(o), Some(n)) if o == n => return None,
        (Some(o), Some(n)) => match (rank(o), rank(n)) {
            (Some(a), Some(b)) if b > a => Change::Regressed,
            (Some(a), Some(b)) if b < a => Change::Improved,
            _ => Change::Changed,
        },
    })
}

/// Every check of a run by id, with its layer (ids are unique in a lane).
fn checks_by_id(r: &RunReport) -> BTreeMap<&str, (&str, &crate::engine::CheckResult)> {
    r.layers
        .iter()
        .flat_map(|l| {
            l.checks
                .iter()
                .map(move |c| (c.id.as_str(), (l.name.as_str(), c)))
        })
        .collect()
}

/// Checks whose outcome changed, in the newer run's order, removed ones last.
fn check_changes(old: &RunReport, new: &RunReport) -> Vec<CheckChange> {
    let before = checks_by_id(old);
    let after = checks_by_id(new);
    let in_new = new
        .layers
        .iter()
        .flat_map(|l| &l.checks)
        .map(|c| c.id.as_str());
    let only_old = old
        .layers
        .iter()
        .flat_map(|l| &l.checks)
        .map(|c| c.id.as_str())
        .filter(|id| !after.contains_key(id));
    let mut out = Vec::new();
    for id in in_new.chain(only_old) {
        let (o, n) = (before.get(id), after.get(id));
        let name = |c: Option<&(&str, &crate::engine::CheckResult)>| c.map(|c| c.1.outcome.name());
        let Some(change) = outcome_change(name(o), name(n)) else {
            continue;
        };
        let (layer, shown) = n.or(o).expect("in one run at least");
        out.push(CheckChange {
            id: id.to_string(),
            layer: layer.to_string(),
            old: name(o).map(String::from),
            new: name(n).map(String::from),
            change,
            message: shown.message.clone(),
        });
    }
    out
}

/// Every figure of a run, keyed by (check id, figure name).
fn figures_of(r: &RunReport) -> BTreeMap<(String, String), Figure> {
    r.layers
        .iter()
        .flat_map(|l| &l.checks)
        .flat_map(|c| {
            figures::from_evidence(&c.evidence)
                .into_iter()
                .map(|f| ((c.id.clone(), f.name.clone()), f))
        })
        .collect()
}

fn figure_changes(old: &RunReport, new: &RunReport) -> Vec<FigureChange> {
    let (mut before, after) = (figures_of(old), figures_of(new));
    let mut out = Vec::new();
    for ((check, name), f) in after {
        let o = before.remove(&(check.clone(), name.clone()));
        let change = match &o {
            Some(o) => judge(&o.subject, &f.subject, f.higher_is_better),
            None => Change::New,
        };
        let median_change = o
            .as_ref()
            .and_then(|o| relative(o.subject.median, f.subject.median));
        out.push(FigureChange {
            check,
            figure: name,
            label: f.label,
            unit: f.unit,
            higher_is_better: f.higher_is_better,
            old: o.map(|o| o.subject),
            new: Some(f.subject),
            median_change,
            change,
        });
    }
    // What is left was only in the older run.
    for ((check, name), f) in before {
        out.push(FigureChange {
            check,
            figure: name,
            label: f.label,
            unit: f.unit,
            higher_is_better: f.higher_is_better,
            old: Some(f.subject),
            new: None,
            median_change: None,
            change: Change::Removed,
        });
    }
    out
}

/// (new - old) / old; None when the old value is 0 (no scale to go by).
fn relative(old: f64, new: f64) -> Option<f64> {
    (old != 0.0).then(|| (new - old) / old.abs())
}

/// Whether a figure left its measured spread, and which way (module docs).
fn judge(old: &Stats, new: &Stats, higher_is_better: bool) -> Change {
    let (below, above) = (new.max < old.min, new.min > old.max);
    if !below && !above {
        return Change::Steady;
    }
    let worse = if higher_is_better { below } else { above };
    let zero_width = old.min == old.max || new.min == new.max;
    // A zero-width range overlaps nothing: without a spread, only a large
    // move is believed. A zero old median is no scale either: it counts.
    let large = relative(old.median, new.median).is_none_or(|r| r.abs() > ZERO_WIDTH_THRESHOLD);
    match (zero_width && !large, worse) {
        (true, _) => Change::Moved,
        (false, true) => Change::Regressed,
        (false, false) => Change::Improved,
    }
}

/// The run, boot-to-ready (slowest node), each fresh-* step, and the
/// lane's layers together: reported side by side.
fn times(old: &RunReport, new: &RunReport) -> Vec<Time> {
    let row = |name: &str, f: &dyn Fn(&RunReport) -> Option<f64>| Time {
        name: name.into(),
        old_s: f(old),
        new_s: f(new),
    };
    let mut out = vec![
        row("run", &|r| Some(r.duration_s)),
        row("boot to ready (slowest node)", &|r| {
            r.nodes
                .values()
                .filter_map(|n| n.ready_after_s)
                .reduce(f64::max)
        }),
        row("lane (its layers)", &|r| {
            (!r.layers.is_empty()).then(|| r.layers.iter().map(|l| l.duration_s).sum())
        }),
    ];
    let mut steps: Vec<&str> = new.steps.iter().map(|s| s.name.as_str()).collect();
    for s in &old.steps {
        if !steps.contains(&s.name.as_str()) {
            steps.push(&s.name);
        }
    }
    for step in steps {
        let dur = |r: &RunReport| {
            r.steps
                .iter()
                .find(|s| s.name == step)
                .map(|s| s.duration_s)
        };
        out.push(row(&format!("step {step}"), &dur));
    }
    out
}

/// The comparison for a person, worst first.
pub fn render(c: &Comparison) -> String {
    let mut out = String::new();
    runs_text(&mut out, c);
    times_text(&mut out, &c.times);
    checks_text(&mut out, &c.checks);
    figures_text(&mut out, &c.figures);
    if let Some(why) = &c.run_regressed {
        let _ = writeln!(out, "\nrun regressed: it ended early: {}", first_line(why));
    }
    let _ = writeln!(out);
    let verdict = if c.nothing_changed {
        "nothing changed".to_string()
    } else if c.regressions == 0 {
        "no regression".to_string()
    } else {
        let checks = c.checks.iter().filter(|x| x.change == Change::Regressed);
        let figures = c.figures.iter().filter(|x| x.change == Change::Regressed);
        let run = if c.run_regressed.is_some() {
            "the run, "
        } else {
            ""
        };
        format!(
            "{} ({run}{}, {})",
            count(c.regressions, "regression", "regressions"),
            count(checks.count(), "check", "checks"),
            count(figures.count(), "figure", "figures")
        )
    };
    let _ = writeln!(out, "{verdict}");
    out
}

fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn runs_text(out: &mut String, c: &Comparison) {
    for (tag, s) in [("old", &c.old), ("new", &c.new)] {
        let _ = writeln!(out, "{tag}  {}", s.path.display());
        let _ = writeln!(
            out,
            "     {} {} on {}, {}, started {}; accel {}, image {}, boot {}",
            s.command,
            s.lane,
            s.cluster,
            s.status,
            s.started,
            s.accel.as_deref().unwrap_or("-"),
            s.image.as_deref().unwrap_or("-"),
            s.boot.as_deref().unwrap_or("-"),
        );
    }
    for (what, o, n) in [
        ("accel", &c.old.accel, &c.new.accel),
        ("image", &c.old.image, &c.new.image),
        ("boot", &c.old.boot, &c.new.boot),
    ] {
        if o != n {
            let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
            let _ = writeln!(out, "note: {what} differs: {} -> {}", show(o), show(n));
        }
    }
}

fn times_text(out: &mut String, times: &[Time]) {
    let _ = writeln!(out, "\ntimes (reported, not judged)");
    let secs = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} s"));
    for t in times {
        let delta = match (t.old_s, t.new_s) {
            (Some(o), Some(n)) => {
                relative(o, n).map_or(String::new(), |r| format!("  ({:+.0}%)", r * 100.0))
            }
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "  {:<30} {:>10} -> {:>10}{delta}",
            t.name,
            secs(t.old_s),
            secs(t.new_s)
        );
    }
}

fn checks_text(out: &mut String, checks: &[CheckChange]) {
    if checks.is_empty() {
        let _ = writeln!(out, "\nchecks: every check has the same outcome");
        return;
    }
    let _ = writeln!(out, "\nchecks");
    let sorted = worst_first(checks, |c| c.change);
    // A failed layer skips every later check: one line per layer and
    // transition for those, not one per check.
    for group in sorted.chunk_by(|a, b| {
        a.change == Change::Changed && (&a.layer, &a.old, &a.new) == (&b.layer, &b.old, &b.new)
    }) {
        let c = group[0];
        let o = c.old.as_deref().unwrap_or("-");
        let n = c.new.as_deref().unwrap_or("-");
        let line = if group.len() > 1 {
            let ids: Vec<&str> = group.iter().map(|c| c.id.as_str()).collect();
            let what = count(group.len(), "check", "checks");
            format!("{what} ({}): {o} -> {n}: {}", c.layer, ids.join(", "))
        } else {
            format!(
                "{} ({}): {o} -> {n}: {}",
                c.id,
                c.layer,
                first_line(&c.message)
            )
        };
        let _ = writeln!(out, "  {:<10} {line}", c.change.name());
    }
}

fn figures_text(out: &mut String, figures: &[FigureChange]) {
    if figures.is_empty() {
        return;
    }
    let steady = figures
        .iter()
        .filter(|f| f.change == Change::Steady)
        .count();
    let _ = writeln!(
        out,
        "\nfigures ({} within their spread)",
        count(steady, "figure", "figures")
    );
    for f in worst_first(figures, |f| f.change) {
        if f.change == Change::Steady {
            continue;
        }
        let range = |s: &Option<Stats>| {
            s.as_ref().map_or("-".to_string(), |s| {
                format!(
                    "{}..{} (median {}, {} runs)",
                    num(s.min),
                    num(s.max),
                    num(s.median),
                    s.runs.len()
                )
            })
        };
        let moved = f
            .median_change
            .map_or(String::new(), |r| format!(", median {:+.0}%", r * 100.0));
        let better = if f.higher_is_better {
            "higher"
        } else {
            "lower"
        };
        let _ = writeln!(
            out,
            "  {:<10} {} {} ({}; {}, {better} is better): {} -> {}{moved}",
            f.change.name(),
            f.check,
            f.figure,
            f.label,
            f.unit,
            range(&f.old),
            range(&f.new),
        );
    }
}

/// Regressions first, then the rest in the order given.
fn worst_first<T>(items: &[T], change: impl Fn(&T) -> Change) -> Vec<&T> {
    let order = |c: Change| match c {
        Change::Regressed => 0,
        Change::Moved => 1,
        Change::Removed => 2,
        Change::New => 3,
        Change::Improved => 4,
        Change::Changed => 5,
        Change::Steady => 6,
    };
    let mut v: Vec<&T> = items.iter().collect();
    v.sort_by_key(|t| order(change(t)));
    v
}

fn num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(runs: &[f64]) -> Stats {
        Stats::of(runs.to_vec()).unwrap()
    }

    #[test]
    fn outcomes_rank_pass_degraded_fail_and_skipped_is_off_the_scale() {
        use Change::*;
        let c = |o, n| outcome_change(o, n);
        assert_eq!(c(Some("pass"), Some("fail")), Some(Regressed));
        assert_eq!(c(Some("pass"), Some("degraded")), Some(Regressed));
        assert_eq!(c(Some("fail"), Some("pass")), Some(Improved));
        assert_eq!(c(Some("degraded"), Some("pass")), Some(Improved));
        assert_eq!(c(Some("pass"), Some("skipped")), Some(Changed));
        assert_eq!(c(Some("skipped"), Some("fail")), Some(Changed));
        assert_eq!(c(None, Some("pass")), Some(New));
        assert_eq!(c(Some("fail"), None), Some(Removed));
        assert_eq!(c(Some("pass"), Some("pass")), None);
    }

    #[test]
    fn a_figure_regresses_only_when_its_range_leaves_the_old_one_the_worse_way() {
        let old = stats(&[10.0, 11.0, 12.0]);
        // Overlapping ranges: within the spread, whatever the medians say.
        assert_eq!(judge(&old, &stats(&[8.0, 9.0, 10.5]), true), Change::Steady);
        // Wholly below: worse for throughput, better for a latency.
        let below = stats(&[7.0, 8.0, 9.0]);
        assert_eq!(judge(&old, &below, true), Change::Regressed);
        assert_eq!(judge(&old, &below, false), Change::Improved);
        let above = stats(&[12.5, 13.0]);
        assert_eq!(judge(&old, &above, false), Change::Regressed);
        assert_eq!(judge(&old, &above, true), Change::Improved);
    }

    #[test]
    fn a_zero_width_range_needs_a_move_beyond_the_threshold() {
        let one = stats(&[100.0]);
        assert_eq!(judge(&one, &stats(&[100.0]), true), Change::Steady);
        assert_eq!(judge(&one, &stats(&[90.0]), true), Change::Moved, "10%");
        assert_eq!(judge(&one, &stats(&[79.0]), true), Change::Regressed);
        assert_eq!(judge(&one, &stats(&[121.0]), true), Change::Improved);
        assert_eq!(judge(&one, &stats(&[121.0]), false), Change::Regressed);
        // One side with a spread, the other a single run: still no spread.
        let spread = stats(&[95.0, 100.0, 105.0]);
        assert_eq!(judge(&spread, &stats(&[90.0]), true), Change::Moved);
        assert_eq!(judge(&spread, &stats(&[70.0]), true), Change::Regressed);
        // From zero there is no scale: any move out of it counts.
        assert_eq!(
            judge(&stats(&[0.0]), &stats(&[1.0]), false),
            Change::Regressed
        );
    }

    fn fixture(name: &str) -> RunReport {
        let path = format!(
            "{}/tests/fixtures/runs/{name}/result.json",
            env!("CARGO_MANIFEST_DIR")
        );
        load(Path::new(&path)).unwrap().1
    }

    #[test]
    fn a_run_compared_with_itself_has_nothing_changed() {
        let r = fixture("passing");
        let c = compare(Path::new("a"), &r, Path::new("a"), &r);
        assert!(c.nothing_changed && c.checks.is_empty(), "{c:?}");
        assert_eq!((c.regressions, c.exit_code), (0, EXIT_PASS));
        assert!(c.figures.iter().all(|f| f.change == Change::Steady));
        assert!(render(&c).ends_with("nothing changed\n"), "{}", render(&c));
    }

    #[test]
    fn the_regressed_fixture_names_its_check_and_figure() {
        let (old, new) = (fixture("passing"), fixture("regressed"));
        let c = compare(Path::new("old"), &old, Path::new("new"), &new);
        assert_eq!((c.regressions, c.exit_code), (2, EXIT_CHECK_FAILED));
        let check = &c.checks[0];
        assert_eq!(
            (check.id.as_str(), check.change),
            ("units@node03", Change::Regressed)
        );
        let fig: Vec<_> = c
            .figures
            .iter()
            .filter(|f| f.change != Change::Steady)
            .collect();
        assert_eq!(fig.len(), 1, "large_get moved within its spread: {fig:?}");
        assert_eq!(fig[0].figure, "large_put");
        assert!(fig[0].median_change.unwrap() < -0.4);
        // Reversed, both are improvements and nothing regressed.
        let back = compare(Path::new("new"), &new, Path::new("old"), &old);
        assert_eq!(back.exit_code, EXIT_PASS);
        assert!(!back.nothing_changed);
        assert!(render(&back).contains("improved   units@node03"));
    }

    #[test]
    fn new_and_removed_checks_and_figures_and_a_different_accel() {
        let old = fixture("passing");
        let mut new = old.clone();
        let bench = new.layers.iter_mut().find(|l| l.name == "bench").unwrap();
        bench.checks[0].id = "s3-throughput@node05".into();
        if let Some(a) = new.accel.as_mut() {
            a.used = crate::machine::Accel::Kvm;
        }
        let c = compare(Path::new("o"), &old, Path::new("n"), &new);
        let changes: Vec<_> = c.checks.iter().map(|c| (c.id.as_str(), c.change)).collect();
        assert_eq!(
            changes,
            [
                ("s3-throughput@node05", Change::New),
                ("s3-throughput@node06", Change::Removed)
            ]
        );
        assert!(c.figures.iter().any(|f| f.change == Change::New));
        assert!(c.figures.iter().any(|f| f.change == Change::Removed));
        assert_eq!(
            c.exit_code, EXIT_PASS,
            "new and removed are not regressions"
        );
        assert!(
            render(&c).contains("note: accel differs: tcg -> kvm"),
            "{}",
            render(&c)
        );
    }

    #[test]
    fn a_run_that_ended_early_is_a_regression_even_with_no_check_left() {
        let old = fixture("passing");
        let mut new = old.clone();
        new.layers.clear();
        new.status = crate::error::RunStatus::Error;
        new.error = Some("node03 did not boot: kernel panic".into());
        let c = compare(Path::new("o"), &old, Path::new("n"), &new);
        assert!(c.checks.iter().all(|c| c.change == Change::Removed));
        assert_eq!((c.regressions, c.exit_code), (1, EXIT_CHECK_FAILED));
        let text = render(&c);
        assert!(
            text.contains("run regressed: it ended early: node03 did not boot"),
            "{text}"
        );
        assert!(
            text.contains("1 regression (the run, 0 checks, 0 figures)"),
            "{text}"
        );
        // Both ended early: nothing new about the run.
        let c = compare(Path::new("n"), &new, Path::new("n"), &new);
        assert_eq!((c.regressions, c.exit_code), (0, EXIT_PASS));
    }
}
