//! `unit_active`: systemd units are active on the target (default: the
//! node's `units` from the cluster file); a unit that is not brings the
//! tail of its journal as evidence.

use super::{Check, Ctx, Verdict};
use crate::text::shell_quote;
use anyhow::Result;
use serde::Deserialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnitActive {
    #[serde(default)]
    units: Vec<String>,
}

impl Check for UnitActive {
    fn attempt(&self, ctx: &Ctx, target: Option<&str>, budget: Duration) -> Result<Verdict> {
        let node = ctx.node(target)?;
        let guest = ctx.guest(target)?;
        let units: Vec<String> = if self.units.is_empty() {
            ctx.record
                .nodes
                .get(node)
                .map(|n| n.units.clone())
                .unwrap_or_default()
        } else {
            self.units.clone()
        };
        let states: BTreeMap<String, String> = crate::guest::unit_states(&guest, &units)?
            .into_iter()
            .collect();
        let bad: Vec<String> = states
            .iter()
            .filter(|(_, s)| *s != "active")
            .map(|(u, s)| format!("{u} is {s}"))
            .collect();
        let mut evidence = json!({ "units": states });
        let Some((first, _)) = states.iter().find(|(_, s)| *s != "active") else {
            return Ok(Verdict::pass(
                format!("{} units active", states.len()),
                evidence,
            ));
        };
        let journal = guest
            .exec(
                &format!(
                    "journalctl -b -u {} -n 15 --no-pager -o short-precise",
                    shell_quote(first)
                ),
                budget,
            )
            .map(|o| o.stdout)
            .unwrap_or_default();
        evidence["journal_tail"] = json!(journal);
        Ok(Verdict::fail(bad.join(", "), evidence))
    }
}
