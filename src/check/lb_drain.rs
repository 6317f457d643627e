//! Load balancer (the fiberlb part): a listener's backend is drained through
//! HAProxy's runtime API and restored, and traffic must follow both times.
//!
//! From inside the target node: `requests` HTTP requests through the
//! frontend, counted by the backend that answered (each backend names
//! itself in its body). Before the drain the server must be answering;
//! after `set server <backend>/<server> state drain` a whole round must
//! avoid it; after `state ready` it must answer again. The evidence keeps
//! each round's distribution, the runtime API's server state per phase,
//! and how long drain and re-convergence took.

use super::{Check, Ctx, Verdict};
use crate::guest::Guest;
use crate::text::shell_quote;
use crate::wait::{Pause, Probe, Wait};
use anyhow::Result;
use serde::Deserialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// `lb_drain`: drain a load balancer backend server through HAProxy's
/// runtime API, then restore it; traffic through `frontend` must follow
/// both times.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LbDrain {
    #[serde(default = "lb_frontend")]
    frontend: String,
    #[serde(default = "lb_runtime")]
    runtime: String,
    backend: String,
    server: String,
    #[serde(default = "crate::spec::default::u32::<8>")]
    requests: u32,
}

fn lb_frontend() -> String {
    "http://127.0.0.1/".into()
}
fn lb_runtime() -> String {
    "127.0.0.1:9999".into()
}

impl Check for LbDrain {
    fn attempt(&self, ctx: &Ctx, target: Option<&str>, budget: Duration) -> Result<Verdict> {
        let d = Drain {
            frontend: &self.frontend,
            runtime: &self.runtime,
            backend: &self.backend,
            server: &self.server,
            requests: self.requests,
        };
        drain(&*ctx.guest(target)?, &d, budget)
    }
}

pub struct Drain<'a> {
    pub frontend: &'a str,
    pub runtime: &'a str,
    pub backend: &'a str,
    pub server: &'a str,
    pub requests: u32,
}

impl Drain<'_> {
    /// One round of requests: answers counted by the node named in the body.
    fn round(&self, guest: &Guest) -> Result<BTreeMap<String, u32>> {
        let out = guest.succeed(
            &format!(
                "for i in $(seq {}); do curl -s -m 5 {}; echo; done",
                self.requests,
                shell_quote(self.frontend)
            ),
            Duration::from_secs(10 + 6 * self.requests as u64),
        )?;
        let mut seen = BTreeMap::new();
        for line in out.lines().filter(|l| !l.trim().is_empty()) {
            let who = line.split_whitespace().last().unwrap_or("?").to_string();
            *seen.entry(who).or_insert(0) += 1;
        }
        Ok(seen)
    }

    fn runtime(&self, guest: &Guest, command: &str) -> Result<String> {
        let (host, port) = self
            .runtime
            .rsplit_once(':')
            .unwrap_or((self.runtime, "9999"));
        guest.succeed(
            &format!(
                "echo {} | socat stdio TCP:{host}:{port}",
                shell_quote(command)
            ),
            Duration::from_secs(15),
        )
    }

    /// The runtime API's line for the server (`show servers state`).
    fn state(&self, guest: &Guest) -> Result<String> {
        let all = self.runtime(guest, &format!("show servers state {}", self.backend))?;
        Ok(all
            .lines()
            .find(|l| l.split_whitespace().nth(3) == Some(self.server))
            .unwrap_or("")
            .to_string())
    }

    /// Rounds until `ok` holds for one, or `budget` runs out: the seconds,
    /// every round, and whether `ok` held for the last.
    fn until(
        &self,
        guest: &Guest,
        budget: Duration,
        ok: impl Fn(&Round) -> bool,
    ) -> Result<(f64, Vec<Round>, bool)> {
        let started = Instant::now();
        let mut rounds = Vec::new();
        // Rounds back to back: each is a burst of requests, the pause itself.
        let done = Wait::new(format!("rounds of requests to {}", self.frontend), budget)
            .pause(Pause::Every(Duration::ZERO))
            .run_or_none(|| {
                let r = self.round(guest)?;
                let done = ok(&r);
                rounds.push(r);
                Ok(if done {
                    Probe::Done(())
                } else {
                    Probe::Pending("condition not met in the last round".into())
                })
            })?
            .is_some();
        Ok((started.elapsed().as_secs_f64(), rounds, done))
    }
}

/// Answers per backend in one round of requests.
type Round = BTreeMap<String, u32>;

pub fn drain(guest: &Guest, d: &Drain, budget: Duration) -> Result<Verdict> {
    let set = |state: &str| format!("set server {}/{} state {state}", d.backend, d.server);
    let hits = |r: &Round| r.get(d.server).copied().unwrap_or(0);
    let mut evidence = json!({ "frontend": d.frontend, "backend": d.backend, "server": d.server });
    let before = d.round(guest)?;
    evidence["before"] = json!({ "answers": before, "server_state": d.state(guest)? });
    if hits(&before) == 0 {
        return Ok(Verdict::fail(
            format!(
                "{} answered none of {} requests before the drain",
                d.server, d.requests
            ),
            evidence,
        ));
    }
    let phase = budget / 2;
    d.runtime(guest, &set("drain"))?;
    let drained = d.until(guest, phase, |r| hits(r) == 0 && !r.is_empty());
    // Restore whatever happened, so a failure leaves the listener whole.
    let restore = d.runtime(guest, &set("ready"));
    let (drain_s, drain_rounds, drained_ok) = drained?;
    restore?;
    let drained_last = json!(drain_rounds.last());
    evidence["drained"] = json!({ "seconds": drain_s, "rounds": drain_rounds });
    let (restore_s, restore_rounds, restored_ok) = d.until(guest, phase, |r| hits(r) > 0)?;
    let restored_last = json!(restore_rounds.last());
    evidence["restored"] = json!({
        "seconds": restore_s,
        "rounds": restore_rounds,
        "server_state": d.state(guest)?,
    });
    if !drained_ok {
        return Ok(Verdict::fail(
            format!(
                "{} still answered after the drain ({drain_s:.1} s)",
                d.server
            ),
            evidence,
        ));
    }
    if !restored_ok {
        return Ok(Verdict::fail(
            format!(
                "{} did not answer again after restore ({restore_s:.1} s)",
                d.server
            ),
            evidence,
        ));
    }
    Ok(Verdict::pass(
        format!(
            "{} drained in {drain_s:.1} s (answers {drained_last}), back in {restore_s:.1} s \
             (answers {restored_last})",
            d.server
        ),
        evidence,
    ))
}
