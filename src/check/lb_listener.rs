//! Listeners published at runtime (the FiberLB part): a new frontend on a
//! new port, with its own backend pool, is added to every load balancer
//! while the cluster runs, carries traffic on each, follows a backend drain
//! and restore, and is retracted until the port no longer answers.
//!
//! HAProxy cannot add a frontend through its runtime API, so publishing is
//! what an operator of a stock HAProxy does: a file in the directory it
//! also loads (`/etc/haproxy/listeners.d`, images/debian/roles/control.sh),
//! validated with `haproxy -c` and applied with a seamless reload. The file,
//! the validation and the runtime API's view of the new pool are evidence.

use super::lb_drain::{Drain, drain};
use super::procedure::Procedure;
use super::{Check, Ctx, Verdict};
use crate::spec::Cluster;
use crate::text::shell_quote;
use anyhow::{Result, bail};
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// `lb_listener`: publish listener `name` on `port` of every balancer with
/// `backends`, prove traffic through each, drain and restore `drain`,
/// retract it and prove the port closed.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LbListener {
    #[serde(default = "default_name")]
    name: String,
    #[serde(default = "crate::spec::default::u16::<8090>")]
    port: u16,
    /// The nodes running the load balancer; default: every node that runs
    /// haproxy.service.
    #[serde(default)]
    balancers: Vec<String>,
    /// The web backends; each must run nginx.service (port 8080).
    backends: Vec<String>,
    /// The backend to drain and restore; default: the first.
    #[serde(default)]
    drain: Option<String>,
}

fn default_name() -> String {
    "runtime".into()
}

const BALANCER_UNIT: &str = "haproxy.service";
const BACKEND_UNIT: &str = "nginx.service";
const BACKEND_PORT: u16 = 8080;
/// Ports the stock configuration already binds (services/haproxy/haproxy.cfg).
const TAKEN: &[u16] = &[80, 8404, 9999];
const DIR: &str = "/etc/haproxy/listeners.d";

impl Check for LbListener {
    fn bind(&mut self, _target: Option<&str>, cluster: &Cluster) -> Result<(), String> {
        if self.balancers.is_empty() {
            self.balancers = cluster
                .nodes
                .iter()
                .filter(|n| n.runs(BALANCER_UNIT))
                .map(|n| n.name.clone())
                .collect();
        }
        for b in &self.balancers {
            cluster.node_running(b, BALANCER_UNIT, "balancer")?;
        }
        if self.balancers.is_empty() {
            return Err("no node of the cluster runs haproxy.service".into());
        }
        if self.backends.is_empty() {
            return Err("a listener needs at least one backend".into());
        }
        for b in &self.backends {
            cluster.node_running(b, BACKEND_UNIT, "backend")?;
        }
        let drain = self.drain.get_or_insert_with(|| self.backends[0].clone());
        if !self.backends.contains(drain) {
            return Err(format!(
                "drain {drain:?} is not one of the listener's backends"
            ));
        }
        if TAKEN.contains(&self.port) || self.port < 1024 {
            return Err(format!(
                "port {} is taken by the stock listeners or privileged",
                self.port
            ));
        }
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(format!(
                "listener name {:?}: use letters, digits and '_'",
                self.name
            ));
        }
        Ok(())
    }

    fn attempt(&self, ctx: &Ctx, _target: Option<&str>, budget: Duration) -> Result<Verdict> {
        let evidence =
            json!({ "listener": self.name, "port": self.port, "config": self.config(ctx.cluster) });
        Ok(Procedure::new(ctx, &self.balancers[0], budget)?.conclude(
            |run| self.lifecycle(ctx, run),
            // Retract whatever happened, so a failure leaves no listener.
            |run| {
                for b in &self.balancers {
                    run.step(
                        "teardown",
                        "retract the listener",
                        Some(b),
                        &self.retract_cmd(),
                    )?;
                }
                Ok(())
            },
            evidence,
        ))
    }
}

impl LbListener {
    fn pool(&self) -> String {
        format!("{}_pool", self.name)
    }

    /// The listener's configuration, as published on every balancer.
    fn config(&self, cluster: &Cluster) -> String {
        let mut s = format!(
            "frontend {n}\n    bind :{p}\n    default_backend {pool}\nbackend {pool}\n    balance roundrobin\n    option httpchk GET /healthz\n",
            n = self.name,
            p = self.port,
            pool = self.pool()
        );
        for b in &self.backends {
            let addr = cluster
                .node(b)
                .map(|n| n.address.to_string())
                .unwrap_or_default();
            s.push_str(&format!(
                "    server {b} {addr}:{BACKEND_PORT} check inter 2s\n"
            ));
        }
        s
    }

    fn publish_cmd(&self, cluster: &Cluster) -> String {
        format!(
            "set -e; printf '%s' {cfg} > {DIR}/{n}.cfg; \
             haproxy -c -f /etc/haproxy/haproxy.cfg -f {DIR}; systemctl reload haproxy; \
             systemctl show -p ExecMainPID -p ActiveState haproxy",
            cfg = shell_quote(&self.config(cluster)),
            n = self.name
        )
    }

    fn retract_cmd(&self) -> String {
        format!("rm -f {DIR}/{}.cfg && systemctl reload haproxy", self.name)
    }

    /// A request from inside `node` to its own published port, by address
    /// (through the fabric-facing socket, as another node would come in).
    fn probe(&self, ctx: &Ctx, node: &str) -> String {
        let addr = ctx
            .cluster
            .node(node)
            .map(|n| n.address.to_string())
            .unwrap_or_default();
        format!("curl -sS -m 3 http://{addr}:{}/", self.port)
    }

    /// Closed before, published and validated, carrying traffic on each
    /// balancer; drained and restored on the first; retracted and closed.
    fn lifecycle(&self, ctx: &Ctx, run: &mut Procedure) -> Result<String> {
        for b in &self.balancers {
            let (answered, _) = run.step(
                "closed-before",
                "port closed before",
                Some(b),
                &self.probe(ctx, b),
            )?;
            if answered {
                bail!(
                    "{b} already answers on port {} before publication",
                    self.port
                );
            }
        }
        for b in &self.balancers {
            run.must(
                "publish",
                "publish the listener",
                Some(b),
                &self.publish_cmd(ctx.cluster),
            )?;
        }
        let mut traffic = serde_json::Map::new();
        for b in &self.balancers {
            let limit = run.deadline().saturating_duration_since(Instant::now());
            let secs = run.until(
                "traffic",
                "traffic through the listener",
                Some(b),
                &self.probe(ctx, b),
                true,
                limit,
            )?;
            let answer = run.last_output().trim().to_string();
            traffic.insert(
                b.clone(),
                json!({ "answer": answer, "seconds_after_publication": secs }),
            );
            run.note("traffic", Value::Object(traffic.clone()));
            let show = format!(
                "echo 'show stat {} -1 -1' | socat stdio TCP:127.0.0.1:9999",
                self.pool()
            );
            run.step(
                "runtime-view",
                "the runtime API's view of the pool",
                Some(b),
                &show,
            )?;
        }
        let first = &self.balancers[0];
        let left = run.deadline().saturating_duration_since(Instant::now());
        let drained = drain(
            &*ctx.guests.get(first)?,
            &Drain {
                frontend: &format!("http://127.0.0.1:{}/", self.port),
                runtime: "127.0.0.1:9999",
                backend: &self.pool(),
                server: self.drain.as_deref().unwrap_or(&self.backends[0]),
                requests: 4 * self.backends.len() as u32,
            },
            left.min(Duration::from_secs(120)),
        )?;
        run.note("drain", json!({ "node": first, "outcome": drained.outcome, "message": drained.message, "evidence": drained.evidence }));
        if drained.outcome != super::Outcome::Pass {
            bail!("drain on {first}: {}", drained.message);
        }
        let mut closed = serde_json::Map::new();
        for b in &self.balancers {
            run.must(
                "retract",
                "retract the listener",
                Some(b),
                &self.retract_cmd(),
            )?;
            let limit = run.deadline().saturating_duration_since(Instant::now());
            let secs = run.until(
                "closed-after",
                "port closed after",
                Some(b),
                &self.probe(ctx, b),
                false,
                limit,
            )?;
            let answer = run.last_output().trim().to_string();
            closed.insert(b.clone(), json!({ "answer": answer, "seconds": secs }));
            run.note("closed", Value::Object(closed.clone()));
        }
        Ok(format!(
            "listener {} on :{} published on {} (traffic on each), drained and restored {} on {first}, retracted and closed everywhere",
            self.name,
            self.port,
            self.balancers.join(", "),
            self.drain.as_deref().unwrap_or("?"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> LbListener {
        toml::from_str(&format!("backends = [\"node04\", \"node05\"]\n{extra}")).unwrap()
    }

    #[test]
    fn binds_to_every_balancer_and_renders_the_listener() {
        let cluster = Cluster::profile("reference").unwrap();
        let mut l = parse("");
        l.bind(None, &cluster).unwrap();
        assert_eq!(l.balancers, ["node01", "node02", "node03"]);
        assert_eq!(l.drain.as_deref(), Some("node04"));
        let cfg = l.config(&cluster);
        assert!(cfg.contains("bind :8090"), "{cfg}");
        assert!(cfg.contains("server node05 10.77.0.15:8080 check"), "{cfg}");
    }

    #[test]
    fn refuses_unknown_backends_balancers_and_taken_ports() {
        let cluster = Cluster::profile("reference").unwrap();
        let err = |extra: &str, backends: &[&str]| {
            let mut l = parse(extra);
            l.backends = backends.iter().map(|s| s.to_string()).collect();
            l.bind(None, &cluster).unwrap_err()
        };
        assert!(err("", &["node04", "node09"]).contains("backend \"node09\" is no node"));
        assert!(err("", &["node01"]).contains("backend node01 does not run nginx.service"));
        assert!(
            err("balancers = [\"node04\"]", &["node04"])
                .contains("balancer node04 does not run haproxy")
        );
        assert!(err("port = 8404", &["node04"]).contains("taken"));
        assert!(err("drain = \"node05\"", &["node04"]).contains("not one of"));
    }
}
