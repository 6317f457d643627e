//! fio for the volume benchmarks (`fio_bench`, `export_matrix`): the four
//! workloads both run, the command line of one run, what is read back from
//! fio's JSON, and the figures made from it. Not a kind.
//!
//! Runs use fio's nbd engine (libnbd) so a volume is measured as an NBD
//! client sees it, without a kernel nbd device. Throughput is MiB/s
//! (bytes / 2^20), the unit fio itself prints, so a figure can be compared
//! with a hand-run fio; `volume_bench`'s "MB/s" is MiB-based too.

use super::figures::Figure;
use crate::guest::Guest;
use crate::text::{shell_quote, tail};
use anyhow::Result;
use serde_json::Value;
use std::time::{Duration, Instant};

/// One fio workload: a read/write pattern and a block size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Workload {
    /// fio's job name and the stem of the figure names.
    pub name: &'static str,
    /// fio's `--rw`.
    rw: &'static str,
    bs: &'static str,
    write: bool,
}

/// Writes come before reads: a fresh qcow2 (or sparse raw) volume reads
/// unallocated blocks as zeros without touching the disk, so the reads
/// measure the data the writes left.
#[rustfmt::skip] // a table: one workload a row
pub const WORKLOADS: [Workload; 4] = [
    Workload { name: "seq_write", rw: "write", bs: "1M", write: true },
    Workload { name: "seq_read", rw: "read", bs: "1M", write: false },
    Workload { name: "randwrite", rw: "randwrite", bs: "4k", write: true },
    Workload { name: "randread", rw: "randread", bs: "4k", write: false },
];

/// The knobs every run shares.
#[derive(Debug, Clone, Copy)]
pub struct Job {
    pub runtime_s: u32,
    pub size_mib: u32,
    pub iodepth: u32,
}

impl Job {
    /// The command line of one run of `w` against the NBD `uri`. Time
    /// based over the first `size_mib` of the volume: a run takes
    /// `runtime_s` whatever the volume's speed.
    pub fn command(&self, w: &Workload, uri: &str) -> String {
        format!(
            "fio --name={} --ioengine=nbd --uri={} --rw={} --bs={} --iodepth={} \
             --size={}M --time_based --runtime={} --percentile_list=50:99 --output-format=json",
            w.name,
            shell_quote(uri),
            w.rw,
            w.bs,
            self.iodepth,
            self.size_mib,
            self.runtime_s
        )
    }

    /// Seconds one run may take: its runtime, plus connecting and fio's
    /// own setup.
    pub fn run_secs(&self) -> u64 {
        u64::from(self.runtime_s) + 10
    }
}

/// What one run measured, in the direction of its workload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub mib_s: f64,
    pub iops: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Reads fio's `--output-format=json` stdout. The nbd engine prints "fio:
/// connected to NBD server" before the JSON, so parsing starts at the
/// first `{`. A run that did no I/O (fio reported an error) is an error.
pub fn parse(stdout: &str, w: &Workload) -> Result<Sample, String> {
    let start = stdout.find('{').ok_or("no JSON in fio's output")?;
    let v: Value = serde_json::from_str(&stdout[start..]).map_err(|e| format!("fio JSON: {e}"))?;
    let job = &v["jobs"][0];
    if job["error"].as_i64().unwrap_or(0) != 0 {
        return Err(format!("fio reported error {}", job["error"]));
    }
    let side = &job[if w.write { "write" } else { "read" }];
    let num = |p: &str| {
        side.pointer(p)
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("fio JSON has no {}{p}", w.rw))
    };
    if num("/total_ios")? == 0.0 {
        return Err(format!("fio did no {} I/O", w.rw));
    }
    Ok(Sample {
        mib_s: num("/bw_bytes")? / 1048576.0,
        iops: num("/iops")?,
        p50_ms: num("/clat_ns/percentile/50.000000")? / 1e6,
        p99_ms: num("/clat_ns/percentile/99.000000")? / 1e6,
    })
}

/// One run on `guest`, finished before `deadline`. The inner error is the
/// run's own failure (fio's stderr, or no time left for it); the outer one
/// means the session failed.
pub fn run(
    guest: &Guest,
    job: &Job,
    w: &Workload,
    uri: &str,
    deadline: Instant,
) -> Result<Result<Sample, String>> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left < Duration::from_secs(job.run_secs()) {
        return Ok(Err(format!(
            "the check's deadline leaves {} s, and a run takes up to {} s",
            left.as_secs(),
            job.run_secs()
        )));
    }
    let out = guest.exec(&job.command(w, uri), left)?;
    if !out.ok() {
        return Ok(Err(format!(
            "fio exited {}: {}",
            out.code,
            tail(&out.stderr, 20)
        )));
    }
    Ok(parse(&out.stdout, w))
}

/// A figure the benchmarks report: which workload it comes from, and which
/// number of its samples.
pub struct FigureDef {
    pub name: &'static str,
    pub label: &'static str,
    pub unit: &'static str,
    pub higher_is_better: bool,
    pub workload: &'static str,
    pub pick: fn(&Sample) -> f64,
}

/// Sequential workloads are judged by throughput, random ones by IOPS and
/// completion latency (median and tail).
#[rustfmt::skip] // a table: one figure a row
pub const FIGURES: [FigureDef; 8] = [
    fig("seq_read", "sequential read", "MiB/s", true, "seq_read", |s| s.mib_s),
    fig("seq_write", "sequential write", "MiB/s", true, "seq_write", |s| s.mib_s),
    fig("randread_iops", "4k random read", "IOPS", true, "randread", |s| s.iops),
    fig("randwrite_iops", "4k random write", "IOPS", true, "randwrite", |s| s.iops),
    fig("randread_p50_ms", "4k random read p50", "ms", false, "randread", |s| s.p50_ms),
    fig("randread_p99_ms", "4k random read p99", "ms", false, "randread", |s| s.p99_ms),
    fig("randwrite_p50_ms", "4k random write p50", "ms", false, "randwrite", |s| s.p50_ms),
    fig("randwrite_p99_ms", "4k random write p99", "ms", false, "randwrite", |s| s.p99_ms),
];

const fn fig(
    name: &'static str,
    label: &'static str,
    unit: &'static str,
    higher_is_better: bool,
    workload: &'static str,
    pick: fn(&Sample) -> f64,
) -> FigureDef {
    FigureDef {
        name,
        label,
        unit,
        higher_is_better,
        workload,
        pick,
    }
}

/// Each workload's samples, in the order of [`WORKLOADS`].
pub type Samples = [Vec<Sample>; 4];

impl FigureDef {
    /// This figure's value in each run of `samples`.
    pub fn values(&self, samples: &Samples) -> Vec<f64> {
        let i = WORKLOADS
            .iter()
            .position(|w| w.name == self.workload)
            .expect("a figure names one of the workloads");
        samples[i].iter().map(self.pick).collect()
    }

    /// The figure of a subject alone, named `<prefix><name>`.
    pub fn single(&self, prefix: &str, label: &str, samples: &Samples) -> Option<Figure> {
        let (name, label) = (
            format!("{prefix}{}", self.name),
            format!("{label}{}", self.label),
        );
        Figure::single(
            &name,
            &label,
            self.unit,
            self.higher_is_better,
            self.values(samples),
        )
    }

    /// The figure of a subject beside its baseline.
    pub fn paired(&self, subject: &Samples, baseline: &Samples) -> Option<Figure> {
        let (s, b) = (self.values(subject), self.values(baseline));
        Figure::paired(
            self.name,
            self.label,
            self.unit,
            self.higher_is_better,
            s,
            b,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str) -> &'static Workload {
        WORKLOADS.iter().find(|w| w.name == name).unwrap()
    }

    /// Recorded with `Job::command` (runtime 2 s, 64 MiB, iodepth 8) by fio
    /// 3.33 against a qemu-storage-daemon 7.2 NBD export on the Debian 12
    /// host; trimmed with jq to the keys read here and their neighbours.
    #[test]
    fn parses_recorded_fio_output() {
        let seq = parse(
            include_str!("../../tests/fixtures/fio/seq_read.json"),
            workload("seq_read"),
        )
        .unwrap();
        assert!(seq.mib_s > 1.0 && seq.iops > 1.0, "{seq:?}");
        assert!(
            (seq.mib_s - seq.iops).abs() / seq.iops < 0.01,
            "1 MiB blocks: MiB/s = IOPS"
        );
        let w = parse(
            include_str!("../../tests/fixtures/fio/randwrite.json"),
            workload("randwrite"),
        )
        .unwrap();
        assert!(w.p50_ms > 0.0 && w.p50_ms <= w.p99_ms, "{w:?}");
        let r = parse(
            include_str!("../../tests/fixtures/fio/randread.json"),
            workload("randread"),
        )
        .unwrap();
        assert!(
            (r.mib_s * 256.0 - r.iops).abs() / r.iops < 0.01,
            "4k blocks: {r:?}"
        );
    }

    #[test]
    fn a_run_that_did_no_io_is_an_error() {
        // The other direction of a write job did nothing.
        let out = include_str!("../../tests/fixtures/fio/seq_write.json");
        assert!(parse(out, workload("seq_write")).is_ok());
        let e = parse(out, workload("seq_read")).unwrap_err();
        assert!(e.contains("no read I/O"), "{e}");
        // fio against a port nobody listens on: JSON with no I/O, exit 1.
        let e = parse(
            include_str!("../../tests/fixtures/fio/refused.json"),
            workload("seq_read"),
        );
        assert!(e.is_err());
        assert!(parse("fio: engine nbd not loadable", workload("seq_read")).is_err());
    }

    #[test]
    fn the_command_quotes_the_uri_and_bounds_the_run() {
        let job = Job {
            runtime_s: 5,
            size_mib: 64,
            iodepth: 8,
        };
        let c = job.command(workload("randread"), "nbd://10.0.0.5:10809/vol0");
        assert!(
            c.contains("--uri='nbd://10.0.0.5:10809/vol0' --rw=randread --bs=4k --iodepth=8"),
            "{c}"
        );
        assert!(c.contains("--size=64M --time_based --runtime=5"), "{c}");
    }

    #[test]
    fn figures_pick_their_workload() {
        let s = |x: f64| Sample {
            mib_s: x,
            iops: x * 10.0,
            p50_ms: x / 10.0,
            p99_ms: x,
        };
        let samples: Samples = [
            vec![s(1.0)],
            vec![s(2.0)],
            vec![s(3.0)],
            vec![s(4.0), s(6.0)],
        ];
        let by = |n: &str| FIGURES.iter().find(|f| f.name == n).unwrap();
        assert_eq!(by("seq_read").values(&samples), vec![2.0]);
        assert_eq!(by("randread_iops").values(&samples), vec![40.0, 60.0]);
        let f = by("randwrite_p99_ms")
            .single("none+native.", "cache=none: ", &samples)
            .unwrap();
        assert_eq!(
            (f.name.as_str(), f.higher_is_better),
            ("none+native.randwrite_p99_ms", false)
        );
        assert_eq!(f.label, "cache=none: 4k random write p99");
    }
}
