//! `port_closed`: a TCP connect from the target node to `host:port` is
//! refused. Proves that a service is not reachable where it must not be
//! (a stopped server, a port a firewall closes, a listener bound elsewhere).

use super::{Check, Ctx, Verdict};
use anyhow::Result;
use serde::Deserialize;
use serde_json::json;
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortClosed {
    port: u16,
    #[serde(default = "super::tcp_open::loopback")]
    host: String,
}

impl Check for PortClosed {
    fn attempt(&self, ctx: &Ctx, target: Option<&str>, budget: Duration) -> Result<Verdict> {
        let guest = ctx.guest(target)?;
        let (host, port) = (&self.host, self.port);
        let mut evidence = json!({ "from": guest.endpoint.node, "host": host, "port": port });
        Ok(match guest.tcp_connect(host, port, budget)? {
            Ok(()) => Verdict::fail(format!("{host}:{port} accepts connections"), evidence),
            Err(refused) => {
                evidence["refused"] = json!(refused);
                Verdict::pass(format!("{host}:{port} refuses connections"), evidence)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_fields_with_the_loopback_default() {
        let t: toml::Table = toml::from_str("port = 6380").unwrap();
        let c: PortClosed = toml::Value::Table(t).try_into().unwrap();
        assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 6380));
        let t: toml::Table = toml::from_str("port = 1\nhots = \"x\"").unwrap();
        assert!(toml::Value::Table(t).try_into::<PortClosed>().is_err());
    }
}
