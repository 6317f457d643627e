//! `exec`: a command in the target node, judged by its exit code and output.

use super::{Check, Ctx, Verdict};
use crate::text::tail;
use anyhow::Result;
use serde::Deserialize;
use serde_json::json;
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exec {
    command: String,
    #[serde(default)]
    exit: i32,
    stdout_contains: Option<String>,
    stdout_equals: Option<String>,
}

impl Check for Exec {
    fn attempt(&self, ctx: &Ctx, target: Option<&str>, budget: Duration) -> Result<Verdict> {
        let out = ctx.guest(target)?.exec(&self.command, budget)?;
        let evidence = json!({
            "command": self.command,
            "exit": out.code,
            "stdout": tail(&out.stdout, 40),
            "stderr": tail(&out.stderr, 20),
        });
        let stdout = out.stdout.trim();
        if out.code != self.exit {
            return Ok(Verdict::fail(
                format!("exited {} (expected {})", out.code, self.exit),
                evidence,
            ));
        }
        if let Some(want) = &self.stdout_contains
            && !stdout.contains(want.as_str())
        {
            return Ok(Verdict::fail(format!("stdout lacks {want:?}"), evidence));
        }
        if let Some(want) = &self.stdout_equals
            && stdout != want
        {
            return Ok(Verdict::fail(
                format!("stdout is {stdout:?}, expected {want:?}"),
                evidence,
            ));
        }
        Ok(Verdict::pass(format!("exit {}", out.code), evidence))
    }
}
