//! `host_forward`: an HTTP GET from the host through one of the target's
//! forwards (127.0.0.1:<host port>), the way a user on the workstation
//! reaches the cluster. Judged like `http`.

use super::http::{HttpExpect, host_agent, judge};
use super::{Check, Ctx, Verdict, require_forward};
use crate::spec::{Cluster, Proto};
use anyhow::Result;
use serde::Deserialize;
use serde_json::json;
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostForward {
    forward: String,
    #[serde(default = "slash")]
    path: String,
    #[serde(default)]
    expect: HttpExpect,
}

fn slash() -> String {
    "/".into()
}

impl Check for HostForward {
    fn bind(&mut self, target: Option<&str>, cluster: &Cluster) -> Result<(), String> {
        require_forward(target, cluster, &self.forward, Proto::Tcp)
    }

    fn attempt(&self, ctx: &Ctx, target: Option<&str>, budget: Duration) -> Result<Verdict> {
        let node = ctx.node(target)?;
        let fwd = ctx.forward(node, &self.forward)?;
        let url = format!("http://127.0.0.1:{}{}", fwd.host, self.path);
        let evidence = json!({ "url": url, "forward": format!("{node}/{} {fwd}", self.forward) });
        Ok(match host_agent(budget).get(&url).call() {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                let body = resp.body_mut().read_to_string().unwrap_or_default();
                judge(status, &body, &self.expect, evidence)
            }
            Err(e) => Verdict::fail(format!("{url}: {e}"), evidence),
        })
    }
}
