//! `script`: a Python test script (see docs/scripts.md) run against the
//! cluster as one check. `file` is relative to the lane file. The check
//! passes when the script exits 0 and every subtest passed; the evidence
//! holds each subtest with its timed steps, and a failure's traceback,
//! command, output and console tail.

use super::{Check, Ctx, Verdict};
use crate::text::tail;
use anyhow::Result;
use serde::Deserialize;
use serde_json::json;
use std::path::PathBuf;
use std::time::Duration;

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
        let stem = self.file.file_stem().unwrap_or_default().to_string_lossy();
        let dir = match ctx.artifact_path(&format!("script-{stem}")) {
            Some(d) => d,
            None => {
                std::env::temp_dir().join(format!("photon-script-{}-{stem}", std::process::id()))
            }
        };
        let run = crate::script::run(ctx.record, ctx.guests, &self.file, &dir, budget)?;
        let evidence = json!({
            "script": self.file.display().to_string(),
            "exit": run.exit,
            "seconds": run.seconds,
            "subtests": run.subtests,
            "steps": run.steps,
            "stdout": tail(&run.stdout, 40),
            "stderr": tail(&run.stderr, 40),
        });
        let passed = run.subtests.iter().filter(|s| s.passed).count();
        if let Some(f) = run.failed() {
            let msg = f.message.clone().unwrap_or_else(|| "failed".into());
            return Ok(Verdict::fail(
                format!("subtest {:?}: {msg}", f.name),
                evidence,
            ));
        }
        if run.exit != Some(0) {
            let why = format!("python3 exited {:?}: {}", run.exit, tail(&run.stderr, 3));
            return Ok(Verdict::fail(why, evidence));
        }
        Ok(Verdict::pass(format!("{passed} subtests passed"), evidence))
    }
}
