//! Procedures: checks that are a sequence of labelled steps on nodes
//! (create, prove, break, heal, delete), as the provider lifecycles are.
//!
//! A step is a command on a node, or an `until` condition that repeats a
//! command through the one wait helper (its deadline, Ctrl-C, the global
//! `--timeout`). Every step is kept as a typed [`Step`] record: a stable
//! id that tests and tools match on, a label a person reads, the node, the
//! command, its exit code and output, when it started and how long it took.
//! When the body fails, or the run is interrupted, the procedure's teardown
//! runs (its steps run through the interrupt: a teardown is bounded work
//! that leaves the cluster as it was) and is kept as steps too.

use super::{Ctx, Verdict};
use crate::guest::Guest;
use crate::wait::{Pause, Probe, Wait};
use anyhow::{Result, bail};
use serde::Serialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long one command of a teardown may run: a teardown is bounded work.
const TEARDOWN_COMMAND: Duration = Duration::from_secs(60);
/// The least a step's command gets, even when the check's budget is spent
/// (its own deadline then ends the procedure at the next wait).
const MIN_COMMAND: Duration = Duration::from_secs(5);

/// One step of a procedure, as it appears in the evidence (`steps`).
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// Stable, for matching: `create-router`, `traffic-blocked`, ...
    pub id: String,
    /// For a person: "create router (VPC)".
    pub label: String,
    pub node: String,
    pub command: String,
    pub exit: i32,
    /// Stdout then stderr, trailing blank lines trimmed.
    pub output: String,
    /// Seconds since the procedure began.
    pub at_s: f64,
    pub seconds: f64,
    /// `ok`, `failed` (a step whose failure ends the procedure, or a try
    /// of an `until` that did not hold yet), or `teardown`.
    pub outcome: &'static str,
}

/// A procedure in progress on the nodes of one check.
pub struct Procedure<'a> {
    ctx: &'a Ctx<'a>,
    /// The node a step without one runs on (the OVN central, the bundle's
    /// worker); none for a procedure the driver runs from the host.
    home: Option<Arc<Guest>>,
    began: Instant,
    deadline: Instant,
    steps: Vec<Step>,
    /// Findings beside the steps (an answer, a time), merged into the
    /// evidence by [`Procedure::conclude`].
    notes: serde_json::Map<String, Value>,
    /// Set while the teardown runs: its steps run even after Ctrl-C.
    tearing_down: bool,
}

impl<'a> Procedure<'a> {
    /// A procedure whose steps default to `home`, ending by `budget`.
    pub fn new(ctx: &'a Ctx<'a>, home: &str, budget: Duration) -> Result<Self> {
        let mut run = Procedure::on_host(ctx, budget);
        run.home = Some(ctx.guests.get(home)?);
        Ok(run)
    }

    /// A procedure whose steps the driver takes from the host (protocol
    /// exchanges through the nodes' forwards: [`Procedure::host`]); steps
    /// on a node must name it.
    pub fn on_host(ctx: &'a Ctx<'a>, budget: Duration) -> Self {
        Procedure {
            ctx,
            home: None,
            began: Instant::now(),
            deadline: Instant::now() + budget,
            steps: Vec::new(),
            notes: serde_json::Map::new(),
            tearing_down: false,
        }
    }

    /// The check's deadline, for waits of a procedure's own.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// What is left of the check's budget.
    pub fn left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// The output of the last step run (an `until`'s last try: what held).
    pub fn last_output(&self) -> &str {
        self.steps.last().map_or("", |s| s.output.as_str())
    }

    /// Keeps a finding beside the steps, as `evidence[key]`.
    pub fn note(&mut self, key: &str, value: Value) {
        self.notes.insert(key.to_string(), value);
    }

    /// Keeps the fields of `findings` (an object) in `evidence[outer]`,
    /// beside those kept there before.
    pub fn note_in(&mut self, outer: &str, findings: Value) {
        let slot = self
            .notes
            .entry(outer.to_string())
            .or_insert_with(|| json!({}));
        if let (Some(slot), Value::Object(new)) = (slot.as_object_mut(), findings) {
            slot.extend(new);
        }
    }

    /// Runs `command` on `node` (None: the home node) and keeps it as a
    /// step; returns whether it exited 0, and its output.
    pub fn step(
        &mut self,
        id: &str,
        label: &str,
        node: Option<&str>,
        command: &str,
    ) -> Result<(bool, String)> {
        let (ok, output, _) = self.exec(id, label, node, command)?;
        Ok((ok, output))
    }

    /// A step: whether it exited 0, its whole output, and its stdout alone.
    fn exec(
        &mut self,
        id: &str,
        label: &str,
        node: Option<&str>,
        command: &str,
    ) -> Result<(bool, String, String)> {
        if crate::interrupted() && !self.tearing_down {
            return Err(crate::stop_error());
        }
        let guest = match (node, &self.home) {
            (Some(n), _) => self.ctx.guests.get(n)?,
            (None, Some(home)) => home.clone(),
            (None, None) => bail!("step {id}: a procedure run from the host names its node"),
        };
        let at = Instant::now();
        // A step may take what is left of the check's budget: one slow
        // command on a loaded host (podman's first `kube play` took over
        // 120 s at a load of 15) is not a failure while the check has time.
        let limit = if self.tearing_down {
            TEARDOWN_COMMAND
        } else {
            self.deadline
                .saturating_duration_since(Instant::now())
                .max(MIN_COMMAND)
        };
        let out = guest.exec(command, limit)?;
        let output = format!("{}{}", out.stdout, out.stderr)
            .trim_end()
            .to_string();
        let outcome = match (self.tearing_down, out.ok()) {
            (true, _) => "teardown",
            (false, true) => "ok",
            (false, false) => "failed",
        };
        self.steps.push(Step {
            id: id.to_string(),
            label: label.to_string(),
            node: guest.endpoint.node.clone(),
            command: command.to_string(),
            exit: out.code,
            output: output.clone(),
            at_s: (at - self.began).as_secs_f64(),
            seconds: at.elapsed().as_secs_f64(),
            outcome,
        });
        Ok((out.ok(), output, out.stdout))
    }

    /// A step the driver takes itself, from the host (an exchange through a
    /// node's forward): kept with node `host`, `what` as its command and
    /// what `f` said as its output. `f` says `Ok(said)` when the step held;
    /// `Err(said)` ends the procedure with the label and what it said.
    pub fn host(
        &mut self,
        id: &str,
        label: &str,
        what: &str,
        f: impl FnOnce() -> std::result::Result<String, String>,
    ) -> Result<String> {
        if crate::interrupted() && !self.tearing_down {
            return Err(crate::stop_error());
        }
        let at = Instant::now();
        let said = f();
        let output = match &said {
            Ok(s) | Err(s) => s.clone(),
        };
        self.steps.push(Step {
            id: id.to_string(),
            label: label.to_string(),
            node: "host".into(),
            command: what.to_string(),
            exit: if said.is_ok() { 0 } else { 1 },
            output,
            at_s: (at - self.began).as_secs_f64(),
            seconds: at.elapsed().as_secs_f64(),
            outcome: match (self.tearing_down, said.is_ok()) {
                (true, _) => "teardown",
                (false, true) => "ok",
                (false, false) => "failed",
            },
        });
        said.map_err(|s| anyhow::anyhow!("{label}: {s}"))
    }

    /// Like [`Procedure::step`], but a failure ends the procedure with the
    /// step's label and the last line of its output.
    pub fn must(
        &mut self,
        id: &str,
        label: &str,
        node: Option<&str>,
        command: &str,
    ) -> Result<String> {
        Ok(self.succeeded(id, label, node, command)?.0)
    }

    /// Like [`Procedure::must`], but returns stdout alone (for a listing
    /// that stderr's warnings must not pollute).
    pub fn must_stdout(
        &mut self,
        id: &str,
        label: &str,
        node: Option<&str>,
        command: &str,
    ) -> Result<String> {
        Ok(self.succeeded(id, label, node, command)?.1)
    }

    /// A step that must exit 0: its whole output and its stdout.
    fn succeeded(
        &mut self,
        id: &str,
        label: &str,
        node: Option<&str>,
        command: &str,
    ) -> Result<(String, String)> {
        match self.exec(id, label, node, command)? {
            (true, out, stdout) => Ok((out, stdout)),
            (false, out, _) => bail!("{label} failed: {}", last_line(&out)),
        }
    }

    /// Repeats `command` until its success equals `want`, for at most
    /// `limit` and never past the check's deadline; every try is a step.
    /// Returns the seconds it took.
    pub fn until(
        &mut self,
        id: &str,
        label: &str,
        node: Option<&str>,
        command: &str,
        want: bool,
        limit: Duration,
    ) -> Result<f64> {
        let still = if want {
            "still failing"
        } else {
            "still succeeding"
        };
        let every = Duration::from_secs(2);
        let tries = Tries {
            id,
            label,
            node,
            command,
            limit,
            every,
            still,
        };
        Ok(self
            .repeat(tries, |ok, _| Ok((ok == want).then_some(())))?
            .1)
    }

    /// Repeats `command` every `every` until `holds` finds in its stdout
    /// what it waits for, for at most `limit` and never past the check's
    /// deadline; every try is a step (a try that did not hold is
    /// `failed`). Returns what `holds` found and the seconds it took.
    #[allow(clippy::too_many_arguments)]
    pub fn watch<T>(
        &mut self,
        id: &str,
        label: &str,
        node: Option<&str>,
        command: &str,
        limit: Duration,
        every: Duration,
        mut holds: impl FnMut(&str) -> Result<Option<T>>,
    ) -> Result<(T, f64)> {
        let still = "not yet";
        let tries = Tries {
            id,
            label,
            node,
            command,
            limit,
            every,
            still,
        };
        self.repeat(
            tries,
            |ok, stdout| if ok { holds(stdout) } else { Ok(None) },
        )
    }

    /// The one loop of [`Procedure::until`] and [`Procedure::watch`],
    /// through the wait helper; `found` looks at each try's exit and stdout.
    fn repeat<T>(
        &mut self,
        t: Tries,
        mut found: impl FnMut(bool, &str) -> Result<Option<T>>,
    ) -> Result<(T, f64)> {
        let started = Instant::now();
        let got = Wait::new(t.label, Duration::ZERO)
            .until((started + t.limit).min(self.deadline))
            .pause(Pause::Every(t.every))
            .run(|| {
                let (ok, out, stdout) = self.exec(t.id, t.label, t.node, t.command)?;
                Ok(match found(ok, &stdout)? {
                    Some(v) => Probe::Done(v),
                    None => {
                        if let Some(s) = self.steps.last_mut() {
                            s.outcome = "failed";
                        }
                        Probe::Pending(format!("{}: {}", t.still, last_line(&out)))
                    }
                })
            })?;
        Ok((got, started.elapsed().as_secs_f64()))
    }

    /// Runs `body`; when it fails (Ctrl-C and `--timeout` included), runs
    /// `teardown` through the interrupt, keeping its steps. The verdict
    /// carries `evidence` with the steps added as `steps`.
    pub fn conclude(
        mut self,
        body: impl FnOnce(&mut Self) -> Result<String>,
        teardown: impl FnOnce(&mut Self) -> Result<()>,
        mut evidence: Value,
    ) -> Verdict {
        let outcome = body(&mut self);
        if outcome.is_err() {
            self.tearing_down = true;
            if let Err(e) = teardown(&mut self) {
                tracing::warn!("teardown after a failed procedure: {e:#}");
            }
        }
        for (key, value) in std::mem::take(&mut self.notes) {
            evidence[key] = value;
        }
        evidence["steps"] = serde_json::to_value(&self.steps).unwrap_or_default();
        match outcome {
            Ok(summary) => Verdict::pass(summary, evidence),
            Err(failure) => Verdict::fail(failure.to_string(), evidence),
        }
    }
}

/// What a repeated step is: its command on its node, how long and how
/// often it is tried, and what a try that did not hold says.
struct Tries<'s> {
    id: &'s str,
    label: &'s str,
    node: Option<&'s str>,
    command: &'s str,
    limit: Duration,
    every: Duration,
    still: &'s str,
}

/// The last non-blank line of a command's output, for one-line messages.
pub fn last_line(s: &str) -> &str {
    s.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no output")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_line_skips_blank_lines() {
        assert_eq!(last_line("a\nb\n\n  \n"), "b");
        assert_eq!(last_line(""), "no output");
    }

    #[test]
    fn steps_serialize_with_their_id_and_outcome() {
        let s = Step {
            id: "create-router".into(),
            label: "create router (VPC)".into(),
            node: "node01".into(),
            command: "ovn-nbctl lr-add x".into(),
            exit: 0,
            output: String::new(),
            at_s: 0.5,
            seconds: 0.1,
            outcome: "ok",
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["id"], "create-router");
        assert_eq!(v["outcome"], "ok");
        assert_eq!(v["node"], "node01");
    }
}
