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
    #[serde(default = "default_port")]
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
fn default_port() -> u16 {
    8090
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
        let deadline = Instant::now() + budget;
        let mut ev =
            json!({ "listener": self.name, "port": self.port, "config": self.config(ctx.cluster) });
        match self.lifecycle(ctx, deadline, &mut ev) {
            Ok(summary) => Ok(Verdict::pass(summary, ev)),
            Err(e) => {
                // Retract whatever happened, so a failure leaves no listener.
                for b in &self.balancers {
                    if let Ok(g) = ctx.guests.get(b) {
                        let _ = g.exec(&self.retract_cmd(), Duration::from_secs(30));
                    }
                }
                Ok(Verdict::fail(e.to_string(), ev))
            }
        }
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

    fn lifecycle(&self, ctx: &Ctx, deadline: Instant, ev: &mut Value) -> Result<String> {
        let left = || deadline.saturating_duration_since(Instant::now());
        for b in &self.balancers {
            let g = ctx.guests.get(b)?;
            let out = g.exec(&self.probe(ctx, b), Duration::from_secs(10))?;
            ev["before"][b] = json!(out.stderr.trim());
            if out.ok() {
                bail!(
                    "{b} already answers on port {} before publication",
                    self.port
                );
            }
        }
        for b in &self.balancers {
            let g = ctx.guests.get(b)?;
            let out = g.exec(&self.publish_cmd(ctx.cluster), Duration::from_secs(180))?;
            ev["published"][b] =
                json!({ "exit": out.code, "output": format!("{}{}", out.stdout, out.stderr) });
            if !out.ok() {
                bail!("publishing on {b} failed: {}", out.stderr.trim());
            }
        }
        for b in &self.balancers {
            let g = ctx.guests.get(b)?;
            let (seen, secs) = until(&g, &self.probe(ctx, b), true, left())?;
            ev["traffic"][b] = json!({ "answer": seen.trim(), "seconds_after_publication": secs });
            let stat = g.exec(
                &format!(
                    "echo 'show stat {} -1 -1' | socat stdio TCP:127.0.0.1:9999",
                    self.pool()
                ),
                Duration::from_secs(15),
            )?;
            ev["runtime_view"][b] = json!(stat.stdout);
        }
        let first = &self.balancers[0];
        let drain_v = drain(
            &*ctx.guests.get(first)?,
            &Drain {
                frontend: &format!("http://127.0.0.1:{}/", self.port),
                runtime: "127.0.0.1:9999",
                backend: &self.pool(),
                server: self.drain.as_deref().unwrap_or(&self.backends[0]),
                requests: 4 * self.backends.len() as u32,
            },
            left().min(Duration::from_secs(120)),
        )?;
        ev["drain"] = json!({ "node": first, "outcome": drain_v.outcome, "message": drain_v.message, "evidence": drain_v.evidence });
        if drain_v.outcome != super::Outcome::Pass {
            bail!("drain on {first}: {}", drain_v.message);
        }
        for b in &self.balancers {
            let g = ctx.guests.get(b)?;
            let out = g.exec(&self.retract_cmd(), Duration::from_secs(180))?;
            ev["retracted"][b] =
                json!({ "exit": out.code, "output": format!("{}{}", out.stdout, out.stderr) });
            if !out.ok() {
                bail!("retracting on {b} failed: {}", out.stderr.trim());
            }
            let (err, secs) = until(&g, &self.probe(ctx, b), false, left())?;
            ev["closed"][b] = json!({ "answer": err.trim(), "seconds": secs });
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

/// Repeats `probe` until its success is `want` (or `budget` runs out): what
/// it printed (stdout on success, stderr otherwise) and the seconds taken.
fn until(
    g: &crate::guest::Guest,
    probe: &str,
    want: bool,
    budget: Duration,
) -> Result<(String, f64)> {
    let (out, secs) = g.exec_until(
        probe,
        want,
        Instant::now() + budget,
        Duration::from_millis(500),
    )?;
    Ok((if want { out.stdout } else { out.stderr }, secs))
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
