//! Benchmarks that print ratios against a baseline measured in the same run.

use crate::cluster::{self, Readiness, StartOptions};
use crate::spec::Cluster;
use crate::state::StateDir;
use anyhow::Result;
use std::time::{Duration, Instant};

/// Driver boot-to-ready against the raw parallel boot of the same guests to
/// their console login prompt. The guests, images and accelerator are the
/// same; the raw run does no SSH and no unit checks.
pub fn boot(cluster: &Cluster, state: &StateDir, opts: &StartOptions) -> Result<()> {
    let raw_opts = StartOptions {
        readiness: Readiness::ConsoleLogin,
        ..opts.clone()
    };
    eprintln!("bench boot: raw parallel boot to the console login prompt");
    let t = Instant::now();
    let raw = cluster::start(cluster, state, &raw_opts)?;
    let raw_s = t.elapsed().as_secs_f64();
    cluster::teardown(&raw);
    std::fs::remove_file(state.cluster_file())?;

    eprintln!("bench boot: driver start (SSH + expected units on every node)");
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
