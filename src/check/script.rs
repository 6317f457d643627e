//! `script`: a Python test script (see docs/scripts.md) run against the
//! cluster as one check. `file` is relative to the lane file. The check
//! passes when the script exits 0 and every subtest passed. Each subtest is
//! a part of the verdict, so the engine reports it as a check of its own
//! (`<check id>/<subtest>`, kind `subtest`) with its timed steps, and a
//! failure's traceback, command, output and console tail, as evidence; the
//! script's own evidence sums them up.

use super::{Check, Ctx, Outcome, Part, Verdict};
use crate::script::Subtest;
use crate::text::tail;
use anyhow::Result;
use serde::Deserialize;
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Script {
    /// The script; the lane loader resolves it against the lane file's directory.
    file: PathBuf,
}

impl Check for Script {
    fn bind(
        &mut self,
        _target: Option<&str>,
        _cluster: &crate::spec::Cluster,
    ) -> Result<(), String> {
        crate::script::check_syntax(&self.file)
    }

    fn attempt(&self, ctx: &Ctx, _target: Option<&str>, budget: Duration) -> Result<Verdict> {
        let began = Instant::now();
        let stem = artifact_stem(&self.file);
        let dir = match ctx.artifact_path(&format!("script-{stem}")) {
            Some(d) => d,
            None => {
                std::env::temp_dir().join(format!("photon-script-{}-{stem}", std::process::id()))
            }
        };
        let run = crate::script::run(ctx.record, ctx.guests, &self.file, &dir, budget)?;
        // The subtests are checks of their own: here, only what they were.
        let summary: Vec<_> = run
            .subtests
            .iter()
            .map(|s| json!({ "name": s.name, "passed": s.passed, "seconds": s.seconds }))
            .collect();
        let evidence = json!({
            "script": self.file.display().to_string(),
            "exit": run.exit,
            "stopped": run.stopped,
            "seconds": run.seconds,
            "subtests": summary,
            "steps": run.steps,
            "stdout": tail(&run.stdout, 40),
            "stderr": tail(&run.stderr, 40),
        });
        // Subtests count from python3's start, parts from the attempt's.
        let lead = run.started.saturating_duration_since(began);
        let parts = run.subtests.iter().map(|s| self.part(s, lead)).collect();
        let passed = run.subtests.iter().filter(|s| s.passed).count();
        let verdict = if let Some(why) = &run.stopped {
            Verdict::fail(format!("stopped: {why}"), evidence)
        } else if let Some(f) = run.failed() {
            let msg = f.message.clone().unwrap_or_else(|| "failed".into());
            Verdict::fail(format!("subtest {:?}: {msg}", f.name), evidence)
        } else if run.exit != Some(0) {
            let why = format!("python3 exited {:?}: {}", run.exit, tail(&run.stderr, 3));
            Verdict::fail(why, evidence)
        } else {
            Verdict::pass(format!("{passed} subtests passed"), evidence)
        };
        Ok(verdict.with_parts(parts))
    }
}

/// The script's name for its artifact directory: its file stem, without
/// the hash a Nix store path puts before it (`/nix/store/<hash>-t.py`
/// gives `t`, as a file outside the store would).
fn artifact_stem(file: &std::path::Path) -> String {
    let stem = file.file_stem().unwrap_or_default().to_string_lossy();
    let in_store = file.parent() == Some(std::path::Path::new("/nix/store"));
    match stem.split_once('-') {
        Some((hash, name))
            if in_store
                && hash.len() == 32
                && hash
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()) =>
        {
            name.to_string()
        }
        _ => stem.to_string(),
    }
}

impl Script {
    /// A subtest as a part: its place in time, `file.py:LINE`, and its
    /// whole record as evidence.
    fn part(&self, s: &Subtest, lead: Duration) -> Part {
        let secs = |x: f64| Duration::try_from_secs_f64(x).unwrap_or_default();
        let file = self.file.display();
        let message = match (&s.message, s.passed) {
            (Some(m), _) => m.clone(),
            (None, true) => format!("passed: {} steps", s.steps.len()),
            (None, false) => "failed".into(),
        };
        Part {
            name: s.name.clone(),
            kind: "subtest",
            outcome: if s.passed {
                Outcome::Pass
            } else {
                Outcome::Fail
            },
            message,
            offset: lead + secs(s.started_s),
            duration: secs(s.seconds),
            origin: Some(match s.line {
                Some(l) => format!("{file}:{l}"),
                None => file.to_string(),
            }),
            evidence: serde_json::to_value(s).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::GuestPool;
    use crate::spec::Cluster;
    use crate::state::RunningCluster;
    use serde_json::Value;

    /// Runs `text` as a script on a cluster without nodes (it calls none).
    fn attempt(dir: &std::path::Path, text: &str) -> (Verdict, PathBuf) {
        attempt_within(dir, text, Duration::from_secs(60))
    }

    fn attempt_within(dir: &std::path::Path, text: &str, budget: Duration) -> (Verdict, PathBuf) {
        let file = dir.join("s.py");
        std::fs::write(&file, text).unwrap();
        let record: RunningCluster = serde_json::from_value(json!({
            "name": "t", "source": "t.toml", "started_unix": 0,
            "accel": { "used": "tcg", "requested": "tcg", "fallback_reason": null },
            "ssh_key": "/nonexistent", "known_hosts": "/nonexistent",
            "image": { "provider": "prebuilt", "kernel": "k", "initrd": "i", "rootfs": "r", "id": "x" },
            "nodes": {}
        }))
        .unwrap();
        let cluster = Cluster::profile("reference").unwrap();
        let guests = GuestPool::new(&record);
        let ctx = Ctx {
            cluster: &cluster,
            record: &record,
            guests: &guests,
            current_image: None,
            artifacts: Some(dir),
        };
        let check = Script { file: file.clone() };
        let v = check.attempt(&ctx, None, budget).unwrap();
        (v, file)
    }

    #[test]
    fn each_subtest_is_a_part_with_its_line_time_and_record() {
        let text = "import time\n\
            with subtest(\"first\"):\n    time.sleep(0.3)\n\
            with subtest(\"second\"):\n    assert 1 == 2, \"one is not two\"\n";
        let dir = tempfile::tempdir().unwrap();
        let (v, file) = attempt(dir.path(), text);
        assert_eq!(v.outcome, Outcome::Fail, "{}", v.message);
        let names: Vec<&str> = v.parts.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["first", "second"]);
        let (first, second) = (&v.parts[0], &v.parts[1]);
        assert_eq!((first.kind, first.outcome), ("subtest", Outcome::Pass));
        assert_eq!(first.origin, Some(format!("{}:2", file.display())));
        assert!(first.duration >= Duration::from_millis(300), "{first:?}");
        assert!(second.offset >= first.offset + first.duration, "{v:?}");
        assert_eq!(second.outcome, Outcome::Fail);
        assert_eq!(second.message, "AssertionError: one is not two");
        assert_eq!(second.origin, Some(format!("{}:4", file.display())));
        let tb = second.evidence["traceback"].as_str().unwrap();
        assert!(tb.contains("line 5"), "{tb}");
        // The script's own evidence only sums them up.
        assert_eq!(v.evidence["subtests"][1]["passed"], false);
        assert!(v.evidence["subtests"][0].get("steps").is_none());
    }

    /// A script stopped by its deadline is killed, and what it did so far
    /// is its verdict: the subtests it finished, and the one it was in.
    #[test]
    fn a_stopped_script_keeps_its_subtests_as_parts() {
        let text = "import time\n\
            with subtest(\"first\"):\n    pass\n\
            with subtest(\"sleeps\"):\n    time.sleep(600)\n";
        let dir = tempfile::tempdir().unwrap();
        let (v, _) = attempt_within(dir.path(), text, Duration::from_secs(3));
        assert_eq!(v.outcome, Outcome::Fail);
        assert!(v.message.starts_with("stopped: "), "{}", v.message);
        let parts: Vec<_> = v.parts.iter().map(|p| (&*p.name, p.outcome)).collect();
        assert_eq!(parts, [("first", Outcome::Pass), ("sleeps", Outcome::Fail)]);
        assert!(
            v.parts[1]
                .message
                .starts_with("stopped inside this subtest"),
            "{}",
            v.parts[1].message
        );
        assert_eq!(v.evidence["exit"], Value::Null);
        assert!(v.evidence["stopped"].is_string(), "{}", v.evidence);
    }

    #[test]
    fn the_artifact_directory_is_named_without_the_store_hash() {
        let stem = |p: &str| artifact_stem(std::path::Path::new(p));
        assert_eq!(
            stem("/nix/store/0c6kzph7l1dcbgdlkvhm7yg4hzmwkx6q-dns.py"),
            "dns"
        );
        assert_eq!(stem("/work/lanes/dns-check.py"), "dns-check");
        // Not a store hash: kept.
        assert_eq!(stem("/nix/store/short-dns.py"), "short-dns");
    }

    #[test]
    fn an_exception_outside_any_subtest_is_the_part_script_at_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let (v, file) = attempt(dir.path(), "x = 1\nraise RuntimeError('outside')\n");
        assert_eq!(v.outcome, Outcome::Fail);
        assert_eq!(v.parts.len(), 1, "{v:?}");
        let p = &v.parts[0];
        assert_eq!((p.name.as_str(), p.outcome), ("script", Outcome::Fail));
        assert_eq!(p.origin, Some(format!("{}:2", file.display())));
        assert_eq!(p.message, "RuntimeError: outside");
    }
}
