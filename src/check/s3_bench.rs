//! `s3_bench`: S3 object throughput (the LightningStor part) from the
//! target node against a storage node's S3 server (photon-s3.service,
//! s3s-fs; `provision::s3`).
//!
//! The client is boto3 (Debian's python3-boto3) driven by one script,
//! `s3_bench.py` beside this file, sent to the guest's `python3 -` on a
//! heredoc: one process for every request of a run, so interpreter start-up
//! is not measured. It reads the cluster's secret key from the config
//! disk's node.env, so the key is on no command line and in no output. Per
//! run it PUTs then GETs `large_count` objects of `large_mib` MiB (MB/s, one
//! stream) and `small_count` objects of 4 KiB, one request at a time (ops/s
//! and per-request p50/p99). Every GET is compared with what was PUT
//! (sha256); the objects are deleted at the end.
//!
//! Figures are reported, not judged, unless the lane sets `gates`. The
//! check fails when a request fails (the evidence keeps the server's raw
//! response body), when an object comes back different (the key is the
//! evidence), or when the deadline passes before every run finished.

use super::figures::{self, Figure, Gates};
use super::{Check, Ctx, Verdict};
use crate::provision::s3;
use crate::spec::Cluster;
use crate::text::{excerpt, shell_quote, tail};
use anyhow::Result;
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::Duration;

/// The guest-side client; one JSON object on stdout.
const SCRIPT: &str = include_str!("s3_bench.py");
/// The heredoc's end marker (no line of the script may be this).
const EOF_MARK: &str = "PHOTON_S3_BENCH_PY";
/// The size of a small object.
const SMALL_KIB: u32 = 4;

/// Every figure this kind measures: (name, label, unit, higher is better).
const FIGURES: &[(&str, &str, &str, bool)] = &[
    ("large_put", "large-object PUT", "MB/s", true),
    ("large_get", "large-object GET", "MB/s", true),
    ("small_put", "4 KiB PUT", "ops/s", true),
    ("small_get", "4 KiB GET", "ops/s", true),
    ("small_put_p50_ms", "4 KiB PUT p50", "ms", false),
    ("small_put_p99_ms", "4 KiB PUT p99", "ms", false),
    ("small_get_p50_ms", "4 KiB GET p50", "ms", false),
    ("small_get_p99_ms", "4 KiB GET p99", "ms", false),
];

/// `s3_bench`: PUT and GET throughput of large and small objects, and the
/// latency of small ones, from the target node to `endpoint`'s `bucket`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Bench {
    /// `http://{address:storage-node01}:9000`: a node that serves S3.
    endpoint: String,
    #[serde(default = "default_bucket")]
    bucket: String,
    #[serde(default = "crate::spec::default::u32::<64>")]
    large_mib: u32,
    #[serde(default = "crate::spec::default::u32::<2>")]
    large_count: u32,
    #[serde(default = "crate::spec::default::u32::<1000>")]
    small_count: u32,
    #[serde(default = "crate::spec::default::u32::<3>")]
    runs: u32,
    #[serde(default)]
    gates: Gates,
}

fn default_bucket() -> String {
    s3::BUCKETS[0].to_string()
}

impl Check for S3Bench {
    fn bind(&mut self, _target: Option<&str>, cluster: &Cluster) -> Result<(), String> {
        for (field, value, range) in [
            ("large_mib", self.large_mib, 1..=1024),
            ("large_count", self.large_count, 1..=100),
            ("small_count", self.small_count, 10..=100_000),
            ("runs", self.runs, 1..=20),
        ] {
            if !range.contains(&value) {
                return Err(format!(
                    "{field} = {value} is out of range ({}..={})",
                    range.start(),
                    range.end()
                ));
            }
        }
        let host = endpoint_host(&self.endpoint)?;
        let node = cluster
            .nodes
            .iter()
            .find(|n| {
                n.address.to_string() == host
                    || n.name == host
                    || format!("{}.{}", n.name, cluster.network.domain) == host
            })
            .ok_or_else(|| {
                format!(
                    "endpoint {:?}: {host} is no node of the cluster \
                     (write http://{{address:<node>}}:{})",
                    self.endpoint,
                    s3::PORT
                )
            })?;
        if !node.runs(s3::UNIT) {
            return Err(format!(
                "endpoint {:?}: {} serves no S3 (the cluster file does not expect {} on it)",
                self.endpoint,
                node.name,
                s3::UNIT
            ));
        }
        if !s3::BUCKETS.contains(&self.bucket.as_str()) {
            return Err(format!(
                "bucket {:?}: the cluster's S3 servers have no such bucket (they have: {})",
                self.bucket,
                s3::BUCKETS.join(", ")
            ));
        }
        let names: Vec<&str> = FIGURES.iter().map(|f| f.0).collect();
        figures::check_gates(&self.gates, &names, &[])
    }

    fn attempt(&self, ctx: &Ctx, target: Option<&str>, budget: Duration) -> Result<Verdict> {
        let node = ctx.node(target)?;
        let guest = ctx.guest(target)?;
        // The script stops early enough to report before the deadline.
        let margin = (budget / 10).clamp(Duration::from_secs(5), Duration::from_secs(30));
        let config = json!({
            "endpoint": self.endpoint,
            "bucket": self.bucket,
            "access_key": s3::ACCESS_KEY,
            "secret_env": "S3_SECRET",
            "large_mib": self.large_mib,
            "large_count": self.large_count,
            "small_kib": SMALL_KIB,
            "small_count": self.small_count,
            "runs": self.runs,
            "prefix": format!("s3-bench/{node}"),
            "seconds": budget.saturating_sub(margin).as_secs_f64(),
        });
        let out = guest.exec(&command(&config), budget)?;
        Ok(judge(
            &out.stdout,
            &out.stderr,
            out.code,
            self.runs,
            &self.gates,
        ))
    }
}

/// The host of an `http://host:port/` endpoint.
fn endpoint_host(endpoint: &str) -> Result<&str, String> {
    let rest = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .ok_or_else(|| format!("endpoint {endpoint:?}: write http://<host>:<port>"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.rsplit_once(':') {
        Some((h, port)) if port.parse::<u16>().is_ok() => h,
        Some(_) => return Err(format!("endpoint {endpoint:?}: bad port")),
        None => authority,
    };
    if host.is_empty() {
        return Err(format!("endpoint {endpoint:?}: no host"));
    }
    Ok(host)
}

/// The guest command: the script on a heredoc, its configuration as its
/// argument, the secret from node.env in its environment only.
fn command(config: &Value) -> String {
    format!(
        ". /photon/node.env && export S3_SECRET && python3 - {} <<'{EOF_MARK}'\n{SCRIPT}\n{EOF_MARK}",
        shell_quote(&config.to_string())
    )
}

/// What the script reports (see s3_bench.py).
#[derive(Debug, Deserialize)]
struct Report {
    client: String,
    runs: Vec<Run>,
    error: Option<Value>,
    mismatch: Option<Value>,
    deadline: bool,
    #[serde(default)]
    deleted: u64,
}

/// One run's figures, by the script's names.
#[derive(Debug, Deserialize)]
struct Run {
    large_put_mb_s: f64,
    large_get_mb_s: f64,
    small_put_ops_s: f64,
    small_get_ops_s: f64,
    small_put_p50_ms: f64,
    small_put_p99_ms: f64,
    small_get_p50_ms: f64,
    small_get_p99_ms: f64,
}

impl Run {
    /// The value of the figure called `name`.
    fn figure(&self, name: &str) -> f64 {
        match name {
            "large_put" => self.large_put_mb_s,
            "large_get" => self.large_get_mb_s,
            "small_put" => self.small_put_ops_s,
            "small_get" => self.small_get_ops_s,
            "small_put_p50_ms" => self.small_put_p50_ms,
            "small_put_p99_ms" => self.small_put_p99_ms,
            "small_get_p50_ms" => self.small_get_p50_ms,
            "small_get_p99_ms" => self.small_get_p99_ms,
            other => unreachable!("no figure {other}"),
        }
    }
}

/// The verdict on the script's output.
fn judge(stdout: &str, stderr: &str, code: i32, runs: u32, gates: &Gates) -> Verdict {
    let line = stdout.lines().rev().find(|l| l.starts_with('{'));
    let (report, raw) = match line.map(|l| {
        (
            serde_json::from_str::<Report>(l),
            serde_json::from_str::<Value>(l),
        )
    }) {
        Some((Ok(r), Ok(raw))) if code == 0 => (r, raw),
        _ => {
            return Verdict::fail(
                format!("the S3 client did not report (exit {code})"),
                json!({
                    "exit": code,
                    "stdout": excerpt(&tail(stdout, 20), 4000),
                    "stderr": excerpt(&tail(stderr, 20), 4000),
                }),
            );
        }
    };
    let figures: Vec<Figure> = FIGURES
        .iter()
        .filter_map(|&(name, label, unit, higher)| {
            let values = report.runs.iter().map(|r| r.figure(name)).collect();
            Figure::single(name, label, unit, higher, values)
        })
        .collect();
    let mut evidence = raw;
    if !stderr.trim().is_empty() {
        evidence["stderr"] = json!(excerpt(&tail(stderr, 20), 4000));
    }
    let done = report.runs.len();
    let problem = if let Some(e) = &report.error {
        let at = e["key"]
            .as_str()
            .map(|k| format!(" {k}"))
            .unwrap_or_default();
        Some(match e["status"].as_u64() {
            Some(status) => format!(
                "{}{at} answered HTTP {status} {}",
                e["op"].as_str().unwrap_or("request"),
                e["code"].as_str().unwrap_or("")
            ),
            None => format!(
                "{}{at} failed: {}",
                e["op"].as_str().unwrap_or("request"),
                e["message"].as_str().unwrap_or("")
            ),
        })
    } else if let Some(m) = &report.mismatch {
        Some(format!(
            "GET {} returned other bytes than were PUT ({} of {} bytes, sha256 differs)",
            m["key"].as_str().unwrap_or("?"),
            m["get_bytes"],
            m["put_bytes"]
        ))
    } else if report.deadline || done < runs as usize {
        Some(format!("the deadline passed after {done} of {runs} runs"))
    } else {
        None
    };
    if let Some(problem) = problem {
        evidence["figures"] = json!(figures);
        return Verdict::fail(problem, evidence);
    }
    let median = |name: &str| {
        figures
            .iter()
            .find(|f| f.name == name)
            .map_or(0.0, |f| f.subject.median)
    };
    let message = format!(
        "large PUT {:.1} MB/s, GET {:.1} MB/s; {SMALL_KIB} KiB PUT {:.0} ops/s (p99 {:.1} ms), \
         GET {:.0} ops/s (p99 {:.1} ms); medians of {done} runs, {}, {} objects verified",
        median("large_put"),
        median("large_get"),
        median("small_put"),
        median("small_put_p99_ms"),
        median("small_get"),
        median("small_get_p99_ms"),
        report.client,
        report.deleted
    );
    figures::verdict(message, figures, evidence, gates)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Outcome;

    const BENCH: &str = include_str!("../../tests/fixtures/s3/bench.json");
    const BAD_SECRET: &str = include_str!("../../tests/fixtures/s3/bad-secret.json");
    const LOST: &str = include_str!("../../tests/fixtures/s3/lost-object.json");
    const DEADLINE: &str = include_str!("../../tests/fixtures/s3/deadline.json");

    fn parse(toml_text: &str) -> Result<S3Bench, String> {
        let t: toml::Table = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        toml::Value::Table(t)
            .try_into::<S3Bench>()
            .map_err(|e| e.to_string())
    }

    fn bound(toml_text: &str) -> Result<S3Bench, String> {
        let c = Cluster::profile("reference-storage").unwrap();
        let mut b = parse(toml_text)?;
        b.bind(Some("storage-node02"), &c)?;
        Ok(b)
    }

    #[test]
    fn reads_its_fields_with_defaults_and_binds_to_a_node_that_serves_s3() {
        let b = bound("endpoint = \"http://10.78.0.21:9000\"").unwrap();
        assert_eq!(b.bucket, "photon-bench");
        assert_eq!(
            (b.large_mib, b.large_count, b.small_count, b.runs),
            (64, 2, 1000, 3)
        );
        assert!(b.gates.is_empty());
        assert!(bound("endpoint = \"http://storage-node03:9000/\"\nsmall_count = 10").is_ok());
        assert!(parse("endpoint = \"x\"\nsmall_cont = 10").is_err());
    }

    #[test]
    fn refuses_a_bucket_the_cluster_lacks_and_endpoints_without_s3() {
        let e = bound("endpoint = \"http://10.78.0.21:9000\"\nbucket = \"nope\"").unwrap_err();
        assert!(
            e.contains("bucket \"nope\"") && e.contains("photon-bench"),
            "{e}"
        );
        let e = bound("endpoint = \"http://10.9.9.9:9000\"").unwrap_err();
        assert!(e.contains("no node of the cluster"), "{e}");
        let e = bound("endpoint = \"10.78.0.21:9000\"").unwrap_err();
        assert!(e.contains("http://"), "{e}");
        let reference = Cluster::profile("reference").unwrap();
        let mut b = parse("endpoint = \"http://10.77.0.14:9000\"").unwrap();
        let e = b.bind(Some("node05"), &reference).unwrap_err();
        assert!(e.contains("node04 serves no S3"), "{e}");
        let e = bound("endpoint = \"http://10.78.0.21:9000\"\nsmall_count = 5").unwrap_err();
        assert!(e.contains("small_count = 5"), "{e}");
        let e = bound("endpoint = \"http://10.78.0.21:9000\"\ngates = { seq_read = { min = 1 } }")
            .unwrap_err();
        assert!(e.contains("no figure \"seq_read\""), "{e}");
        assert!(
            bound("endpoint = \"http://10.78.0.21:9000\"\ngates = { small_get_p99_ms = { max = 100 } }")
                .is_ok()
        );
    }

    /// A real run: s3s-fs 0.14.1 on the host, the script under Debian's
    /// python3-boto3 (tests/fixtures/s3/README.md).
    #[test]
    fn a_recorded_run_yields_every_figure_with_one_value_per_run() {
        let v = judge(BENCH, "", 0, 3, &Gates::new());
        assert_eq!(v.outcome, Outcome::Pass, "{}", v.message);
        let f = figures::from_evidence(&v.evidence);
        assert_eq!(f.len(), FIGURES.len());
        for fig in &f {
            assert_eq!(fig.subject.runs.len(), 3, "{}", fig.name);
            assert!(fig.subject.median > 0.0, "{}", fig.name);
        }
        let p99 = f.iter().find(|f| f.name == "small_get_p99_ms").unwrap();
        assert!(!p99.higher_is_better);
        assert!(v.message.starts_with("large PUT "), "{}", v.message);
        assert!(v.message.contains("boto3 1.26.27"), "{}", v.message);
        // A gate the run breaks turns it into a failure.
        let gates: Gates = toml::from_str("large_put = { min = 1e9 }").unwrap();
        let v = judge(BENCH, "", 0, 3, &gates);
        assert_eq!(v.outcome, Outcome::Fail);
        assert!(v.message.contains("gate: large_put"), "{}", v.message);
        // Fewer runs than asked: the deadline cut it short.
        let v = judge(BENCH, "", 0, 4, &Gates::new());
        assert_eq!(v.outcome, Outcome::Fail);
        assert!(v.message.contains("3 of 4 runs"), "{}", v.message);
    }

    /// A real refusal: the same server, the client with a wrong secret key.
    #[test]
    fn a_server_error_fails_with_its_response_body_as_evidence() {
        let v = judge(BAD_SECRET, "", 0, 3, &Gates::new());
        assert_eq!(v.outcome, Outcome::Fail);
        assert!(
            v.message.contains("HTTP 403 SignatureDoesNotMatch"),
            "{}",
            v.message
        );
        let body = v.evidence["error"]["body"].as_str().unwrap();
        assert!(
            body.contains("<Code>SignatureDoesNotMatch</Code>"),
            "{body}"
        );
    }

    /// Objects removed behind the server's back (recorded): the GET's 404
    /// names the key, and the runs so far are kept as figures.
    #[test]
    fn a_lost_object_and_a_deadline_fail_with_what_was_measured() {
        let v = judge(LOST, "", 0, 1, &Gates::new());
        assert_eq!(v.outcome, Outcome::Fail);
        assert_eq!(
            v.message,
            "GetObject s3-bench/host/small-0 answered HTTP 404 NoSuchKey"
        );
        assert!(
            v.evidence["error"]["body"]
                .as_str()
                .unwrap()
                .contains("<Code>NoSuchKey</Code>")
        );
        assert_eq!(v.evidence["figures"], json!([]));
        let v = judge(DEADLINE, "", 0, 3, &Gates::new());
        assert_eq!(v.outcome, Outcome::Fail);
        assert_eq!(v.message, "the deadline passed after 0 of 3 runs");
    }

    #[test]
    fn a_mismatch_names_the_object_and_a_silent_client_fails() {
        let mut report: Value = serde_json::from_str(BENCH).unwrap();
        report["mismatch"] = json!({
            "key": "s3-bench/node04/small-7", "put_sha256": "aa", "get_sha256": "bb",
            "put_bytes": 4096, "get_bytes": 4096,
        });
        let v = judge(&report.to_string(), "", 0, 3, &Gates::new());
        assert_eq!(v.outcome, Outcome::Fail);
        assert!(
            v.message.contains("s3-bench/node04/small-7"),
            "{}",
            v.message
        );
        assert_eq!(v.evidence["mismatch"]["get_sha256"], "bb");
        let v = judge(
            "",
            "ModuleNotFoundError: No module named 'boto3'\n",
            1,
            3,
            &Gates::new(),
        );
        assert_eq!(v.outcome, Outcome::Fail);
        assert!(
            v.message.contains("did not report (exit 1)"),
            "{}",
            v.message
        );
        assert!(v.evidence["stderr"].as_str().unwrap().contains("boto3"));
    }

    #[test]
    fn the_command_sends_the_script_whole_and_no_secret() {
        assert!(!SCRIPT.lines().any(|l| l.trim() == EOF_MARK));
        let cmd = command(&json!({ "prefix": "it's" }));
        assert!(cmd.starts_with(". /photon/node.env && export S3_SECRET && python3 - "));
        assert!(cmd.contains(SCRIPT));
        assert!(cmd.ends_with(&format!("\n{EOF_MARK}")));
        assert!(cmd.contains(r#"'{"prefix":"it'\''s"}'"#), "{cmd}");
    }

    /// The heredoc, run by a real shell with a stand-in for python3,
    /// delivers the script and the configuration intact.
    #[test]
    fn a_real_shell_delivers_the_script_on_stdin() {
        let tmp = tempfile::tempdir().unwrap();
        let env = tmp.path().join("node.env");
        std::fs::write(&env, "S3_SECRET='k3y'\nOTHER='x'\n").unwrap();
        let fake = tmp.path().join("python3");
        std::fs::write(
            &fake,
            "#!/bin/sh\ncat > \"$(dirname \"$0\")/got\"; printf '%s|%s|%s' \"$1\" \"$2\" \"$S3_SECRET\"\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let cmd =
            command(&json!({ "a": 1 })).replacen("/photon/node.env", env.to_str().unwrap(), 1);
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!("( {cmd}\n) </dev/null"))
            .env("PATH", format!("{}:/usr/bin:/bin", tmp.path().display()))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "-|{\"a\":1}|k3y");
        let got = std::fs::read_to_string(tmp.path().join("got")).unwrap();
        assert!(got == format!("{SCRIPT}\n"), "the script arrived changed");
    }
}
