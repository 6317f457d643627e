//! `materialize`: how long a new volume takes to become usable. The time
//! from asking a storage node (`from`) for a new volume — a fresh qcow2
//! image, or a clone of a base image whose first and last blocks hold known
//! data — exported over NBD (`qemu-nbd --fork`, which returns once it
//! listens), to the target node's first successful read of the volume's
//! first and last 4 KiB block, with their content verified (zeros for a
//! fresh volume, the base's patterns for a clone).
//!
//! Timed by the driver around both commands, so the figure includes the
//! control path (two SSH commands on kept sessions, a few ms each), as a
//! user asking for a volume would see it. Fresh and clone alternate; the
//! median of `runs` (at least 5) is reported, not judged, unless gated.

use super::figures::{self, Figure, Gates};
use super::{Check, Ctx, Verdict};
use crate::spec::Cluster;
use anyhow::{Result, bail};
use serde::Deserialize;
use serde_json::json;
use std::time::{Duration, Instant};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Materialize {
    /// The storage node that creates and exports each new volume.
    from: String,
    #[serde(default = "crate::spec::default::u32::<256>")]
    size_mib: u32,
    #[serde(default = "crate::spec::default::u32::<5>")]
    runs: u32,
    /// First NBD port of the new exports; each volume gets its own.
    #[serde(default = "crate::spec::default::u16::<10850>")]
    port: u16,
    #[serde(default)]
    gates: Gates,
}

const DIR: &str = "/var/tmp/photon-materialize";
const FIGURES: [&str; 2] = ["fresh_ms", "clone_ms"];

impl Check for Materialize {
    fn bind(&mut self, _target: Option<&str>, cluster: &Cluster) -> Result<(), String> {
        if cluster.node(&self.from).is_none() {
            return Err(format!(
                "`from` names no node of the cluster: {:?}",
                self.from
            ));
        }
        if self.runs < 5 {
            return Err(format!("runs = {}: a median needs at least 5", self.runs));
        }
        if self.size_mib < 1 {
            return Err("size_mib must be at least 1".into());
        }
        figures::check_gates(&self.gates, &FIGURES, &[])
    }

    fn attempt(&self, ctx: &Ctx, target: Option<&str>, budget: Duration) -> Result<Verdict> {
        let deadline = Instant::now() + budget;
        let left = || deadline.saturating_duration_since(Instant::now());
        let reader = ctx.guest(target)?;
        let storage = ctx.guests.get(&self.from)?;
        let addr = ctx
            .cluster
            .node(&self.from)
            .expect("bound")
            .address
            .to_string();
        let bytes = u64::from(self.size_mib) << 20;
        // The base of every clone: known data at its first and last 64 KiB.
        storage.succeed(
            &format!(
                "rm -rf {DIR} && mkdir -p {DIR} && cd {DIR} && \
                 qemu-img create -q -f qcow2 base.qcow2 {bytes} && \
                 qemu-io -f qcow2 -c 'write -P 0xab 0 64k' -c 'write -P 0xcd {} 64k' base.qcow2 >/dev/null",
                bytes - 65536
            ),
            left(),
        )?;
        let mut runs = json!([]);
        let (mut fresh, mut clone) = (Vec::new(), Vec::new());
        let mut failure = None;
        'runs: for i in 0..self.runs {
            for (k, cloned) in [false, true].into_iter().enumerate() {
                let port = self.port + (2 * i + k as u32) as u16;
                match self.once(&storage, &reader, &addr, port, cloned, bytes, left()) {
                    Ok(run) => {
                        let ms = run["ready_ms"].as_f64().unwrap_or_default();
                        if cloned {
                            clone.push(ms)
                        } else {
                            fresh.push(ms)
                        }
                        runs.as_array_mut().expect("array").push(run);
                    }
                    Err(e) => {
                        failure = Some(format!("{e:#}"));
                        break 'runs;
                    }
                }
            }
        }
        let _ = storage.exec(
            &format!("pkill -f 'qemu-nbd.*{DIR}'; rm -rf {DIR}"),
            Duration::from_secs(30),
        );
        let evidence =
            json!({ "from": self.from, "address": addr, "size_mib": self.size_mib, "runs": runs });
        if let Some(why) = failure {
            let mut evidence = evidence;
            evidence["error"] = json!(why);
            return Ok(Verdict::fail(
                format!("a new volume did not become readable: {why}"),
                evidence,
            ));
        }
        let figs: Vec<Figure> = [
            Figure::single("fresh_ms", "new fresh volume readable", "ms", false, fresh),
            Figure::single("clone_ms", "new cloned volume readable", "ms", false, clone),
        ]
        .into_iter()
        .flatten()
        .collect();
        let message = format!(
            "{} MiB volumes from {} readable on {} after: {}",
            self.size_mib,
            self.from,
            reader.endpoint.node,
            figs.iter()
                .map(Figure::summary)
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(figures::verdict(message, figs, evidence, &self.gates))
    }
}

impl Materialize {
    /// One new volume: create and export it on the storage node, read it
    /// from the target, then take it away again.
    #[allow(clippy::too_many_arguments)]
    fn once(
        &self,
        storage: &crate::guest::Guest,
        reader: &crate::guest::Guest,
        addr: &str,
        port: u16,
        cloned: bool,
        bytes: u64,
        left: Duration,
    ) -> Result<serde_json::Value> {
        if left.is_zero() {
            bail!("the check's deadline passed before every run finished");
        }
        let file = format!(
            "{DIR}/{}{port}.qcow2",
            if cloned { "clone" } else { "fresh" }
        );
        let backing = if cloned { "-b base.qcow2 -F qcow2" } else { "" };
        let (first, last) = if cloned { ("0xab", "0xcd") } else { ("0", "0") };
        let t0 = Instant::now();
        storage.succeed(
            &format!(
                "cd {DIR} && qemu-img create -q -f qcow2 {backing} {file} {bytes} && \
                 qemu-nbd --fork --persistent --pid-file {file}.pid -b 0.0.0.0 -p {port} -x vol -f qcow2 {file}"
            ),
            left,
        )?;
        let requested = t0.elapsed();
        // Retried for a moment: "ready" is what the reader sees, not what
        // the storage node claims.
        let out = reader.succeed(
            &format!(
                "n=0; until qemu-io -r -f raw -c 'read -P {first} 0 4k' -c 'read -P {last} {} 4k' \
                 nbd://{addr}:{port}/vol >/tmp/photon-materialize.out 2>&1; do \
                 n=$((n+1)); [ $n -ge 100 ] && {{ cat /tmp/photon-materialize.out; exit 1; }}; sleep 0.1; done; echo $n",
                bytes - 4096
            ),
            left,
        )?;
        let ready = t0.elapsed();
        storage.succeed(
            &format!("kill $(cat {file}.pid); rm -f {file} {file}.pid"),
            left,
        )?;
        Ok(json!({
            "volume": if cloned { "clone" } else { "fresh" },
            "port": port,
            "requested_ms": requested.as_secs_f64() * 1e3,
            "ready_ms": ready.as_secs_f64() * 1e3,
            "read_retries": out.trim().parse::<u32>().unwrap_or_default(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Materialize {
        toml::Value::Table(toml::from_str(text).unwrap())
            .try_into()
            .unwrap()
    }

    #[test]
    fn refuses_unknown_nodes_short_medians_and_unknown_gates() {
        let cluster = Cluster::profile("reference-storage").unwrap();
        let mut ok = parse("from = \"storage-node01\"");
        assert_eq!((ok.size_mib, ok.runs, ok.port), (256, 5, 10850));
        assert!(ok.bind(Some("storage-node02"), &cluster).is_ok());
        let mut bad = parse("from = \"storage-node09\"");
        assert!(
            bad.bind(None, &cluster)
                .unwrap_err()
                .contains("storage-node09")
        );
        let mut few = parse("from = \"storage-node01\"\nruns = 3");
        assert!(few.bind(None, &cluster).unwrap_err().contains("at least 5"));
        let mut gate = parse("from = \"storage-node01\"\ngates = { warm_ms = { max = 1 } }");
        assert!(gate.bind(None, &cluster).unwrap_err().contains("warm_ms"));
    }
}
