//! Volume I/O benchmark (the coronafs part): `qemu-img bench` against a
//! subject export and a baseline export, run side by side from the target
//! node, reported as throughput and the subject/baseline ratio.
//!
//! Runs alternate (baseline, subject, baseline, subject, ...) so that a
//! noisy neighbour hits both, and each side's median is compared. The
//! numbers are evidence, not a verdict: the check passes when every run
//! completed, unless the lane sets `min_ratio`.

use super::{Check, Ctx, Verdict};
use crate::guest::Guest;
use crate::text::shell_quote;
use anyhow::{Result, anyhow};
use serde::Deserialize;
use serde_json::json;
use std::time::Duration;
use std::time::Instant;

/// `volume_bench`: `qemu-img bench` of a `subject` volume against a
/// `baseline` one, side by side from the target node; read and write MB/s
/// and their ratio.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeBench {
    baseline: String,
    subject: String,
    #[serde(default = "crate::spec::default::u32::<64>")]
    block_kib: u32,
    #[serde(default = "crate::spec::default::u32::<1000>")]
    count: u32,
    #[serde(default = "crate::spec::default::u32::<3>")]
    runs: u32,
    min_ratio: Option<f64>,
}

impl Check for VolumeBench {
    fn bind(&mut self, target: Option<&str>, cluster: &crate::spec::Cluster) -> Result<(), String> {
        for uri in [&self.subject, &self.baseline] {
            crate::provision::volume::check_uri(uri, target, cluster)?;
        }
        Ok(())
    }

    fn attempt(&self, ctx: &Ctx, target: Option<&str>, budget: Duration) -> Result<Verdict> {
        let b = Bench {
            baseline: &self.baseline,
            subject: &self.subject,
            block_kib: self.block_kib,
            count: self.count,
            runs: self.runs,
            min_ratio: self.min_ratio,
            deadline: Instant::now() + budget,
        };
        run(&*ctx.guest(target)?, &b)
    }
}

pub struct Bench<'a> {
    pub baseline: &'a str,
    pub subject: &'a str,
    pub block_kib: u32,
    pub count: u32,
    pub runs: u32,
    pub min_ratio: Option<f64>,
    /// The check's deadline: every run must finish before it.
    pub deadline: Instant,
}

/// Seconds from `qemu-img bench`'s "Run completed in 1.234 seconds."
fn completed_in(out: &str) -> Option<f64> {
    out.lines()
        .find_map(|l| l.strip_prefix("Run completed in "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
}

/// The median of at least one run (`check::figures::Stats`).
fn median(v: Vec<f64>) -> f64 {
    super::figures::Stats::of(v)
        .expect("at least one run")
        .median
}

impl Bench<'_> {
    /// MB/s of one run against `url`.
    fn once(&self, guest: &Guest, url: &str, write: bool) -> Result<f64> {
        let cmd = format!(
            "qemu-img bench -f raw -d 8 -c {} -s {}k {} {} 2>&1",
            self.count,
            self.block_kib,
            if write { "-w" } else { "" },
            shell_quote(url)
        );
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            anyhow::bail!("the check's deadline passed before every run finished");
        }
        let out = guest.succeed(&cmd, left)?;
        let secs = completed_in(&out).ok_or_else(|| anyhow!("no timing in {out:?}"))?;
        let mb = self.count as f64 * self.block_kib as f64 / 1024.0;
        Ok(mb / secs.max(1e-6))
    }
}

pub fn run(guest: &Guest, b: &Bench) -> Result<Verdict> {
    let mut evidence = json!({
        "baseline": b.baseline,
        "subject": b.subject,
        "block_kib": b.block_kib,
        "count": b.count,
        "runs": b.runs,
    });
    let mut summary = Vec::new();
    let mut worst: Option<f64> = None;
    for (mode, write) in [("read", false), ("write", true)] {
        let (mut base, mut subj) = (Vec::new(), Vec::new());
        for _ in 0..b.runs.max(1) {
            base.push(b.once(guest, b.baseline, write)?);
            subj.push(b.once(guest, b.subject, write)?);
        }
        let (bm, sm) = (median(base.clone()), median(subj.clone()));
        let ratio = sm / bm.max(1e-9);
        worst = Some(worst.map_or(ratio, |w: f64| w.min(ratio)));
        evidence[mode] = json!({
            "baseline_mb_s": base,
            "subject_mb_s": subj,
            "baseline_median_mb_s": bm,
            "subject_median_mb_s": sm,
            "ratio": ratio,
        });
        summary.push(format!("{mode} {sm:.1} vs {bm:.1} MB/s ({ratio:.2}x)"));
    }
    let message = format!("subject vs baseline: {}", summary.join(", "));
    match (b.min_ratio, worst) {
        (Some(min), Some(w)) if w < min => Ok(Verdict::fail(
            format!("{message}; below the lane's min_ratio {min}"),
            evidence,
        )),
        _ => Ok(Verdict::pass(message, evidence)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_img_bench_output() {
        let out = "Sending 2000 read requests, 65536 bytes each, 8 in parallel (starting at offset 0, step size 65536)\nRun completed in 3.250 seconds.\n";
        assert_eq!(completed_in(out), Some(3.25));
        assert_eq!(completed_in("nothing"), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
