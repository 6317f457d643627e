//! `report.html`: one self-contained page (no network, no scripts, no
//! fonts) for a person looking at a run. The verdict first, then what
//! failed with its evidence, the log excerpts of its node and its origin
//! (`file:line`), then the timeline picture, every check, and links to
//! every file of the artifact tree. It reads well at 1280 px and on a phone.

use super::{RunReport, timeline};
use crate::check::Outcome;
use crate::engine::CheckResult;
use html_escape::{encode_double_quoted_attribute as attr, encode_text as text};
use std::fmt::Write;
use std::path::Path;

const STYLE: &str = include_str!("report.css");

/// The page; `dir` is the artifact root, whose files are linked.
pub fn render(r: &RunReport, dir: &Path) -> String {
    let verdict = r.status.name();
    let mut s = String::new();
    let title = format!("{} on {}: {}", r.lane, r.cluster, verdict.to_uppercase());
    let _ = write!(
        s,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>{STYLE}</style></head><body>\n",
        text(&title)
    );
    verdict_section(&mut s, r, &title);
    rerun_section(&mut s, r);
    failures(&mut s, r);
    s.push_str("<section id=\"timeline\"><h2>Timeline</h2>");
    match timeline::render(r) {
        Some(svg) => {
            let _ = write!(s, "<div class=\"scroll\">{svg}</div>");
            legend(&mut s, r);
        }
        None => s.push_str("<p>Nothing ran long enough to draw.</p>"),
    }
    s.push_str("</section>\n");
    checks(&mut s, r);
    artifacts(&mut s, r, dir);
    let _ = write!(
        s,
        "<footer>{} · started {} · finished {} · lane {} · cluster {}</footer>\n</body></html>\n",
        text(&r.schema),
        text(&r.started),
        text(&r.finished),
        text(&r.lane_source),
        text(&r.cluster_source)
    );
    s
}

fn verdict_section(s: &mut String, r: &RunReport, title: &str) {
    let checks: Vec<&CheckResult> = r.layers.iter().flat_map(|l| &l.checks).collect();
    let count = |o: Outcome| checks.iter().filter(|c| c.outcome == o).count();
    let _ = write!(
        s,
        "<header id=\"verdict\" class=\"{}\"><h1>{}</h1><p class=\"summary\">exit {} · \
         {} checks: {} passed, {} failed, {} degraded, {} flaky, {} skipped · {:.0} s",
        r.status.name(),
        text(title),
        r.exit_code,
        checks.len(),
        count(Outcome::Pass),
        count(Outcome::Fail),
        count(Outcome::Degraded),
        count(Outcome::Flaky),
        count(Outcome::Skipped),
        r.duration_s
    );
    if let Some(a) = &r.accel {
        let _ = write!(s, " · accel {}", text(&a.summary()));
    }
    if let Some(b) = &r.boot {
        let _ = write!(s, " · {} boot", text(&b.mode));
    }
    s.push_str("</p>");
    if let Some(e) = &r.error {
        let kind = match r.error_kind {
            Some(k) => format!("error[{}]", k.name()),
            None => "error".into(),
        };
        let _ = write!(
            s,
            "<p class=\"error\"><b>{}</b>: {}</p>",
            text(&kind),
            text(e)
        );
    }
    s.push_str("</header>\n");
}

/// Failed steps and checks first, then degraded checks, each with its
/// evidence and the log findings of its node.
fn failures(s: &mut String, r: &RunReport) {
    // The `smoke` step only sums up the checks, which are shown themselves.
    let steps: Vec<_> = r
        .steps
        .iter()
        .filter(|x| x.outcome == Outcome::Fail && x.name != "smoke")
        .collect();
    let mut notable: Vec<&CheckResult> = r
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
    notable.sort_by_key(|c| c.outcome != Outcome::Fail);
    if steps.is_empty() && notable.is_empty() && r.findings.is_empty() {
        return;
    }
    s.push_str("<section id=\"failures\"><h2>What did not pass</h2>\n");
    for st in steps {
        let _ = writeln!(
            s,
            "<article class=\"check fail\"><h3>step {}</h3><pre class=\"evidence\">{}</pre></article>",
            text(&st.name),
            text(&st.message)
        );
    }
    for c in &notable {
        let _ = write!(
            s,
            "<article class=\"check {}\" id=\"check-{}\"><h3>{}</h3>\
             <p class=\"meta\">{} · {} · {:.1} s · <code>{}</code></p>\
             <p class=\"message\">{}</p>",
            c.outcome.name(),
            attr(&anchor(&c.id)),
            text(&c.id),
            c.outcome.name(),
            text(&c.kind),
            c.duration_s,
            text(&c.origin),
            text(&c.message)
        );
        evidence(s, c);
        flaky_note(s, c);
        if let Some(a) = &c.artifact {
            let _ = write!(s, "<p><a href=\"{}\">{}</a></p>", attr(a), text(a));
        }
        for f in r
            .findings
            .iter()
            .filter(|f| Some(&f.node) == c.target.as_ref())
        {
            finding(s, f);
        }
        s.push_str("</article>\n");
    }
    let untied: Vec<_> = r
        .findings
        .iter()
        .filter(|f| !notable.iter().any(|c| c.target.as_ref() == Some(&f.node)))
        .collect();
    if !untied.is_empty() {
        s.push_str("<h3>Log findings</h3>");
        for f in untied {
            finding(s, f);
        }
    }
    s.push_str("</section>\n");
}

/// The text a person reads first (stdout, stderr, a body, a journal or
/// console tail: any text of several lines), then the whole evidence as
/// JSON, folded.
fn evidence(s: &mut String, c: &CheckResult) {
    let texts = c.evidence.as_object().into_iter().flatten();
    for (key, v) in texts {
        if let Some(t) = v.as_str()
            && !t.trim().is_empty()
            && (t.trim_end().contains('\n') || ["stdout", "stderr", "body"].contains(&key.as_str()))
        {
            let _ = write!(
                s,
                "<p class=\"label\">{key}</p><pre class=\"evidence\">{}</pre>",
                text(&tail(t, 40))
            );
        }
    }
    let json = serde_json::to_string_pretty(&c.evidence).unwrap_or_default();
    let _ = write!(
        s,
        "<details><summary>evidence (JSON)</summary><pre class=\"evidence\">{}</pre></details>",
        text(&json)
    );
}

/// `rerun`: every check over every run, flaky ones first, with links to
/// a failing run's evidence beside a passing one's.
fn rerun_section(s: &mut String, r: &RunReport) {
    let Some(rr) = &r.rerun else { return };
    let _ = writeln!(
        s,
        "<section id=\"rerun\"><h2>Rerun: {} of {} run(s) from snapshot {}</h2>\
         <div class=\"scroll\"><table><tr><th>check</th><th>verdict</th><th>passed</th>\
         <th>pass rate</th><th>time min..max</th><th>figures min..max</th>\
         <th>failing run</th><th>passing run</th></tr>",
        rr.runs.len(),
        rr.times,
        text(&rr.snapshot)
    );
    let mut checks: Vec<_> = rr.checks.iter().collect();
    checks.sort_by_key(|c| c.verdict != Outcome::Flaky);
    let link = |e: &Option<crate::report::rerun::EvidenceRef>| match e {
        Some(e) => {
            let file = e.artifact.as_ref().unwrap_or(&e.result);
            format!(
                "<a href=\"{}\">run {}</a>: {}",
                attr(file),
                e.run,
                text(&e.message)
            )
        }
        None => "-".into(),
    };
    for c in checks {
        let figures: Vec<String> = c
            .figures
            .iter()
            .map(|(k, v)| format!("{}: {:.4}..{:.4}", text(k), v.min, v.max))
            .collect();
        let _ = writeln!(
            s,
            "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{}/{}</td><td>{:.0}%</td>\
             <td>{:.1}..{:.1} s</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            c.verdict.name(),
            text(&c.id),
            c.verdict.name(),
            c.passes,
            c.outcomes.len(),
            c.pass_rate * 100.0,
            c.duration_s.min,
            c.duration_s.max,
            figures.join("<br>"),
            link(&c.failing),
            link(&c.passing)
        );
    }
    s.push_str("</table></div></section>\n");
}

/// A marked check's reason and the failures it was retried after.
fn flaky_note(s: &mut String, c: &CheckResult) {
    let Some(f) = &c.flaky else { return };
    let _ = write!(
        s,
        "<p class=\"label\">marked flaky: {} (up to {} reruns from the snapshot)</p>",
        text(&f.reason),
        f.reruns
    );
    for (i, e) in f.failures.iter().enumerate() {
        let json = serde_json::to_string_pretty(&e.evidence).unwrap_or_default();
        let _ = write!(
            s,
            "<details><summary>failure {} before rerun ({:.1} s): {}</summary>\
             <pre class=\"evidence\">{}</pre></details>",
            i + 1,
            e.duration_s,
            text(&e.message),
            text(&json)
        );
    }
}

fn finding(s: &mut String, f: &crate::evidence::Finding) {
    let _ = write!(
        s,
        "<div class=\"finding\"><p class=\"label\">{} on {} at <a href=\"{}\">{}:{}</a></p>\
         <pre class=\"excerpt\">{}</pre></div>",
        text(&f.what),
        text(&f.node),
        attr(&f.file),
        text(&f.file),
        f.line,
        text(&f.excerpt)
    );
}

fn legend(s: &mut String, r: &RunReport) {
    s.push_str("<p class=\"legend\">");
    let unrecorded = r.nodes.values().any(|n| n.phases.is_none());
    let shown = timeline::PHASES
        .iter()
        .filter(|p| unrecorded || p.1 != "ph-whole");
    for (name, class) in shown {
        let _ = write!(s, "<span class=\"key {class}\"></span>{name} ");
    }
    for o in ["pass", "fail", "degraded", "flaky", "skipped"] {
        let _ = write!(s, "<span class=\"key check-bar {o}\"></span>check {o} ");
    }
    s.push_str("</p>");
}

/// A check's id as part of an element id: a subtest's name may hold
/// spaces, which an element id may not.
fn anchor(id: &str) -> String {
    id.chars()
        .map(|c| if c.is_whitespace() { '-' } else { c })
        .collect()
}

/// Every layer and check, in a table that scrolls sideways on a phone; a
/// check's parts (a script's subtests) indented under it.
fn checks(s: &mut String, r: &RunReport) {
    s.push_str(
        "<section id=\"checks\"><h2>Checks</h2><div class=\"scroll\"><table>\
         <tr><th>check</th><th>layer</th><th>outcome</th><th>time</th><th>message</th></tr>\n",
    );
    for l in &r.layers {
        for c in &l.checks {
            let part = if c.part_of.is_some() { " part" } else { "" };
            let _ = writeln!(
                s,
                "<tr class=\"{}{part}\"><td>{}</td><td>{}</td><td>{}</td><td>{:.1} s</td><td>{}</td></tr>",
                c.outcome.name(),
                text(&c.id),
                text(&l.name),
                c.outcome.name(),
                c.duration_s,
                text(&c.message)
            );
        }
    }
    s.push_str("</table></div></section>\n");
}

/// Links to every file under the artifact root (consoles, journals, pcaps,
/// histories, evidence files), found on disk so nothing is missed.
fn artifacts(s: &mut String, r: &RunReport, dir: &Path) {
    let mut files = Vec::new();
    list(dir, dir, 0, &mut files);
    files.sort();
    files.retain(|f| f != "report.html");
    let _ = write!(
        s,
        "<section id=\"artifacts\"><h2>Artifacts ({} files)</h2><ul class=\"files\">",
        files.len()
    );
    for f in files {
        let named = r.artifacts.iter().find(|(_, p)| **p == f).map(|(n, _)| n);
        let _ = write!(s, "<li><a href=\"{}\">{}</a>", attr(&f), text(&f));
        if let Some(n) = named {
            let _ = write!(s, " <span class=\"label\">{}</span>", text(n));
        }
        s.push_str("</li>");
    }
    s.push_str("</ul></section>\n");
}

fn list(root: &Path, dir: &Path, depth: usize, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() && depth < 4 => list(root, &path, depth + 1, out),
            Ok(t) if t.is_file() && out.len() < 2000 => {
                if let Ok(rel) = path.strip_prefix(root) {
                    out.push(rel.to_string_lossy().into_owned());
                }
            }
            _ => {}
        }
    }
}

/// The last `n` lines: the end of a log is where the failure is.
fn tail(t: &str, n: usize) -> String {
    let lines: Vec<&str> = t.lines().collect();
    let skip = lines.len().saturating_sub(n);
    let mut out = String::new();
    if skip > 0 {
        let _ = writeln!(out, "[{skip} earlier lines in the JSON below]");
    }
    out.push_str(&lines[skip..].join("\n"));
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn subtests_are_listed_and_a_failed_one_shows_its_evidence() {
        let dir = tempfile::tempdir().unwrap();
        let page = super::render(&super::super::tests::with_subtests(), dir.path());
        assert!(
            page.contains("<tr class=\"pass part\"><td>s/boots</td>"),
            "{page}"
        );
        assert!(page.contains("id=\"check-s/breaks\""), "{page}");
        assert!(page.contains("Traceback (most recent call last)"), "{page}");
        assert!(page.contains("4 checks: 2 passed, 2 failed"), "{page}");
        assert_eq!(super::anchor("s/a missing file"), "s/a-missing-file");
    }
}
