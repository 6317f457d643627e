//! `fio_bench`: fio against a `subject` NBD volume (a remote export) and a
//! `baseline` one (the node-local export), from the target node: sequential
//! throughput, 4k random IOPS and completion latency, each as the subject's
//! figure beside the baseline's, with the ratio.
//!
//! Runs alternate (baseline, subject, baseline, subject, ...) within each
//! workload so a noisy neighbour hits both sides. The write workloads
//! overwrite the first `size_mib` of both volumes. The numbers are
//! reported, not judged, unless the lane sets `gates`.

use super::figures::{self, Gates};
use super::fio::{self, FIGURES, Job, Samples, WORKLOADS};
use super::{Check, Ctx, Verdict};
use crate::spec::Cluster;
use anyhow::Result;
use serde::Deserialize;
use serde_json::json;
use std::time::{Duration, Instant};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FioBench {
    baseline: String,
    subject: String,
    #[serde(default = "runtime_s")]
    runtime_s: u32,
    #[serde(default = "size_mib")]
    size_mib: u32,
    #[serde(default = "iodepth")]
    iodepth: u32,
    #[serde(default = "crate::spec::default::u32::<3>")]
    runs: u32,
    #[serde(default)]
    gates: Gates,
}

pub(super) fn runtime_s() -> u32 {
    5
}
pub(super) fn size_mib() -> u32 {
    64
}
pub(super) fn iodepth() -> u32 {
    8
}

/// Fewer than 3 runs per side leave a median that one outlier decides.
const MIN_RUNS: u32 = 3;

/// Refuses knobs that make a run meaningless (no time, no data, no I/O).
pub(super) fn check_job(job: &Job) -> Result<(), String> {
    if job.runtime_s == 0 || job.size_mib == 0 || job.iodepth == 0 {
        return Err("runtime_s, size_mib and iodepth must be at least 1".into());
    }
    Ok(())
}

impl FioBench {
    /// What `bind` refuses: too few runs, empty jobs, gates on unknown figures.
    fn validate(&self) -> Result<(), String> {
        if self.runs < MIN_RUNS {
            return Err(format!("runs = {}: at least {MIN_RUNS}", self.runs));
        }
        check_job(&self.job())?;
        let names: Vec<&str> = FIGURES.iter().map(|f| f.name).collect();
        figures::check_gates(&self.gates, &names, &names)
    }

    fn job(&self) -> Job {
        Job {
            runtime_s: self.runtime_s,
            size_mib: self.size_mib,
            iodepth: self.iodepth,
        }
    }
}

impl Check for FioBench {
    fn bind(&mut self, target: Option<&str>, cluster: &Cluster) -> Result<(), String> {
        for uri in [&self.subject, &self.baseline] {
            crate::provision::volume::check_uri(uri, target, cluster)?;
        }
        self.validate()
    }

    fn attempt(&self, ctx: &Ctx, target: Option<&str>, budget: Duration) -> Result<Verdict> {
        let guest = ctx.guest(target)?;
        let deadline = Instant::now() + budget;
        let job = self.job();
        let mut evidence = json!({
            "baseline": self.baseline,
            "subject": self.subject,
            "runtime_s": self.runtime_s,
            "size_mib": self.size_mib,
            "iodepth": self.iodepth,
            "runs": self.runs,
        });
        let (mut base, mut subj) = (Samples::default(), Samples::default());
        for (i, w) in WORKLOADS.iter().enumerate() {
            for run in 1..=self.runs {
                for (side, uri, into) in [
                    ("baseline", &self.baseline, &mut base),
                    ("subject", &self.subject, &mut subj),
                ] {
                    match fio::run(&guest, &job, w, uri, deadline)? {
                        Ok(sample) => into[i].push(sample),
                        Err(error) => {
                            evidence["error"] = json!(error);
                            let w = w.name;
                            let m = format!("fio {w} run {run} on the {side} ({uri}) failed");
                            return Ok(Verdict::fail(m, evidence));
                        }
                    }
                }
            }
        }
        let figures: Vec<_> = FIGURES
            .iter()
            .filter_map(|f| f.paired(&subj, &base))
            .collect();
        let shown = [
            "seq_read",
            "seq_write",
            "randread_iops",
            "randwrite_iops",
            "randread_p99_ms",
        ];
        let summary: Vec<String> = figures
            .iter()
            .filter(|f| shown.contains(&f.name.as_str()))
            .map(|f| f.summary())
            .collect();
        let message = format!("subject vs baseline: {}", summary.join(", "));
        Ok(figures::verdict(message, figures, evidence, &self.gates))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(src: &str) -> Result<FioBench, String> {
        let t: toml::Table = toml::from_str(src).map_err(|e| e.to_string())?;
        let c: FioBench = toml::Value::Table(t)
            .try_into()
            .map_err(|e: toml::de::Error| e.to_string())?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn defaults_and_refusals() {
        let base = "baseline = \"nbd://127.0.0.1:10809/vol0\"\n\
                    subject = \"nbd://10.0.0.5:10809/vol0\"\n";
        let c = parse(base).unwrap();
        assert_eq!((c.runtime_s, c.size_mib, c.iodepth, c.runs), (5, 64, 8, 3));
        assert!(
            parse(&format!("{base}runs = 2"))
                .unwrap_err()
                .contains("at least 3")
        );
        assert!(parse(&format!("{base}iodepth = 0")).is_err());
        let e = parse(&format!("{base}gates.seq_reed = {{ min_ratio = 0.5 }}")).unwrap_err();
        assert!(e.contains("no figure \"seq_reed\""), "{e}");
        let gates = "[gates]\nrandread_p99_ms = { max = 20.0 }\nseq_read = { min_ratio = 0.5 }";
        let c = parse(&format!("{base}{gates}"));
        assert_eq!(c.unwrap().gates.len(), 2);
    }
}
