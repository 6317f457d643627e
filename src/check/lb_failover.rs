//! `lb_failover`: the load balancer loses a backend to the network. The
//! check cuts `backend`'s link on the fabric (every frame to and from it
//! lost), keeps sending requests from the host through the listener (the
//! `forward` of `node`, where HAProxy runs), and measures:
//!
//! - the time until HAProxy's health checks take the backend out: from the
//!   cut until `streak` requests in a row are all answered by another
//!   backend (requests that hit the dead backend before that fail or time
//!   out; they are counted);
//! - the time until it comes back after the heal: until the backend answers
//!   a request again.
//!
//! The link is restored whatever happens.

use super::{Check, Ctx, Verdict};
use crate::fabric::switch::LinkFault;
use crate::fault;
use crate::spec::{Cluster, Proto};
use crate::wait::{Pause, Probe, Wait};
use anyhow::Result;
use serde::Deserialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LbFailover {
    /// The node whose load balancer is tested, and the forward to its listener.
    node: String,
    #[serde(default = "default_forward")]
    forward: String,
    /// The path requested through the listener.
    #[serde(default = "default_path")]
    path: String,
    /// The backend node whose link is cut; its answers end with its name.
    backend: String,
    /// Requests in a row that must avoid the cut backend.
    #[serde(default = "crate::spec::default::u32::<8>")]
    streak: u32,
}

fn default_forward() -> String {
    "haproxy".into()
}
fn default_path() -> String {
    "/".into()
}

impl Check for LbFailover {
    fn bind(&mut self, _target: Option<&str>, cluster: &Cluster) -> Result<(), String> {
        if cluster.node(&self.backend).is_none() {
            return Err(format!("no node {:?} in the cluster", self.backend));
        }
        if self.node == self.backend {
            return Err(
                "the load balancer's node must not be the backend whose link is cut".into(),
            );
        }
        super::require_forward(Some(&self.node), cluster, &self.forward, Proto::Tcp)
    }

    fn attempt(&self, ctx: &Ctx, _target: Option<&str>, budget: Duration) -> Result<Verdict> {
        let port = ctx.forward(&self.node, &self.forward)?.host;
        let listener = format!("http://127.0.0.1:{port}{}", self.path);
        let listener_client = Listener {
            url: listener.clone(),
            agent: super::http::host_agent(Duration::from_secs(2)),
        };
        let half = budget / 2;
        let mut ev = json!({ "listener": listener, "node": self.node, "backend": self.backend });
        let before = self.request(&listener_client)?;
        ev["before"] = json!(before);
        let cut = LinkFault {
            loss: 1.0,
            ..LinkFault::default()
        };
        ev["cut"] = json!(fault::link(ctx.record, &self.backend, cut)?);
        let dropped = self.until(&listener_client, half, |run, who| {
            *run = if who.as_deref().is_some_and(|w| w != self.backend) {
                *run + 1
            } else {
                0
            };
            *run >= self.streak
        });
        let restored = fault::link(ctx.record, &self.backend, LinkFault::default());
        let (drop_s, drop_answers) = dropped?;
        restored?;
        ev["dropped"] = json!({ "seconds": drop_s, "answers": drop_answers });
        let (back_s, back_answers) = self.until(&listener_client, half, |_, who| {
            who.as_deref() == Some(self.backend.as_str())
        })?;
        ev["returned"] = json!({ "seconds": back_s, "answers": back_answers });
        let (Some(drop_s), Some(back_s)) = (drop_s, back_s) else {
            let what = if drop_s.is_none() {
                format!(
                    "{} requests in a row never avoided the cut {} within {:.0} s",
                    self.streak,
                    self.backend,
                    half.as_secs_f64()
                )
            } else {
                format!(
                    "{} did not come back within {:.0} s of the heal",
                    self.backend,
                    half.as_secs_f64()
                )
            };
            return Ok(Verdict::fail(what, ev));
        };
        Ok(Verdict::pass(
            format!(
                "{} cut: traffic avoided it after {drop_s:.1} s ({} failed requests); \
                 back {back_s:.1} s after the heal",
                self.backend,
                drop_answers.get("(failed)").copied().unwrap_or(0)
            ),
            ev,
        ))
    }
}

/// The listener as the host reaches it.
struct Listener {
    url: String,
    agent: ureq::Agent,
}

impl LbFailover {
    /// One request through the listener: the answering backend's name (the
    /// last word of its page), or None when the request failed.
    fn request(&self, l: &Listener) -> Result<Option<String>> {
        let answer = l.agent.get(&l.url).call().ok().and_then(|mut r| {
            (r.status().as_u16() == 200)
                .then(|| r.body_mut().read_to_string().ok())
                .flatten()
        });
        Ok(answer.and_then(|text| text.split_whitespace().last().map(String::from)))
    }

    /// Sends requests until `done` says so or `within` passes; returns the
    /// seconds it took (None: never) and who answered how often.
    fn until(
        &self,
        l: &Listener,
        within: Duration,
        mut done: impl FnMut(&mut u32, &Option<String>) -> bool,
    ) -> Result<(Option<f64>, BTreeMap<String, u32>)> {
        let t = Instant::now();
        let mut answers = BTreeMap::new();
        let mut run = 0;
        let took = Wait::new(format!("requests to {}", l.url), within)
            .pause(Pause::Every(Duration::from_millis(100)))
            .run_or_none(|| {
                let who = self.request(l)?;
                let name = who.clone().unwrap_or_else(|| "(failed)".into());
                *answers.entry(name).or_insert(0) += 1;
                Ok(if done(&mut run, &who) {
                    Probe::Done(t.elapsed().as_secs_f64())
                } else {
                    Probe::Pending("not yet".into())
                })
            })?;
        Ok((took, answers))
    }
}
