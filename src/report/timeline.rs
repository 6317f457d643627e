//! The run's timeline as an SVG picture, for report.html: one row per node
//! with its boot phases (QEMU launched, kernel, sshd, dependencies, units,
//! ready), then one row per layer with its checks as bars, so a person sees
//! at a glance what was slow and what failed. A check's parts (a script's
//! subtests) get a row of their own under their layer's: drawn over their
//! check they would hide each other. The two panels have their own time
//! axes: boot counts from the first QEMU launch, the lane from its start.

use super::RunReport;
use crate::check::Outcome;
use crate::engine::{CheckResult, LayerResult};
use svg::Document;
use svg::node::element::{Group, Line, Rectangle, Text, Title};

const WIDTH: f64 = 1000.0;
const LABEL: f64 = 150.0;
const ROW: f64 = 24.0;
const BAR: f64 = 16.0;

/// Boot phases in order: (name shown in the legend, CSS class).
pub const PHASES: [(&str, &str); 5] = [
    ("QEMU launched, until the kernel banner", "ph-launch"),
    ("kernel and init, until sshd answers", "ph-kernel"),
    ("waiting for its dependencies", "ph-deps"),
    ("its units starting, until ready", "ph-units"),
    ("launched until ready (phases not recorded)", "ph-whole"),
];

/// A node's name, its phases as (from, to, index in PHASES), and its ready time.
type NodeRow<'a> = (&'a String, Vec<(f64, f64, usize)>, Option<f64>);

/// The picture, or `None` when the run has neither boot phases nor checks.
pub fn render(r: &RunReport) -> Option<String> {
    let boot: Vec<NodeRow> = r
        .nodes
        .iter()
        .filter_map(|(name, n)| {
            let Some(p) = n.phases.as_ref() else {
                // A run of an older driver: its node ready times only.
                let ready = n.ready_after_s?;
                return Some((name, vec![(0.0, ready, 4)], Some(ready)));
            };
            // Each phase runs from its mark to the next mark seen (a restored
            // guest has no kernel banner: its first phase runs until sshd).
            let marks = [
                Some(p.launched_s),
                p.kernel_s,
                p.sshd_s,
                p.units_s,
                p.ready_s,
            ];
            let mut spans = Vec::new();
            for i in 0..4 {
                if let (Some(from), Some(to)) = (marks[i], marks[i + 1..].iter().flatten().next()) {
                    spans.push((from, *to, i));
                }
            }
            Some((name, spans, p.ready_s))
        })
        .collect();
    let layers: Vec<_> = r.layers.iter().filter(|l| !l.checks.is_empty()).collect();
    if boot.is_empty() && layers.is_empty() {
        return None;
    }
    let mut doc = Group::new();
    let mut y = 0.0;
    if !boot.is_empty() {
        let end = boot
            .iter()
            .flat_map(|(_, s, ready)| s.iter().map(|x| x.1).chain(*ready))
            .fold(1.0, f64::max);
        let (axis, h) = panel(
            "boot: seconds from the first QEMU launch",
            end,
            y,
            boot.len(),
        );
        doc = doc.add(axis);
        y += 2.0 * ROW;
        for (name, spans, ready) in &boot {
            let mut row = Group::new()
                .set("class", "node-row")
                .set("data-node", name.as_str());
            row = row.add(label(name, y));
            for (from, to, i) in spans {
                let title = format!("{name}: {} {:.1}-{:.1} s", PHASES[*i].0, from, to);
                row = row.add(bar(*from, *to, end, y, PHASES[*i].1, &title));
            }
            let tail = match ready {
                Some(t) => format!("ready {t:.0} s"),
                None => "not ready".into(),
            };
            let x = ready.map(|t| scale(t, end)).unwrap_or(LABEL) + 4.0;
            row = row.add(note(&tail, x.min(WIDTH - 70.0), y));
            doc = doc.add(row);
            y += ROW;
        }
        y = h + ROW;
    }
    if !layers.is_empty() {
        let end = layers
            .iter()
            .flat_map(|l| &l.checks)
            .map(|c| c.started_s + c.duration_s)
            .fold(1.0, f64::max);
        let rows: usize = layers.iter().map(|l| 1 + part_groups(l).len()).sum();
        let (axis, _) = panel("lane: seconds from its start", end, y, rows);
        doc = doc.add(axis);
        y += 2.0 * ROW;
        for l in layers {
            let own: Vec<_> = l.checks.iter().filter(|c| c.part_of.is_none()).collect();
            let row = Group::new()
                .set("class", format!("layer-row {}", l.outcome.name()))
                .set("data-layer", l.name.replace('"', "'"))
                .add(label(&l.name, y));
            doc = doc.add(check_bars(row, own, end, y));
            y += ROW;
            for (check, parts) in part_groups(l) {
                let row = Group::new()
                    .set("class", "part-row")
                    .set("data-check", check.replace('"', "'"))
                    .add(label(&format!("\u{21b3} {}", short(check, 20)), y));
                doc = doc.add(check_bars(row, parts, end, y));
                y += ROW;
            }
        }
    }
    let height = y + 6.0;
    let svg = Document::new()
        .set("id", "timeline-svg")
        .set("viewBox", (0, 0, WIDTH, height))
        .set("width", "100%")
        .set("role", "img")
        .add(Title::new(format!(
            "timeline of {} on {}",
            r.lane, r.cluster
        )))
        .add(doc);
    Some(svg.to_string())
}

/// The layer's parts, by the check they belong to, in lane order.
fn part_groups(l: &LayerResult) -> Vec<(&str, Vec<&CheckResult>)> {
    let mut groups: Vec<(&str, Vec<&CheckResult>)> = Vec::new();
    for c in &l.checks {
        let Some(of) = c.part_of.as_deref() else {
            continue;
        };
        match groups.iter_mut().find(|g| g.0 == of) {
            Some(g) => g.1.push(c),
            None => groups.push((of, vec![c])),
        }
    }
    groups
}

/// `checks` as bars on `row`, with a note of how many failed.
fn check_bars(mut row: Group, mut checks: Vec<&CheckResult>, end: f64, y: f64) -> Group {
    // Failures drawn last, so that parallel checks never hide them.
    checks.sort_by_key(|c| c.outcome == Outcome::Fail);
    for c in &checks {
        let title = format!(
            "{} ({}): {} in {:.1} s at {:.1} s; {}",
            c.id,
            c.kind,
            c.outcome.name(),
            c.duration_s,
            c.started_s,
            c.message
        );
        let class = format!("check-bar {}", c.outcome.name());
        let to = c.started_s + c.duration_s;
        row = row.add(bar(c.started_s, to, end, y, &class, &title));
    }
    let failed = checks.iter().filter(|c| c.outcome == Outcome::Fail).count();
    if failed > 0 {
        row = row.add(note(&format!("{failed} failed"), WIDTH - 70.0, y));
    }
    row
}

/// At most `n` characters: a row's label has a fixed width.
fn short(text: &str, n: usize) -> String {
    if text.chars().count() <= n {
        return text.to_string();
    }
    let cut: String = text.chars().take(n - 1).collect();
    format!("{cut}\u{2026}")
}

/// A panel's heading and its time axis with ticks; returns it and the
/// y where its last row ends.
fn panel(heading: &str, end: f64, y: f64, rows: usize) -> (Group, f64) {
    let bottom = y + 2.0 * ROW + rows as f64 * ROW;
    let mut g = Group::new().set("class", "axis").add(
        Text::new(heading)
            .set("x", 0)
            .set("y", y + 14.0)
            .set("class", "panel-title"),
    );
    let step = tick_step(end);
    let mut t = 0.0;
    while t <= end + 1e-9 {
        let x = scale(t, end);
        g = g
            .add(
                Line::new()
                    .set("x1", x)
                    .set("x2", x)
                    .set("y1", y + ROW + 6.0)
                    .set("y2", bottom)
                    .set("class", "tick"),
            )
            .add(
                Text::new(format!("{t:.0}"))
                    .set("x", x)
                    .set("y", y + ROW + 2.0)
                    .set("class", "tick-label"),
            );
        t += step;
    }
    (g, bottom)
}

/// A tick every 1, 2 or 5 times a power of ten, about eight across.
fn tick_step(end: f64) -> f64 {
    let raw = end / 8.0;
    let pow = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * pow)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * pow)
        .max(0.001)
}

fn scale(t: f64, end: f64) -> f64 {
    LABEL + (t / end).clamp(0.0, 1.0) * (WIDTH - LABEL - 80.0)
}

fn label(text: &str, y: f64) -> Text {
    Text::new(text)
        .set("x", 0)
        .set("y", y + BAR - 3.0)
        .set("class", "row-label")
}

fn note(text: &str, x: f64, y: f64) -> Text {
    Text::new(text)
        .set("x", x)
        .set("y", y + BAR - 3.0)
        .set("class", "row-note")
}

/// A bar from `from` to `to` seconds, at least 2 units wide so a short
/// check is still seen, with its description as a hover title.
fn bar(from: f64, to: f64, end: f64, y: f64, class: &str, title: &str) -> Rectangle {
    let x = scale(from, end);
    let w = (scale(to, end) - x).max(2.0);
    Rectangle::new()
        .set("x", x)
        .set("y", y)
        .set("width", w)
        .set("height", BAR)
        .set("class", class)
        .add(Title::new(title))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_get_a_row_under_their_layer_with_a_bar_each() {
        let svg = render(&super::super::tests::with_subtests()).unwrap();
        let row = |class: &str| {
            let from = svg.find(&format!("<g class=\"{class}")).expect(class);
            let to = from + svg[from..].find("</g>").unwrap();
            svg[from..to].to_string()
        };
        let layer = row("layer-row");
        assert_eq!(layer.matches("<rect").count(), 2, "s and other: {layer}");
        let parts = row("part-row");
        assert!(parts.contains("data-check=\"s\""), "{parts}");
        assert_eq!(parts.matches("<rect").count(), 2, "{parts}");
        assert!(
            parts.contains("s/breaks (subtest): fail in 2.0 s at 3.0 s"),
            "{parts}"
        );
        assert!(parts.contains("1 failed"), "{parts}");
        assert!(svg.find("layer-row").unwrap() < svg.find("part-row").unwrap());
    }

    #[test]
    fn long_labels_are_cut() {
        assert_eq!(short("scenario", 20), "scenario");
        assert_eq!(short("abcdefghij", 5), "abcd\u{2026}");
    }

    #[test]
    fn ticks_are_round_numbers() {
        assert_eq!(tick_step(8.0), 1.0);
        assert_eq!(tick_step(100.0), 20.0);
        assert_eq!(tick_step(250.0), 50.0);
        assert_eq!(tick_step(0.5), 0.1);
    }
}
