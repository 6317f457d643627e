//! `fault`: one step of a fault scenario written in a lane file, the same
//! operations as `photon-cluster fault ...` and `restart`:
//!
//! ```toml
//! [[layer.check]]
//! name = "cut-node03"
//! kind = "fault"
//! action = "partition"          # heal, link, crash, pause, resume, restart
//! groups = [["node03"], ["node01", "node02"]]
//! ```
//!
//! It runs once (a fault is not retried) and without a target; its evidence
//! is the switch's state after the step.

use super::{Check, Ctx, Verdict};
use crate::fabric::switch::LinkFault;
use crate::fault;
use crate::spec::Cluster;
use anyhow::Result;
use serde::Deserialize;
use serde_json::json;
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    action: Action,
    /// `partition`: the groups of nodes (selections like `role:control` work).
    #[serde(default)]
    groups: Vec<Vec<String>>,
    /// `link`, `crash`, `pause`, `resume`, `restart`: the node.
    #[serde(default)]
    node: Option<String>,
    /// `link`: the fraction of frames lost (0.0-1.0), added delay, duplicates.
    #[serde(default)]
    loss: f64,
    #[serde(default)]
    delay_ms: u64,
    #[serde(default)]
    duplicate: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Action {
    Partition,
    Heal,
    Link,
    Crash,
    Pause,
    Resume,
    Restart,
}

impl Check for Fault {
    fn bind(&mut self, _target: Option<&str>, cluster: &Cluster) -> Result<(), String> {
        match self.action {
            Action::Partition => {
                if self.groups.len() < 2 {
                    return Err("a partition needs at least two groups".into());
                }
                for g in &mut self.groups {
                    *g = cluster.select(g)?;
                }
            }
            Action::Heal => {}
            _ => {
                let node = self.node.as_deref().ok_or("this action needs `node`")?;
                if cluster.node(node).is_none() {
                    return Err(format!("no node {node:?} in the cluster"));
                }
            }
        }
        for (what, p) in [("loss", self.loss), ("duplicate", self.duplicate)] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("{what} must be between 0.0 and 1.0"));
            }
        }
        Ok(())
    }

    fn attempt(&self, ctx: &Ctx, _target: Option<&str>, budget: Duration) -> Result<Verdict> {
        let record = ctx.record;
        let node = self.node.as_deref().unwrap_or_default();
        let mut evidence = json!({});
        let said = match self.action {
            Action::Partition => fault::partition(record, &self.groups)?,
            Action::Heal => fault::heal(record)?,
            Action::Link => {
                let f = LinkFault {
                    loss: self.loss,
                    delay_ms: self.delay_ms,
                    duplicate: self.duplicate,
                };
                fault::link(record, node, f)?
            }
            Action::Crash => fault::crash(record, node)?,
            Action::Pause => fault::pause(record, node, true)?,
            Action::Resume => fault::pause(record, node, false)?,
            Action::Restart => {
                let (said, secs) = fault::restart(record, node, budget)?;
                ctx.guests.forget(node);
                evidence["ready_after_s"] = json!(secs);
                said
            }
        };
        if let Ok(status) = fault::fabric_status(record) {
            evidence["fabric"] = json!(status);
        }
        Ok(Verdict::pass(said, evidence))
    }
}
