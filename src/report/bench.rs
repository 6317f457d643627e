//! The benchmark report: every figure of a run's bench checks (see
//! `check::figures`) as tables in `benchmarks.md` — `storage-benchmarks.md` or `coronafs-local-matrix.md`
//! for the storage lanes, as the seed names it — with one bar chart per
//! check and unit beside it (`charts/<check>-<unit>.svg`), drawn with
//! plotters: each bar is a median, its whisker the min..max of the runs.
//!
//! Written into the run directory with the other artifacts; `--publish DIR`
//! copies it (and its charts) where a repository keeps it (docs/).

use super::RunReport;
use crate::check::figures::{self, Figure};
use anyhow::{Context, Result};
use plotters::prelude::*;
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// The report's file name for a lane.
pub fn file_name(lane: &str) -> &'static str {
    if lane.starts_with("bench-coronafs") {
        "coronafs-local-matrix.md"
    } else if lane.starts_with("bench-storage") {
        "storage-benchmarks.md"
    } else {
        "benchmarks.md"
    }
}

/// One chart: a check's figures that share a unit.
struct Chart {
    file: String,
    title: String,
    figures: Vec<Figure>,
}

/// The report's markdown and its charts (file name -> SVG), or None when
/// the run measured no figures.
pub fn render(r: &RunReport) -> Option<(String, Vec<(String, String)>)> {
    let unknown = || "not recorded".to_string();
    let command_line = r.command_line.clone().unwrap_or_else(unknown);
    let commit = r.commit.clone().unwrap_or_else(unknown);
    let checks: Vec<(&str, Vec<Figure>)> = r
        .layers
        .iter()
        .flat_map(|l| &l.checks)
        .map(|c| (c.id.as_str(), figures::from_evidence(&c.evidence)))
        .filter(|(_, f)| !f.is_empty())
        .collect();
    if checks.is_empty() {
        return None;
    }
    let mut md = String::new();
    let accel = r
        .accel
        .as_ref()
        .map(|a| a.summary())
        .unwrap_or_else(|| "unknown".into());
    let _ = writeln!(
        md,
        "# Storage and benchmark figures: {} on {}\n",
        r.lane, r.cluster
    );
    let _ = writeln!(
        md,
        "Written by photon-cluster from one run; do not edit by hand.\n"
    );
    let _ = writeln!(md, "- date: {}", r.started);
    let _ = writeln!(md, "- accelerator: {accel}");
    let _ = writeln!(md, "- commit: {commit}");
    let _ = writeln!(md, "- command: `{command_line}`");
    let _ = writeln!(md, "- outcome: {} ({:.0} s)", r.status.name(), r.duration_s);
    let _ = writeln!(
        md,
        "\nEvery figure is the median of its runs, with min and max beside it. A ratio is \
         subject median / baseline median, measured side by side in alternating runs. Under \
         TCG every number is an emulation number: compare ratios, not absolutes.\n"
    );
    let mut charts = Vec::new();
    for (id, figs) in &checks {
        let check = r
            .layers
            .iter()
            .flat_map(|l| &l.checks)
            .find(|c| c.id == *id);
        let _ = writeln!(md, "## {id}\n");
        if let Some(c) = check {
            let _ = writeln!(md, "{} ({})\n", c.message, c.outcome.name());
        }
        let grid = Grid::of(figs);
        match &grid {
            Some(g) => g.table(&mut md, check.map(|c| &c.evidence)),
            None => table(&mut md, figs),
        }
        if let Some(strongest) = check
            .and_then(|c| c.evidence.get("strongest"))
            .and_then(|s| s.as_str())
        {
            let _ = writeln!(md, "\n**Strongest profile:** {strongest}");
        }
        let _ = writeln!(md);
        let groups = match &grid {
            Some(g) => g.charts(id),
            None => by_unit(id, figs),
        };
        for chart in groups {
            let _ = writeln!(md, "![{}]({})\n", chart.title, chart.file);
            charts.push(chart);
        }
    }
    let svgs = charts
        .iter()
        .filter_map(|c| Some((c.file.clone(), draw(c).ok()?)))
        .collect();
    Some((md, svgs))
}

/// One table of figures: each with its spread, and the baseline beside it
/// when measured side by side.
fn table(md: &mut String, figs: &[Figure]) {
    let paired = figs.iter().any(|f| f.baseline.is_some());
    if paired {
        let _ = writeln!(
            md,
            "| figure | unit | subject median | min | max | baseline median | min | max | ratio |"
        );
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
    } else {
        let _ = writeln!(md, "| figure | unit | median | min | max | runs |");
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|");
    }
    for f in figs {
        let s = &f.subject;
        let (med, min, max) = (num(s.median), num(s.min), num(s.max));
        if paired {
            let (bm, bmin, bmax) = f
                .baseline
                .as_ref()
                .map(|b| (num(b.median), num(b.min), num(b.max)))
                .unwrap_or_default();
            let ratio = f.ratio.map(|r| format!("{r:.2}x")).unwrap_or_default();
            let _ = writeln!(
                md,
                "| {} | {} | {med} | {min} | {max} | {bm} | {bmin} | {bmax} | {ratio} |",
                f.label, f.unit
            );
        } else {
            let _ = writeln!(
                md,
                "| {} | {} | {med} | {min} | {max} | {} |",
                f.label,
                f.unit,
                s.runs.len()
            );
        }
    }
}

/// One chart per unit of a check's figures.
fn by_unit(id: &str, figs: &[Figure]) -> Vec<Chart> {
    let mut units: Vec<&str> = figs.iter().map(|f| f.unit.as_str()).collect();
    units.sort();
    units.dedup();
    units
        .into_iter()
        .map(|unit| Chart {
            file: format!("charts/{}-{}.svg", slug(id), slug(unit)),
            title: format!("{id}: {unit}"),
            figures: figs.iter().filter(|f| f.unit == unit).cloned().collect(),
        })
        .collect()
}

/// Figures named `<row>.<measure>` (the export matrix's combinations): one
/// row per combination and one column per measure, and a chart per
/// measure comparing the rows, which reads better than 40 lines.
struct Grid<'a> {
    rows: Vec<&'a str>,
    /// (measure, a figure of it: its unit and direction).
    columns: Vec<(&'a str, &'a Figure)>,
    figs: &'a [Figure],
}

impl<'a> Grid<'a> {
    fn of(figs: &'a [Figure]) -> Option<Grid<'a>> {
        let mut rows = Vec::new();
        let mut columns: Vec<(&str, &Figure)> = Vec::new();
        for f in figs {
            let (row, measure) = f.name.split_once('.')?;
            if !rows.contains(&row) {
                rows.push(row);
            }
            if !columns.iter().any(|(m, _)| *m == measure) {
                columns.push((measure, f));
            }
        }
        Some(Grid {
            rows,
            columns,
            figs,
        })
    }

    fn get(&self, row: &str, measure: &str) -> Option<&Figure> {
        self.figs
            .iter()
            .find(|f| f.name == format!("{row}.{measure}"))
    }

    fn table(&self, md: &mut String, evidence: Option<&serde_json::Value>) {
        let head: Vec<String> = self
            .columns
            .iter()
            .map(|(m, f)| format!("{m} ({})", f.unit))
            .collect();
        let _ = writeln!(md, "Medians (min..max) of each combination's runs.\n");
        let _ = writeln!(md, "| combination | {} |", head.join(" | "));
        let _ = writeln!(md, "|---|{}", "---:|".repeat(head.len()));
        for row in &self.rows {
            let cells: Vec<String> = self
                .columns
                .iter()
                .map(|(m, _)| match self.get(row, m) {
                    Some(f) => format!(
                        "{} ({}..{})",
                        num(f.subject.median),
                        num(f.subject.min),
                        num(f.subject.max)
                    ),
                    None => String::new(),
                })
                .collect();
            let _ = writeln!(md, "| {row} | {} |", cells.join(" | "));
        }
        // What was not measured, and why (the check's own evidence).
        let others = evidence
            .and_then(|e| e.get("combinations"))
            .and_then(|c| c.as_array())
            .into_iter()
            .flatten()
            .filter(|c| c["status"] != "measured");
        for c in others {
            let _ = writeln!(
                md,
                "\n- cache={} aio={}: **{}**: {}",
                c["cache"].as_str().unwrap_or("?"),
                c["aio"].as_str().unwrap_or("?"),
                c["status"].as_str().unwrap_or("?"),
                c["reason"].as_str().unwrap_or("")
            );
        }
    }

    fn charts(&self, id: &str) -> Vec<Chart> {
        self.columns
            .iter()
            .map(|(measure, _)| Chart {
                file: format!("charts/{}-{}.svg", slug(id), slug(measure)),
                title: format!("{id}: {measure}"),
                figures: self
                    .rows
                    .iter()
                    .filter_map(|row| {
                        let mut f = self.get(row, measure)?.clone();
                        f.label = row.to_string();
                        Some(f)
                    })
                    .collect(),
            })
            .collect()
    }
}

/// Writes the report and its charts into `dir`; returns the report's path.
pub fn write(dir: &Path, r: &RunReport) -> Result<Option<PathBuf>> {
    let Some((md, charts)) = render(r) else {
        return Ok(None);
    };
    let path = dir.join(file_name(&r.lane));
    std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))?;
    for (file, svg) in charts {
        let p = dir.join(&file);
        std::fs::create_dir_all(p.parent().expect("charts/"))?;
        std::fs::write(&p, svg).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(Some(path))
}

/// Copies the run's report and charts into `to` (e.g. docs/).
pub fn publish(run_dir: &Path, lane: &str, to: &Path) -> Result<Option<PathBuf>> {
    let name = file_name(lane);
    let from = run_dir.join(name);
    if !from.exists() {
        return Ok(None);
    }
    let charts = run_dir.join("charts");
    std::fs::create_dir_all(to.join("charts"))
        .with_context(|| format!("creating {}", to.display()))?;
    if charts.is_dir() {
        for e in std::fs::read_dir(&charts)? {
            let e = e?;
            std::fs::copy(e.path(), to.join("charts").join(e.file_name()))?;
        }
    }
    let dest = to.join(name);
    std::fs::copy(&from, &dest).with_context(|| format!("writing {}", dest.display()))?;
    Ok(Some(dest))
}

/// The checkout's commit, when the driver runs from one.
pub fn commit() -> String {
    std::process::Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| format!("unknown (photon-cluster {})", env!("CARGO_PKG_VERSION")))
}

/// A figure's unit as a Hydra metric unit (a static string).
pub fn metric_unit(unit: &str) -> &'static str {
    match unit {
        "MB/s" => "MB/s",
        "MiB/s" => "MiB/s",
        "ms" => "ms",
        "IOPS" => "IOPS",
        "ops/s" => "ops/s",
        "s" => "s",
        _ => "",
    }
}

fn num(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect::<String>()
        .replace("--", "-")
}

/// A bar per side and figure: the median, with a min..max whisker.
fn draw(c: &Chart) -> Result<String> {
    let mut svg = String::new();
    let n = c.figures.len();
    let width = (160 + 120 * n as u32).max(480);
    {
        let root = SVGBackend::with_string(&mut svg, (width, 320)).into_drawing_area();
        root.fill(&WHITE)?;
        let top = c
            .figures
            .iter()
            .flat_map(|f| [Some(f.subject.max), f.baseline.as_ref().map(|b| b.max)])
            .flatten()
            .fold(0.0_f64, f64::max)
            * 1.35;
        let mut chart = ChartBuilder::on(&root)
            .caption(&c.title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..top.max(1e-9))?;
        let labels: Vec<String> = c.figures.iter().map(|f| f.label.clone()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n.max(2))
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 {
                    labels.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc(c.figures[0].unit.as_str())
            .draw()?;
        let subject = RGBColor(0x1f, 0x6f, 0xb4);
        let baseline = RGBColor(0x9a, 0x9a, 0x9a);
        let paired = c.figures.iter().any(|f| f.baseline.is_some());
        for (i, f) in c.figures.iter().enumerate() {
            let x = i as f64;
            let mut sides = vec![(&f.subject, subject, if paired { x - 0.2 } else { x })];
            if let Some(b) = &f.baseline {
                sides.push((b, baseline, x + 0.2));
            }
            for (s, color, cx) in sides {
                let half = if paired { 0.18 } else { 0.3 };
                chart.draw_series(std::iter::once(Rectangle::new(
                    [(cx - half, 0.0), (cx + half, s.median)],
                    color.filled(),
                )))?;
                chart.draw_series(std::iter::once(ErrorBar::new_vertical(
                    cx,
                    s.min,
                    s.median,
                    s.max,
                    BLACK.stroke_width(1),
                    8,
                )))?;
            }
        }
        if paired {
            chart
                .draw_series(std::iter::empty::<Rectangle<(f64, f64)>>())?
                .label("subject")
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], subject.filled())
                });
            chart
                .draw_series(std::iter::empty::<Rectangle<(f64, f64)>>())?
                .label("baseline")
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], baseline.filled())
                });
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE)
                .border_style(BLACK)
                .draw()?;
        }
        root.present()?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_become_tables_and_charts() {
        let mut r: RunReport = serde_json::from_str(include_str!(
            "../../tests/fixtures/runs/degraded/result.json"
        ))
        .unwrap();
        assert!(render(&r).is_none(), "no figures, no report");
        r.command_line = Some("photon-cluster bench-storage".into());
        r.commit = Some("abc123".into());
        let figs = vec![
            Figure::paired(
                "seq_read",
                "sequential read",
                "MB/s",
                true,
                vec![10.0, 12.0, 11.0],
                vec![40.0, 44.0, 42.0],
            )
            .unwrap(),
            Figure::paired(
                "randread_p99_ms",
                "4k random read p99",
                "ms",
                false,
                vec![3.0, 4.0, 5.0],
                vec![1.0, 2.0, 3.0],
            )
            .unwrap(),
        ];
        let c = &mut r.layers[0].checks[0];
        c.evidence = serde_json::json!({ "figures": figs });
        let id = c.id.clone();
        let (md, charts) = render(&r).unwrap();
        assert!(md.contains("- commit: abc123"), "{md}");
        assert!(
            md.contains(
                "| sequential read | MB/s | 11.00 | 10.00 | 12.00 | 42.00 | 40.00 | 44.00 | 0.26x |"
            ),
            "{md}"
        );
        assert_eq!(charts.len(), 2, "one chart per unit");
        assert!(
            md.contains(&format!("](charts/{}-mb-s.svg)", slug(&id))),
            "{md}"
        );
        let svg = &charts
            .iter()
            .find(|c| c.0.ends_with("-mb-s.svg"))
            .unwrap()
            .1;
        assert!(
            svg.starts_with("<svg") && svg.contains("sequential read"),
            "{svg}"
        );
        assert!(svg.contains("baseline"), "a legend for paired figures");
    }

    #[test]
    fn a_matrix_becomes_one_row_per_combination_and_a_chart_per_measure() {
        let mut r: RunReport = serde_json::from_str(include_str!(
            "../../tests/fixtures/runs/degraded/result.json"
        ))
        .unwrap();
        let fig = |name: &str, v: f64| Figure::single(name, name, "MiB/s", true, vec![v]).unwrap();
        let figs = vec![
            fig("none+threads.seq_read", 10.0),
            fig("none+threads.seq_write", 11.0),
            fig("none+io_uring.seq_read", 20.0),
            fig("none+io_uring.seq_write", 21.0),
        ];
        r.layers[0].checks[0].evidence = serde_json::json!({
            "figures": figs,
            "strongest": "cache=none aio=io_uring",
            "combinations": [
                { "cache": "writeback", "aio": "native", "status": "unsupported", "reason": "aio=native ... requires cache.direct=on" }
            ],
        });
        let (md, charts) = render(&r).unwrap();
        assert!(
            md.contains("| combination | seq_read (MiB/s) | seq_write (MiB/s) |"),
            "{md}"
        );
        assert!(
            md.contains("| none+io_uring | 20.00 (20.00..20.00) | 21.00 (21.00..21.00) |"),
            "{md}"
        );
        assert!(
            md.contains("cache=writeback aio=native: **unsupported**: aio=native"),
            "{md}"
        );
        assert!(
            md.contains("**Strongest profile:** cache=none aio=io_uring"),
            "{md}"
        );
        assert_eq!(charts.len(), 2, "one chart per measure");
        assert!(charts[0].1.contains("none+io_uring"), "rows are the bars");
    }
}
