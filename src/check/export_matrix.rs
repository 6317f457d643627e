//! `export_matrix`: the local single-process export benchmark (CoronaFS's
//! qemu-storage-daemon) across cache and aio modes, on the target node, so
//! a software-path regression can be told apart from the lab network.
//!
//! One export at a time: per combination a shell script creates a scratch
//! volume, starts `qemu-storage-daemon --daemonize` on 127.0.0.1:`port`
//! (its parent exits once the export listens, or with the refusal), runs
//! the `fio_bench` workloads through the nbd engine, and its trap stops the
//! daemon and removes the volume whatever happened. A combination the
//! daemon refuses is `unsupported`, not a failure (see [`refused_mode`]).

use super::figures::{self, Figure, Gates};
use super::fio::{self, FIGURES, Job, Samples, WORKLOADS};
use super::fio_bench::{check_job, iodepth, runtime_s, size_mib};
use super::{Check, Ctx, Outcome, Verdict};
use crate::guest::ExecOutput;
use crate::spec::Cluster;
use crate::text::{shell_quote, tail};
use anyhow::Result;
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportMatrix {
    #[serde(default = "caches")]
    cache: Vec<Cache>,
    #[serde(default = "aios")]
    aio: Vec<Aio>,
    /// The volume's format; qcow2 like the node's own export.
    #[serde(default = "qcow2")]
    format: Format,
    #[serde(default = "crate::spec::default::u16::<10900>")]
    port: u16,
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

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Cache {
    /// O_DIRECT: `cache.direct=on`.
    None,
    /// Through the page cache: `cache.direct=off`.
    Writeback,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Aio {
    Threads,
    Native,
    #[serde(rename = "io_uring")]
    IoUring,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Format {
    Raw,
    Qcow2,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

fn caches() -> Vec<Cache> {
    vec![Cache::None, Cache::Writeback]
}
fn aios() -> Vec<Aio> {
    vec![Aio::Threads, Aio::Native, Aio::IoUring]
}
fn qcow2() -> Format {
    Format::Qcow2
}

/// The node's own export, which the matrix must leave alone.
const NODE_EXPORT_PORT: u16 = 10809;
const SCRATCH: &str = "/var/tmp/photon-matrix";

#[derive(Debug, Clone, Copy)]
struct Combo {
    cache: Cache,
    aio: Aio,
}

impl Combo {
    fn names(self) -> (&'static str, &'static str) {
        let cache = match self.cache {
            Cache::None => "none",
            Cache::Writeback => "writeback",
        };
        let aio = match self.aio {
            Aio::Threads => "threads",
            Aio::Native => "native",
            Aio::IoUring => "io_uring",
        };
        (cache, aio)
    }
    /// `none+io_uring`: the prefix of its figure names.
    fn key(self) -> String {
        let (c, a) = self.names();
        format!("{c}+{a}")
    }
    fn label(self) -> String {
        let (c, a) = self.names();
        format!("cache={c} aio={a}")
    }
}

/// What one combination came to.
#[derive(Debug)]
enum Found {
    Measured(Samples),
    /// qemu-storage-daemon's own refusal.
    Unsupported(String),
    Failed(String),
}

impl ExportMatrix {
    fn combos(&self) -> Vec<Combo> {
        let each = |&cache| self.aio.iter().map(move |&aio| Combo { cache, aio });
        self.cache.iter().flat_map(each).collect()
    }

    fn job(&self) -> Job {
        Job {
            runtime_s: self.runtime_s,
            size_mib: self.size_mib,
            iodepth: self.iodepth,
        }
    }

    /// What `bind` refuses.
    fn validate(&self) -> Result<(), String> {
        if self.runs == 0 || self.cache.is_empty() || self.aio.is_empty() {
            return Err("runs, cache and aio need at least one entry each".into());
        }
        if self.port == NODE_EXPORT_PORT || self.port == 0 {
            let port = self.port;
            return Err(format!(
                "port = {port}: the node's own export uses {NODE_EXPORT_PORT}"
            ));
        }
        check_job(&self.job())?;
        let names: Vec<String> = self
            .combos()
            .iter()
            .flat_map(|c| {
                FIGURES
                    .iter()
                    .map(move |f| format!("{}.{}", c.key(), f.name))
            })
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        figures::check_gates(&self.gates, &names, &[])
    }

    /// The script for one combination; see the module doc. Markers on
    /// stdout: `@@start <exit>` (then the daemon's stderr when it refused)
    /// and `@@fio <workload> <exit>` (then fio's JSON, or its stderr).
    fn script(&self, c: Combo) -> String {
        let fmt = self.format.name();
        let direct = if c.cache == Cache::None { "on" } else { "off" };
        let (_, aio) = c.names();
        let uri = format!("nbd://127.0.0.1:{}/matrix", self.port);
        let mut s = format!(
            r#"dir={SCRATCH}; img="$dir/{key}.{fmt}"; pid=
cleanup() {{
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null; i=0
    while kill -0 "$pid" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; fi
  rm -f "$img" "$dir/qsd.pid" "$dir/qsd.err" "$dir/fio.out" "$dir/fio.err"; rmdir "$dir" 2>/dev/null
}}
trap cleanup EXIT; trap 'exit 129' HUP INT TERM
mkdir -p "$dir" && qemu-img create -q -f {fmt} "$img" {size}M || exit 2
qemu-storage-daemon --daemonize --pidfile "$dir/qsd.pid" \
  --blockdev driver=file,node-name=file,filename="$img",cache.direct={direct},aio={aio} \
  --blockdev driver={fmt},node-name=vol,file=file \
  --nbd-server addr.type=inet,addr.host=127.0.0.1,addr.port={port} \
  --export type=nbd,id=matrix,node-name=vol,name=matrix,writable=on 2>"$dir/qsd.err"
rc=$?; echo "@@start $rc"
if [ $rc -ne 0 ]; then cat "$dir/qsd.err"; exit 0; fi
pid=$(cat "$dir/qsd.pid")
run() {{ w=$1; shift
  if "$@" >"$dir/fio.out" 2>"$dir/fio.err"; then echo "@@fio $w 0"; cat "$dir/fio.out"
  else rc=$?; echo "@@fio $w $rc"; cat "$dir/fio.err"; exit 0; fi; }}
"#,
            key = c.key(),
            size = self.size_mib,
            port = self.port,
        );
        for w in &WORKLOADS {
            for _ in 0..self.runs {
                s += &format!("run {} {}\n", w.name, self.job().command(w, &uri));
            }
        }
        s
    }

    fn measure(&self, guest: &crate::guest::Guest, c: Combo, deadline: Instant) -> Result<Found> {
        let left = deadline.saturating_duration_since(Instant::now());
        let need = u64::from(4 * self.runs * self.runtime_s) + 20;
        if left < Duration::from_secs(need) {
            return Ok(Found::Failed(format!(
                "the check's deadline left {} s, and this combination needs about {need} s",
                left.as_secs()
            )));
        }
        let secs = left.as_secs() - 10;
        let cmd = format!("timeout -k 5 {secs} sh -c {}", shell_quote(&self.script(c)));
        let out = guest.exec(&cmd, left - Duration::from_secs(2))?;
        Ok(read_output(&out, self.runs))
    }
}

/// qemu-storage-daemon names the option it could not apply:
/// `qemu-storage-daemon: --blockdev driver=file,...: <why>`. When that is
/// the file blockdev (the one carrying `cache.direct` and `aio`), the node
/// refuses this combination: aio=native without O_DIRECT, a kernel without
/// io_uring, a filesystem without O_DIRECT. Any other refusal (the port is
/// taken, a bad option) is the benchmark's own failure.
fn refused_mode(stderr: &str) -> bool {
    stderr
        .lines()
        .any(|l| l.starts_with("qemu-storage-daemon: --blockdev driver=file,"))
}

/// Reads one combination's script output (see `script`).
fn read_output(out: &ExecOutput, runs: u32) -> Found {
    let mut samples = Samples::default();
    let mut started = false;
    let text = format!("\n{}", out.stdout);
    for section in text.split("\n@@").skip(1) {
        let (head, body) = section.split_once('\n').unwrap_or((section, ""));
        let words: Vec<&str> = head.split_whitespace().collect();
        match words[..] {
            ["start", "0"] => started = true,
            ["start", _] if refused_mode(body) => return Found::Unsupported(body.trim().into()),
            ["start", rc] => {
                return Found::Failed(format!("qemu-storage-daemon exited {rc}: {}", body.trim()));
            }
            ["fio", name, rc] => {
                let Some(i) = WORKLOADS.iter().position(|w| w.name == name) else {
                    return Found::Failed(format!("unexpected marker {head:?}"));
                };
                if rc != "0" {
                    return Found::Failed(format!("fio {name} exited {rc}: {}", tail(body, 20)));
                }
                match fio::parse(body, &WORKLOADS[i]) {
                    Ok(s) => samples[i].push(s),
                    Err(e) => return Found::Failed(format!("fio {name}: {e}")),
                }
            }
            _ => return Found::Failed(format!("unexpected marker {head:?}")),
        }
    }
    if out.code != 0 || !started || samples.iter().any(|s| s.len() != runs as usize) {
        let why = match out.code {
            124 => "timed out".to_string(),
            code => format!("exited {code}"),
        };
        return Found::Failed(format!(
            "the matrix script {why}: {}",
            tail(&out.stderr, 10)
        ));
    }
    Found::Measured(samples)
}

/// Scores the measured combinations, for naming the strongest. For each
/// figure, a combination's median is normalized to the best combination's
/// (median / best for throughput and IOPS, best / median for latency, so
/// the best gets 1.0 and worse ones less); its score is the geometric mean
/// of its 8 normalized figures. 1.0 means best at everything.
fn scores(measured: &[&Samples]) -> Vec<f64> {
    let floor = 1e-12;
    let mut logs = vec![0.0; measured.len()];
    for def in &FIGURES {
        let medians: Vec<f64> = measured
            .iter()
            .map(|s| figures::Stats::of(def.values(s)).map_or(floor, |st| st.median.max(floor)))
            .collect();
        let best = if def.higher_is_better {
            medians.iter().copied().fold(floor, f64::max)
        } else {
            medians.iter().copied().fold(f64::INFINITY, f64::min)
        };
        for (log, m) in logs.iter_mut().zip(&medians) {
            let norm = if def.higher_is_better {
                m / best
            } else {
                best / m
            };
            *log += norm.ln();
        }
    }
    logs.iter()
        .map(|l| (l / FIGURES.len() as f64).exp())
        .collect()
}

impl Check for ExportMatrix {
    fn bind(&mut self, _target: Option<&str>, _cluster: &Cluster) -> Result<(), String> {
        self.validate()
    }

    fn attempt(&self, ctx: &Ctx, target: Option<&str>, budget: Duration) -> Result<Verdict> {
        let guest = ctx.guest(target)?;
        let deadline = Instant::now() + budget;
        let mut results = Vec::new();
        for c in self.combos() {
            results.push((c, self.measure(&guest, c, deadline)?));
        }
        Ok(judge(self, &results))
    }
}

/// The verdict over every combination: fail when one errored or none was
/// measured, else the figures' (gates may still fail it).
fn judge(m: &ExportMatrix, results: &[(Combo, Found)]) -> Verdict {
    let measured: Vec<(Combo, &Samples)> = results
        .iter()
        .filter_map(|(c, r)| match r {
            Found::Measured(s) => Some((*c, s)),
            _ => None,
        })
        .collect();
    let score = scores(&measured.iter().map(|(_, s)| *s).collect::<Vec<_>>());
    let mut combinations = Vec::new();
    let (mut unsupported, mut failed) = (Vec::new(), Vec::new());
    let mut scored = 0; // measured combinations come in the order of `score`
    for (c, r) in results {
        let (cache, aio) = c.names();
        let mut entry = json!({ "cache": cache, "aio": aio });
        match r {
            Found::Measured(_) => {
                entry["status"] = json!("measured");
                entry["score"] = json!(score[scored]);
                scored += 1;
            }
            Found::Unsupported(why) => {
                entry["status"] = json!("unsupported");
                entry["reason"] = json!(why);
                unsupported.push(c.key());
            }
            Found::Failed(why) => {
                entry["status"] = json!("failed");
                entry["reason"] = json!(why);
                failed.push(format!("{}: {why}", c.key()));
            }
        }
        combinations.push(entry);
    }
    let figures: Vec<Figure> = measured
        .iter()
        .flat_map(|(c, s)| {
            let (prefix, label) = (format!("{}.", c.key()), format!("{} ", c.label()));
            FIGURES
                .iter()
                .filter_map(move |f| f.single(&prefix, &label, s))
        })
        .collect();
    let best = (0..measured.len()).max_by(|&a, &b| score[a].total_cmp(&score[b]));
    let mut evidence: Value = json!({
        "format": m.format.name(),
        "size_mib": m.size_mib, "runtime_s": m.runtime_s, "iodepth": m.iodepth,
        "runs": m.runs, "port": m.port,
        "combinations": combinations,
    });
    let mut message = format!(
        "{} of {} combinations measured",
        measured.len(),
        results.len()
    );
    if let Some(b) = best {
        let key = measured[b].0.key();
        let median = |n: &str| {
            let name = format!("{key}.{n}");
            figures
                .iter()
                .find(|f| f.name == name)
                .map_or(0.0, |f| f.subject.median)
        };
        let (read, iops) = (median("seq_read"), median("randread_iops"));
        let label = measured[b].0.label();
        message = format!(
            "strongest: {label} (seq_read {read:.1} MiB/s, randread {iops:.0} IOPS); {message}"
        );
        evidence["strongest"] = json!(label);
    }
    if !unsupported.is_empty() {
        message += &format!("; unsupported: {}", unsupported.join(", "));
    }
    let mut v = figures::verdict(message, figures, evidence, &m.gates);
    if measured.is_empty() || !failed.is_empty() {
        v.outcome = Outcome::Fail;
        let why = match failed.is_empty() {
            true => "no combination could be measured".to_string(),
            false => failed.join("; "),
        };
        v.message = format!("{}; {why}", v.message);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(src: &str) -> Result<ExportMatrix, String> {
        let t: toml::Table = toml::from_str(src).map_err(|e| e.to_string())?;
        let m: ExportMatrix = toml::Value::Table(t)
            .try_into()
            .map_err(|e: toml::de::Error| e.to_string())?;
        m.validate()?;
        Ok(m)
    }

    fn output(code: i32, stdout: &str) -> ExecOutput {
        let (stdout, stderr) = (stdout.to_string(), String::new());
        ExecOutput {
            code,
            stdout,
            stderr,
        }
    }

    /// What the script prints when every run of every workload went well,
    /// from the recorded fio runs.
    fn measured_output() -> String {
        let mut s = "@@start 0\n".to_string();
        for w in ["seq_write", "seq_read", "randwrite", "randread"] {
            s += &format!("@@fio {w} 0\n");
            s += match w {
                "seq_write" => include_str!("../../tests/fixtures/fio/seq_write.json"),
                "seq_read" => include_str!("../../tests/fixtures/fio/seq_read.json"),
                "randwrite" => include_str!("../../tests/fixtures/fio/randwrite.json"),
                _ => include_str!("../../tests/fixtures/fio/randread.json"),
            };
        }
        s
    }

    /// Script outputs recorded on the Debian 12 host (qemu-storage-daemon
    /// 7.2): aio=native without O_DIRECT, io_uring_setup failing (injected
    /// with strace), and the port already taken by another export.
    #[test]
    fn a_refused_mode_is_unsupported_and_a_taken_port_is_a_failure() {
        let native = include_str!("../../tests/fixtures/export-matrix/writeback+native.out");
        let Found::Unsupported(why) = read_output(&output(0, native), 3) else {
            panic!("{native}")
        };
        assert!(why.contains("requires cache.direct=on"), "{why}");
        let uring = include_str!("../../tests/fixtures/export-matrix/io_uring-unavailable.out");
        let Found::Unsupported(why) = read_output(&output(0, uring), 3) else {
            panic!("{uring}")
        };
        assert!(why.contains("Unable to use io_uring"), "{why}");
        let taken = include_str!("../../tests/fixtures/export-matrix/port-in-use.out");
        let Found::Failed(why) = read_output(&output(0, taken), 3) else {
            panic!("{taken}")
        };
        assert!(why.contains("Address already in use"), "{why}");
    }

    #[test]
    fn runs_are_counted_and_fio_failures_fail() {
        let ok = measured_output();
        assert!(matches!(
            read_output(&output(0, &ok), 1),
            Found::Measured(_)
        ));
        // Fewer runs than asked, or a script that died, is a failure.
        assert!(matches!(read_output(&output(0, &ok), 2), Found::Failed(_)));
        let Found::Failed(why) = read_output(&output(124, "@@start 0\n"), 1) else {
            panic!()
        };
        assert!(why.contains("timed out"), "{why}");
        let refused = include_str!("../../tests/fixtures/fio/refused.err");
        let out = format!("@@start 0\n@@fio seq_write 1\n{refused}");
        let Found::Failed(why) = read_output(&output(0, &out), 1) else {
            panic!()
        };
        assert!(why.contains("Connection refused"), "{why}");
    }

    #[test]
    fn the_strongest_is_best_on_the_geometric_mean() {
        let s = |mib_s: f64, iops: f64, p: f64| fio::Sample {
            mib_s,
            iops,
            p50_ms: p,
            p99_ms: p * 4.0,
        };
        let of = |x: fio::Sample| -> Samples { [vec![x], vec![x], vec![x], vec![x]] };
        let (fast, slow) = (of(s(800.0, 40000.0, 0.2)), of(s(400.0, 20000.0, 0.4)));
        let sc = scores(&[&slow, &fast]);
        assert_eq!(sc[1], 1.0);
        assert!(
            (sc[0] - 0.5).abs() < 1e-9,
            "half as good everywhere: {sc:?}"
        );
        // Faster throughput with far worse latency loses on the mean.
        let laggy = of(s(900.0, 41000.0, 2.0));
        assert!(scores(&[&fast, &laggy])[0] > scores(&[&fast, &laggy])[1]);
    }

    #[test]
    fn unsupported_is_reported_not_failed() {
        let m = matrix("runs = 1").unwrap();
        let combo = |cache, aio| Combo { cache, aio };
        let out = measured_output();
        let Found::Measured(samples) = read_output(&output(0, &out), 1) else {
            panic!()
        };
        let results = vec![
            (
                combo(Cache::None, Aio::IoUring),
                Found::Measured(samples.clone()),
            ),
            (
                combo(Cache::Writeback, Aio::Native),
                Found::Unsupported("aio=native ...".into()),
            ),
        ];
        let v = judge(&m, &results);
        assert_eq!(v.outcome, Outcome::Pass, "{}", v.message);
        assert!(
            v.message.starts_with("strongest: cache=none aio=io_uring"),
            "{}",
            v.message
        );
        assert!(
            v.message.contains("unsupported: writeback+native"),
            "{}",
            v.message
        );
        assert_eq!(v.evidence["strongest"], "cache=none aio=io_uring");
        assert_eq!(v.evidence["combinations"][1]["status"], "unsupported");
        let figures = figures::from_evidence(&v.evidence);
        assert_eq!(figures.len(), 8);
        assert_eq!(figures[0].name, "none+io_uring.seq_read");
        let refused = Found::Unsupported("x".into());
        let only_refused = vec![(combo(Cache::Writeback, Aio::Native), refused)];
        let v = judge(&m, &only_refused);
        assert_eq!(v.outcome, Outcome::Fail);
        assert!(
            v.message.contains("no combination could be measured"),
            "{}",
            v.message
        );
        let one_failed = vec![
            (combo(Cache::None, Aio::IoUring), Found::Measured(samples)),
            (
                combo(Cache::None, Aio::Threads),
                Found::Failed("fio seq_read exited 1".into()),
            ),
        ];
        assert_eq!(judge(&m, &one_failed).outcome, Outcome::Fail);
    }

    #[test]
    fn fields_are_checked_when_the_lane_is_read() {
        let m = matrix("").unwrap();
        assert_eq!(m.combos().len(), 6);
        assert_eq!((m.port, m.runs, m.format), (10900, 3, Format::Qcow2));
        assert!(matrix("port = 10809").unwrap_err().contains("own export"));
        assert!(matrix("aio = [\"posix\"]").is_err());
        assert!(matrix("runs = 0").is_err());
        let g = matrix("cache = [\"none\"]\ngates.\"none+io_uring.seq_read\" = { min = 100.0 }");
        assert!(g.is_ok());
        let e = matrix("cache = [\"none\"]\ngates.\"writeback+io_uring.seq_read\" = { min = 1.0 }");
        assert!(e.unwrap_err().contains("no figure"));
        let e = matrix("gates = { \"none+native.seq_read\" = { min_ratio = 1.0 } }");
        assert!(e.unwrap_err().contains("needs a baseline"));
    }
}
