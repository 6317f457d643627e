//! `report.md`: the verdict, the per-layer table, every check that did not
//! pass with its evidence, the log findings quoted, and the boot timeline
//! as a text chart.

use super::RunReport;
use crate::check::Outcome;
use std::fmt::Write;

pub fn render(r: &RunReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# {} on {}: {}\n",
        r.lane,
        r.cluster,
        r.status.name().to_uppercase()
    );
    let _ = writeln!(s, "- command: `{}`, exit code {}", r.command, r.exit_code);
    let _ = writeln!(
        s,
        "- started {}, finished {} ({:.0} s)",
        r.started, r.finished, r.duration_s
    );
    if let Some(a) = &r.accel {
        let _ = writeln!(s, "- accel: {}", a.summary());
    }
    if let Some(i) = &r.image {
        let _ = writeln!(s, "- image: {} {}", i.provider, i.id);
    }
    let _ = writeln!(
        s,
        "- lane: {}; cluster: {}",
        r.lane_source, r.cluster_source
    );
    if let Some(e) = &r.error {
        let _ = writeln!(s, "\n**Infrastructure error:** {e}");
    }
    if !r.steps.is_empty() {
        let _ = writeln!(
            s,
            "\n## Steps\n\n| step | outcome | time | note |\n|---|---|---|---|"
        );
        for st in &r.steps {
            let _ = writeln!(
                s,
                "| {} | {} | {:.1} s | {} |",
                st.name,
                st.outcome.name(),
                st.duration_s,
                cell(&st.message)
            );
        }
    }
    let _ = writeln!(
        s,
        "\n## Layers\n\n| layer | outcome | checks | time |\n|---|---|---|---|"
    );
    for l in &r.layers {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.1} s |",
            l.name,
            l.outcome.name(),
            l.checks.len(),
            l.duration_s
        );
    }
    let _ = writeln!(
        s,
        "\n## Checks\n\n| check | layer | outcome | time | message |\n|---|---|---|---|---|"
    );
    for l in &r.layers {
        for c in &l.checks {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.1} s | {} |",
                c.id,
                l.name,
                c.outcome.name(),
                c.duration_s,
                cell(&c.message)
            );
        }
    }
    let notable: Vec<_> = r
        .layers
        .iter()
        .flat_map(|l| &l.checks)
        .filter(|c| {
            matches!(
                c.outcome,
                Outcome::Fail | Outcome::Degraded | Outcome::Flaky
            )
        })
        .collect();
    if !notable.is_empty() {
        let _ = writeln!(s, "\n## Evidence of checks that did not pass\n");
        for c in notable {
            let _ = writeln!(
                s,
                "### {} ({}, {})\n\n{}\n",
                c.id,
                c.outcome.name(),
                c.origin,
                c.message
            );
            let ev = serde_json::to_string_pretty(&c.evidence).unwrap_or_default();
            let _ = writeln!(s, "```json\n{ev}\n```\n");
        }
    }
    if !r.findings.is_empty() {
        let _ = writeln!(s, "\n## Log findings\n");
        for f in &r.findings {
            let _ = writeln!(
                s,
                "- **{}** on {} at `{}:{}`\n\n```\n{}\n```\n",
                f.what, f.node, f.file, f.line, f.excerpt
            );
        }
    }
    timeline(&mut s, r);
    s
}

/// Boot-to-ready per node as bars, so a slow node stands out.
fn timeline(s: &mut String, r: &RunReport) {
    let ready: Vec<(&String, f64)> = r
        .nodes
        .iter()
        .filter_map(|(n, x)| x.ready_after_s.map(|t| (n, t)))
        .collect();
    let Some(max) = ready.iter().map(|(_, t)| *t).reduce(f64::max) else {
        return;
    };
    let _ = writeln!(s, "\n## Boot to ready\n\n```");
    for (node, t) in ready {
        let width = ((t / max.max(1.0)) * 50.0).round() as usize;
        let _ = writeln!(s, "{node:<16} {} {t:.0} s", "#".repeat(width.max(1)));
    }
    let _ = writeln!(s, "```");
}

/// Keeps a table cell on one line.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}
