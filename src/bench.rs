//! Benchmarks of the driver itself. Every figure is a pair measured side by
//! side in one run (the driver against a baseline), reported with min,
//! median and max, and written to `bench.json`: timings on a shared machine
//! are noisy, so only ratios from one run are compared.

use crate::cluster::{self, Readiness, StartOptions};
use crate::spec::Cluster;
use crate::state::{RunningCluster, StateDir};
use crate::{guest, snapshot};
use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

/// min, median and max of a series of seconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Stats {
    pub n: usize,
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(v: Vec<f64>) -> Stats {
        let n = v.len();
        let s = crate::check::figures::Stats::of(v).expect("no samples");
        Stats {
            n,
            min: s.min,
            median: s.median,
            max: s.max,
        }
    }
}

/// One comparison: the driver's figure against its baseline's, and the
/// ratio of the medians (driver / baseline).
#[derive(Debug, Clone, Serialize)]
pub struct Pair {
    pub name: String,
    pub driver: String,
    pub baseline: String,
    pub driver_s: Stats,
    pub baseline_s: Stats,
    pub ratio: f64,
    /// What the figures count: seconds, unless said otherwise.
    pub unit: String,
}

impl Pair {
    fn new(name: &str, driver: &str, baseline: &str, d: Vec<f64>, b: Vec<f64>) -> Pair {
        let (driver_s, baseline_s) = (Stats::of(d), Stats::of(b));
        Pair {
            name: name.into(),
            driver: driver.into(),
            baseline: baseline.into(),
            ratio: driver_s.median / baseline_s.median.max(1e-9),
            driver_s,
            baseline_s,
            unit: "s".into(),
        }
    }

    fn print(&self) {
        println!("{}", self.name);
        for (who, s) in [
            (&self.driver, &self.driver_s),
            (&self.baseline, &self.baseline_s),
        ] {
            println!(
                "  {who:<44} n={:<3} min {:>9.4} {u}  median {:>9.4} {u}  max {:>9.4} {u}",
                s.n,
                s.min,
                s.median,
                s.max,
                u = self.unit
            );
        }
        println!(
            "  ratio (median driver / median baseline)        {:.3}x",
            self.ratio
        );
    }
}

/// `photon-cluster bench`: boots the cluster cold, measures it, saves a
/// snapshot, restores it, and compares.
pub fn suite(
    cluster: &Cluster,
    state: &StateDir,
    opts: &StartOptions,
    execs: usize,
    out: &Path,
) -> Result<()> {
    if state.load_running()?.is_some() {
        bail!("bench boots its own cluster; stop the running one first");
    }
    let mut pairs = Vec::new();
    tracing::info!("bench: cold boot");
    let t = Instant::now();
    let cold = cluster::start(cluster, state, opts)?;
    let cold_s = t.elapsed().as_secs_f64();
    let result = (|| -> Result<()> {
        // The guests' own moment: each node's last expected unit to become
        // active. Over the agent, `start` placed it on its own timeline
        // (from the first QEMU launch, `phases.active_s`) and knew how late
        // it noticed (`phases.noticed_s`), so both sides count from the
        // launch and nothing more is asked of the guests; else `own_clocks`.
        let placed: Option<Vec<(f64, f64)>> = cold
            .nodes
            .values()
            .map(|n| {
                let p = n.phases.as_ref()?;
                Some((p.active_s?, p.noticed_s?))
            })
            .collect();
        let ready_max = cold
            .nodes
            .values()
            .filter_map(|n| n.phases.as_ref()?.ready_s)
            .fold(0.0, f64::max);
        let max = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
        // Both sides of boot-to-ready, and the readiness delay per node.
        let (driver, baseline, boot, noticed) = match placed {
            Some(placed) => {
                let (active, noticed): (Vec<f64>, Vec<f64>) = placed.into_iter().unzip();
                (
                    "first launch to every node ready",
                    "first launch to the last expected unit active (guests' clocks)",
                    (ready_max, max(&active)),
                    noticed.into_iter().map(|d| d.max(0.0)).collect(),
                )
            }
            None => {
                let (own, noticed) = own_clocks(&cold)?;
                (
                    "driver start, launch to every node ready",
                    "guests' last expected unit active (own clock, from the kernel)",
                    (cold_s, max(&own)),
                    noticed,
                )
            }
        };
        pairs.push(Pair::new(
            "boot-to-ready: the driver against the guests' own all-units-active moment",
            driver,
            baseline,
            vec![boot.0],
            vec![boot.1],
        ));
        pairs.push(Pair::new(
            "readiness noticed: the driver's ready minus the moment its readiness became true, per node",
            "delay until the driver knew (s)",
            "zero delay (reference 1 ms)",
            noticed,
            vec![0.001],
        ));
        pairs.extend(exec_pairs(&cold, execs)?);
        tracing::info!("bench: snapshot save");
        snapshot::save_running(
            cluster,
            state,
            &cold,
            "bench",
            snapshot::After::Stop,
            snapshot::Memory::Raw,
        )?;
        // The guests have quit; stopping the cluster also ends its fabric
        // switch, whose ports the restore takes again.
        cluster::stop(state, Duration::from_secs(20))?;
        tracing::info!("bench: warm restore");
        let warm_opts = StartOptions {
            from_snapshot: Some("bench".into()),
            ..opts.clone()
        };
        let t = Instant::now();
        let warm = cluster::start(cluster, state, &warm_opts);
        let warm_s = t.elapsed().as_secs_f64();
        warm?;
        cluster::stop(state, Duration::from_secs(20))?;
        snapshot::remove(state, "bench")?;
        pairs.push(Pair::new(
            "warm restore-to-ready against cold boot-to-ready",
            "start --from-snapshot, to every node ready",
            "cold start, to every node ready",
            vec![warm_s],
            vec![cold_s],
        ));
        Ok(())
    })();
    if state.load_running()?.is_some() {
        cluster::stop(state, Duration::from_secs(20))?;
    }
    result?;
    let rss = peak_rss_mib();
    for p in &pairs {
        p.print();
    }
    println!(
        "driver peak RSS (this process: {}-node start, save, restore, execs) {rss:.1} MiB",
        cold.nodes.len()
    );
    let doc = json!({
        "cluster": cluster.name,
        "nodes": cold.nodes.len(),
        "accel": cold.accel,
        "host": host_description(),
        "pairs": pairs,
        "driver_peak_rss_mib": rss,
    });
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::files::write_atomic(out, &serde_json::to_vec_pretty(&doc)?)?;
    println!("wrote {}", out.display());
    Ok(())
}

/// `/bin/true` (a real program, not a shell builtin) three ways, interleaved
/// in a turning order so noise hits all alike: over the agent's channel, over the driver's kept ssh2
/// session, and through a fresh OpenSSH process per command (with the
/// cluster key). Two pairs, each against fresh OpenSSH; the agent's only
/// when the node has one. They run once the node's boot has finished.
fn exec_pairs(record: &RunningCluster, n: usize) -> Result<Vec<Pair>> {
    let node = record.nodes.keys().next().context("no nodes")?.clone();
    let agent = guest::connect(record, &node)?;
    settle(&agent)?;
    let agent = (agent.channel() == guest::ChannelKind::Agent).then_some(agent);
    let ssh2 = guest::connect_ssh(record, &node)?;
    let (mut over_agent, mut kept, mut openssh) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        // The order turns each round: the side right after a fresh OpenSSH
        // pays for the guest tearing its login down (sshd, PAM, logind),
        // and no side should always be that one.
        for side in (0..3).map(|k| (k + i) % 3) {
            match side {
                0 => {
                    if let Some(g) = &agent {
                        over_agent.push(time_true(g)?);
                    }
                }
                1 => kept.push(time_true(&ssh2)?),
                _ => openssh.push(time_openssh(record, &node)?),
            }
        }
    }
    let mut pairs = Vec::new();
    if agent.is_some() {
        pairs.push(Pair::new(
            &format!("exec of `/bin/true` on {node} over the agent"),
            "guest agent (virtio-serial channel)",
            "fresh OpenSSH process per command",
            over_agent,
            openssh.clone(),
        ));
    }
    pairs.push(Pair::new(
        &format!("exec of `/bin/true` on {node}"),
        "driver channel (kept ssh2 session)",
        "fresh OpenSSH process per command",
        kept,
        openssh,
    ));
    Ok(pairs)
}

/// How long a node's boot may go on after it is ready.
const SETTLE: Duration = Duration::from_secs(300);

/// Waits until the guest's boot has finished (systemd's own wait: no job
/// left), so that the execs measure the channels, not the role's services
/// still starting after the node's expected units (a one-node worker's
/// ran `/bin/true` in 30-150 ms then, 15-25 ms after).
fn settle(g: &guest::Guest) -> Result<()> {
    let t = Instant::now();
    let out = g.exec("systemctl is-system-running --wait", SETTLE)?;
    tracing::info!(
        "bench: {}'s boot finished ({}) {:.1} s after ready",
        g.endpoint.node,
        out.stdout.trim(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn time_openssh(record: &RunningCluster, node: &str) -> Result<f64> {
    let t = Instant::now();
    let out = guest::openssh(record, node).arg("/bin/true").output()?;
    if !out.status.success() {
        bail!(
            "ssh /bin/true: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(t.elapsed().as_secs_f64())
}

fn time_true(g: &guest::Guest) -> Result<f64> {
    let t = Instant::now();
    g.succeed("/bin/true", Duration::from_secs(30))?;
    Ok(t.elapsed().as_secs_f64())
}

/// Without the agent's placed moments (a node over SSH), each node's last
/// expected unit active by systemd's own clock, which starts at the
/// guest's kernel, after the firmware and kernel loading that the
/// driver's side includes; and the readiness delay against it.
fn own_clocks(cold: &RunningCluster) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut own, mut noticed) = (Vec::new(), Vec::new());
    for (name, n) in &cold.nodes {
        let active = all_active_s(&guest::connect(cold, name)?, &n.units)?;
        own.push(active);
        noticed.extend(n.ready_after_s.map(|ready| (ready - active).max(0.0)));
    }
    Ok((own, noticed))
}

/// Seconds from the guest kernel's start until the last of `units` became
/// active, by systemd's own monotonic timestamps.
fn all_active_s(g: &guest::Guest, units: &[String]) -> Result<f64> {
    if units.is_empty() {
        return Ok(0.0);
    }
    let out = g.succeed(
        &format!(
            "systemctl show -p ActiveEnterTimestampMonotonic --value {}",
            units.join(" ")
        ),
        Duration::from_secs(30),
    )?;
    let max_us = out
        .lines()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    Ok(max_us as f64 / 1e6)
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

fn host_description() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    format!("{cpus} CPUs, {model}")
}

/// Driver boot-to-ready against the raw parallel boot of the same guests to
/// their console login prompt. The guests, images and accelerator are the
/// same; the raw run does no SSH and no unit checks.
pub fn boot(cluster: &Cluster, state: &StateDir, opts: &StartOptions) -> Result<()> {
    let raw_opts = StartOptions {
        readiness: Readiness::ConsoleLogin,
        ..opts.clone()
    };
    tracing::info!("bench boot: raw parallel boot to the console login prompt");
    let t = Instant::now();
    let raw = cluster::start(cluster, state, &raw_opts)?;
    let raw_s = t.elapsed().as_secs_f64();
    cluster::teardown(&raw);
    std::fs::remove_file(state.cluster_file())?;

    tracing::info!("bench boot: driver start (SSH + expected units on every node)");
    let t = Instant::now();
    let ready = cluster::start(cluster, state, opts);
    let driver_s = t.elapsed().as_secs_f64();
    cluster::stop(state, Duration::from_secs(30))?;
    let ready = ready?;

    println!(
        "bench boot: {} nodes, accel {}",
        ready.nodes.len(),
        ready.accel.summary()
    );
    println!("  raw parallel boot to login prompt  {raw_s:>8.1} s  (baseline)");
    println!(
        "  driver boot-to-ready               {driver_s:>8.1} s  ratio {:.2}x",
        driver_s / raw_s
    );
    for (name, n) in &ready.nodes {
        let raw_node = raw.nodes.get(name).and_then(|r| r.ready_after_s);
        println!(
            "    {name:<16} raw {:>6.1} s   driver {:>6.1} s",
            raw_node.unwrap_or(f64::NAN),
            n.ready_after_s.unwrap_or(f64::NAN)
        );
    }
    Ok(())
}

/// `photon-cluster bench-fabric`: TCP throughput between two guests over
/// the driver's switch against QEMU's multicast hub. Boots the cluster on
/// each in turn (same images, same guests), and times `transfers` 32 MiB
/// transfers from `from` to `to` with socat, timed inside the sender.
pub fn fabric(
    cluster: &Cluster,
    state: &StateDir,
    opts: &StartOptions,
    (from, to): (&str, &str),
    transfers: usize,
) -> Result<Pair> {
    if state.load_running()?.is_some() {
        bail!("bench-fabric boots its own cluster; stop the running one first");
    }
    let to_addr = cluster
        .node(to)
        .map(|n| n.address.to_string())
        .with_context(|| format!("no node {to} in the cluster"))?;
    cluster
        .node(from)
        .with_context(|| format!("no node {from} in the cluster"))?;
    let mut rates = Vec::new();
    for kind in [crate::fabric::Kind::Switch, crate::fabric::Kind::Hub] {
        tracing::info!("bench-fabric: starting on the {kind:?} fabric");
        let o = StartOptions {
            fabric: kind,
            ..opts.clone()
        };
        let record = cluster::start(cluster, state, &o)?;
        let measured = (|| -> Result<Vec<f64>> {
            let rx = guest::connect(&record, to)?;
            rx.succeed(
                "pkill -f 'TCP-LISTEN:5001' ; (setsid socat -u TCP-LISTEN:5001,reuseaddr,fork \
                 OPEN:/dev/null,wronly >/dev/null 2>&1 &) ; sleep 1",
                Duration::from_secs(20),
            )?;
            let tx = guest::connect(&record, from)?;
            (0..transfers)
                .map(|_| {
                    let out = tx.succeed(
                        &format!(
                            "a=$(date +%s%N); dd if=/dev/zero bs=64k count=512 2>/dev/null | \
                             socat -u - TCP:{to_addr}:5001; b=$(date +%s%N); echo $(( (b-a)/1000 ))"
                        ),
                        Duration::from_secs(300),
                    )?;
                    let micros: f64 = out.trim().parse().context("transfer time")?;
                    Ok(32.0 / (micros / 1e6))
                })
                .collect()
        })();
        cluster::stop(state, Duration::from_secs(20))?;
        let mb_s = measured?;
        tracing::info!("bench-fabric: {kind:?}: {mb_s:?} MiB/s");
        rates.push(mb_s);
    }
    let hub = rates.pop().expect("hub");
    let switch = rates.pop().expect("switch");
    // Throughput, not time: a ratio above 1 means the switch is faster.
    let mut pair = Pair::new(
        &format!("TCP throughput {from} -> {to}, MiB/s (32 MiB per transfer)"),
        "the driver's switch",
        "QEMU's multicast hub",
        switch,
        hub,
    );
    pair.unit = "MiB/s".into();
    pair.print();
    Ok(pair)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_and_ratios() {
        let s = Stats::of(vec![3.0, 1.0, 2.0, 10.0]);
        assert_eq!((s.n, s.min, s.median, s.max), (4, 1.0, 2.5, 10.0));
        let p = Pair::new("x", "d", "b", vec![0.1, 0.1, 0.1], vec![1.0, 2.0, 3.0]);
        assert!((p.ratio - 0.05).abs() < 1e-9, "{}", p.ratio);
    }
}
