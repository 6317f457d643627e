//! `tcp_open`: a TCP connect from the target node to `host:port`, made by
//! the node's sshd (no client program needed in the guest).

use super::{Check, Ctx, Verdict};
use anyhow::Result;
use serde::Deserialize;
use serde_json::json;
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpOpen {
    port: u16,
    #[serde(default = "loopback")]
    host: String,
}

pub fn loopback() -> String {
    "127.0.0.1".into()
}

impl Check for TcpOpen {
    fn attempt(&self, ctx: &Ctx, target: Option<&str>, budget: Duration) -> Result<Verdict> {
        let guest = ctx.guest(target)?;
        let (host, port) = (&self.host, self.port);
        let evidence = json!({ "from": guest.endpoint.node, "host": host, "port": port });
        Ok(match guest.tcp_connect(host, port, budget)? {
            Ok(()) => Verdict::pass(format!("{host}:{port} accepts connections"), evidence),
            Err(e) => Verdict::fail(format!("{host}:{port}: {e}"), evidence),
        })
    }
}
