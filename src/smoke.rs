//! `smoke` (a lane against the running cluster) and `fresh-smoke` (clean,
//! build, start, smoke, stop). Both always leave the artifact tree, also
//! when a step or a check fails, and return the exit code to use.

use crate::check::Ctx;
use crate::cluster::{self, StartOptions};
use crate::error::{RunStatus, bad_input};
use crate::guest::GuestPool;
use crate::hermetic::{Hermetic, write_nix_support};
use crate::lane::Lane;
use crate::ledger::Ledger;
use crate::report::{self, RunReport, Step};
use crate::secrets::Secrets;
use crate::spec::Cluster;
use crate::state::{RunningCluster, StateDir};
use crate::{engine, evidence, image, snapshot};
use anyhow::Result;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct LaneOptions {
    /// The command, as result.json records it (`smoke`, `fresh-matrix`, `run`, ...).
    pub command: String,
    pub lane: Lane,
    /// Artifacts go to `<root>/<lane>/<timestamp>` (`latest` points there).
    pub artifacts: PathBuf,
    /// Run every layer even after one failed.
    pub keep_going: bool,
    /// Seconds `stop` waits for a clean powerdown (fresh-smoke).
    pub grace: Duration,
    /// Print result.json on stdout, and the summary on stderr.
    pub json: bool,
    /// Also copy the benchmark report and its charts here (`--publish`).
    pub publish: Option<std::path::PathBuf>,
    /// Save the cluster's end state here after the lane, before the stop
    /// (`run --save-end`: a later layer continues from it, `after`).
    pub save_end: Option<PathBuf>,
    /// Save the ready cluster as this snapshot before the lane runs
    /// (`fresh-smoke --save-ready`: later warm starts restore it).
    pub save_ready: Option<String>,
}

/// Runs the lane against the cluster that is running in `state`.
pub fn smoke(cluster: &Cluster, state: &StateDir, opts: &LaneOptions) -> Result<u8> {
    let record = state.load_running()?.ok_or_else(|| {
        bad_input(format!(
            "no cluster is running in {}; run `photon-cluster start`, or `fresh-smoke` \
             to boot one just for this run",
            state.root
        ))
    })?;
    let dir = report::create_dir(&opts.artifacts, &opts.lane.name)?;
    let started = Instant::now();
    let header = header(cluster, opts);
    let mut ledger = Ledger::default();
    check_cluster(&mut ledger, cluster, state, &record, opts, &dir, started);
    let rep = ledger.into_report(header, started, crate::stopped_as());
    conclude(rep, &dir, state, opts)
}

/// The report's header for a lane run: the command, the lane, the
/// cluster, and now as its start.
fn header(cluster: &Cluster, opts: &LaneOptions) -> RunReport {
    RunReport::new(&opts.command, &opts.lane.name, &opts.lane.source, cluster)
}

/// Runs the lane against the running `record` and writes its artifacts
/// into `dir`; returns the report without printing it (`rerun`).
pub fn lane_into(
    cluster: &Cluster,
    state: &StateDir,
    record: &RunningCluster,
    opts: &LaneOptions,
    dir: &Path,
) -> Result<RunReport> {
    std::fs::create_dir_all(dir)?;
    let started = Instant::now();
    let header = header(cluster, opts);
    let mut ledger = Ledger::default();
    check_cluster(&mut ledger, cluster, state, record, opts, dir, started);
    let mut rep = ledger.into_report(header, started, crate::stopped_as());
    report::write(dir, &mut rep, &Secrets::load(state))?;
    Ok(rep)
}

/// clean, build, start, smoke, stop; the cluster is stopped even when
/// the smoke fails or is interrupted.
pub fn fresh_smoke(
    cluster: &Cluster,
    state: &StateDir,
    opts: &LaneOptions,
    start: &StartOptions,
) -> Result<u8> {
    let dir = report::create_dir(&opts.artifacts, &opts.lane.name)?;
    let started = Instant::now();
    let header = header(cluster, opts);
    let mut ledger = Ledger::default();
    let ok = ledger.step("clean", || {
        cluster::clean(state, false).map(|_| "runtime state removed".into())
    }) && ledger.step("build", || {
        image::build(cluster, state).map(|i| format!("{} image {}", i.provider, i.id))
    });
    if ok {
        boot_check_stop(&mut ledger, cluster, state, opts, start, &dir, started);
    }
    let rep = ledger.into_report(header, started, crate::stopped_as());
    conclude(rep, &dir, state, opts)
}

/// `run`: the hermetic form for Nix builders. The images are given, so
/// there is no clean or build; artifacts go straight into `out`, with
/// Hydra's nix-support files. With `keep_failed`, a failed lane exits 0
/// and marks `nix-support/failed`, so its evidence is kept as the output.
pub fn hermetic(
    cluster: &Cluster,
    state: &StateDir,
    opts: &LaneOptions,
    start: &StartOptions,
    out: &Path,
    paths: Hermetic,
    keep_failed: bool,
) -> Result<u8> {
    let (started, header) = hermetic_header(cluster, opts, out, paths)?;
    let mut ledger = Ledger::default();
    boot_check_stop(&mut ledger, cluster, state, opts, start, out, started);
    let rep = ledger.into_report(header, started, crate::stopped_as());
    conclude_hermetic(rep, state, opts, out, keep_failed)
}

/// `run --from-ready` when the ready cluster is missing (its boot failed;
/// `reason` says so): nothing starts, and every check of the layer is
/// reported skipped because of it, so the lane still assembles in full.
pub fn hermetic_without_ready(
    cluster: &Cluster,
    state: &StateDir,
    opts: &LaneOptions,
    out: &Path,
    paths: Hermetic,
    reason: &str,
    keep_failed: bool,
) -> Result<u8> {
    let (started, header) = hermetic_header(cluster, opts, out, paths)?;
    let mut ledger = Ledger::default();
    ledger.fail(reason, Some(crate::error::ErrorKind::SnapshotMissing));
    ledger.layers = engine::skipped_lane(&opts.lane, reason, started);
    let rep = ledger.into_report(header, started, crate::stopped_as());
    conclude_hermetic(rep, state, opts, out, keep_failed)
}

/// A hermetic run's output directory, its start, and its report's header
/// with the store paths it was checked against.
fn hermetic_header(
    cluster: &Cluster,
    opts: &LaneOptions,
    out: &Path,
    paths: Hermetic,
) -> Result<(Instant, RunReport)> {
    std::fs::create_dir_all(out)?;
    let mut header = header(cluster, opts);
    header.hermetic = Some(paths);
    Ok((Instant::now(), header))
}

/// Writes a hermetic run's artifacts and Hydra's files; with `keep_failed`
/// a failed run exits 0 and marks `nix-support/failed`.
fn conclude_hermetic(
    mut rep: RunReport,
    state: &StateDir,
    opts: &LaneOptions,
    out: &Path,
    keep_failed: bool,
) -> Result<u8> {
    let failed = rep.exit_code != 0;
    report::write(out, &mut rep, &Secrets::load(state))?;
    write_nix_support(out, failed && keep_failed, &rep.metrics())?;
    report::print_summary(&rep, out, opts.json)?;
    if matches!(rep.status, RunStatus::Interrupted | RunStatus::Timeout) {
        return Err(crate::stop_error());
    }
    Ok(if keep_failed { 0 } else { rep.exit_code })
}

/// start, the lane, stop (always, once start succeeded). A failed start
/// leaves the consoles of whatever booted as evidence.
fn boot_check_stop(
    ledger: &mut Ledger,
    cluster: &Cluster,
    state: &StateDir,
    opts: &LaneOptions,
    start: &StartOptions,
    dir: &Path,
    started: Instant,
) {
    let mut record: Option<RunningCluster> = None;
    ledger.step("start", || {
        let r = cluster::start(cluster, state, start)?;
        let msg = format!("{} nodes ready; accel {}", r.nodes.len(), r.accel.summary());
        record = Some(r);
        Ok(msg)
    });
    let Some(r) = &record else {
        let nodes: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
        let t = Instant::now();
        ledger.findings = evidence::collect(dir, state, None, None, &nodes);
        let health = evidence::health_layer(&nodes, &ledger.findings, t, started);
        ledger.layers.push(health);
        return;
    };
    if let Some(name) = &opts.save_ready {
        ledger.step("save-ready", || {
            let m = snapshot::save_running(
                cluster,
                state,
                r,
                name,
                snapshot::After::Resume,
                snapshot::Memory::Raw,
            )?;
            Ok(format!(
                "snapshot {name:?}: {} nodes, {:.0} MiB (guests paused {:.1} s)",
                m.record.nodes.len(),
                m.bytes as f64 / 1048576.0,
                m.paused_s
            ))
        });
    }
    let t = Instant::now();
    check_cluster(ledger, cluster, state, r, opts, dir, started);
    let lane = lane_step(&ledger.layers, t);
    ledger.steps.push(lane);
    if let Some(end) = &opts.save_end {
        ledger.step("save-end", || {
            crate::layered::save_end(cluster, state, r, end)
                .map(|bytes| format!("end state saved in {} ({bytes} bytes)", end.display()))
        });
    }
    ledger.step("stop", || {
        let notes = cluster::stop(state, opts.grace)?;
        Ok(notes
            .iter()
            .map(|(n, s)| format!("{n}: {s}"))
            .collect::<Vec<_>>()
            .join("; "))
    });
}

/// The lane as one step of a run that also starts and stops the cluster:
/// its worst outcome, and how many checks it ran.
fn lane_step(layers: &[engine::LayerResult], t: Instant) -> Step {
    let checks: usize = layers.iter().map(|l| l.checks.len()).sum();
    Step {
        name: "smoke".into(),
        outcome: engine::overall(layers.iter().map(|l| l.outcome)),
        duration_s: t.elapsed().as_secs_f64(),
        message: format!("{checks} checks"),
    }
}

/// The lane's layers, then evidence collection and the health layer.
fn check_cluster(
    ledger: &mut Ledger,
    cluster: &Cluster,
    state: &StateDir,
    record: &RunningCluster,
    opts: &LaneOptions,
    dir: &Path,
    started: Instant,
) {
    ledger.describe(record);
    let nodes: Vec<String> = record.nodes.keys().cloned().collect();
    let dead = |r: &RunningCluster| -> Vec<String> {
        r.nodes
            .iter()
            .filter(|(_, n)| !crate::machine::is_running(n.pid_now()))
            .map(|(name, n)| format!("{name} (pid {})", n.pid_now()))
            .collect()
    };
    let mut pool = GuestPool::new(record);
    let mut replaced = None;
    let gone = dead(record);
    if gone.is_empty() {
        // The image the recipe builds now, for the image check: resolved
        // here so that checks never reach back into the image providers.
        let current = image::resolve(cluster, state).ok().map(|i| i.id);
        let ctx = Ctx {
            cluster,
            record,
            guests: &pool,
            current_image: current.as_deref(),
            artifacts: Some(dir),
        };
        let reset = || reset(cluster, state, record);
        let run = engine::RunOptions::new(opts.keep_going, Some(&reset));
        (ledger.layers, replaced) = engine::run(&opts.lane, &ctx, run, started);
    }
    // A flaky check's reset replaced the guests: what follows reads the
    // cluster that runs now (the report keeps describing the boot the lane
    // began on; each reset's note says what replaced it).
    if let Some(r) = &replaced {
        pool = GuestPool::new(r);
    }
    let record = replaced.as_ref().unwrap_or(record);
    ledger.fabric = crate::fault::fabric_status(record).ok();
    let t = Instant::now();
    ledger.findings = evidence::collect(dir, state, Some(record), Some(&pool), &nodes);
    let health = evidence::health_layer(&nodes, &ledger.findings, t, started);
    ledger.layers.push(health);
    let gone = dead(record);
    if !gone.is_empty() {
        let message = format!("QEMU is not running for {}", gone.join(", "));
        ledger.fail(message, Some(crate::error::ErrorKind::NodeGone));
    }
}

/// Before a flaky check's rerun: stops the cluster and restores the
/// snapshot it was started from (its disks, memory and keys as saved, on
/// host ports chosen afresh). A cluster booted cold has none: the lane
/// then runs again as it is, and the note says so.
fn reset(cluster: &Cluster, state: &StateDir, record: &RunningCluster) -> Result<engine::Restored> {
    let Some(name) = &record.restored_from else {
        return Ok(engine::Restored {
            note: "no snapshot to restore (the cluster was booted cold): ran again in place".into(),
            record: None,
        });
    };
    let t = Instant::now();
    // A `fresh-*` run owns its guests (and stops them at its end): so does
    // what replaces them.
    let mine = record
        .owner
        .as_ref()
        .filter(|o| o.pid == std::process::id() as i32);
    let command = mine.map_or("smoke", |o| o.command.as_str());
    let fabric = record.fabric.as_ref().map(|f| f.kind).unwrap_or_default();
    let to = Restore {
        name,
        command,
        keep_owner: mine.is_some(),
        fabric,
    };
    let restored = restore(cluster, state, &to)?;
    Ok(engine::Restored {
        note: format!(
            "restored snapshot {name:?} in {:.1} s",
            t.elapsed().as_secs_f64()
        ),
        record: Some(restored),
    })
}

/// Which snapshot to restore, and how the restored cluster is owned.
pub struct Restore<'a> {
    pub name: &'a str,
    /// The command `start` records as the cluster's.
    pub command: &'a str,
    /// Whether this process keeps owning the guests (it stops them itself).
    pub keep_owner: bool,
    pub fabric: crate::fabric::Kind,
}

/// Seconds the guests a restore replaces get to power down: their state
/// is thrown away (the snapshot brings its own disks), so a clean shutdown
/// buys nothing but time.
const DISCARD_GRACE: Duration = Duration::from_secs(1);

/// Stops the running cluster (if any) and starts it from a snapshot.
pub fn restore(cluster: &Cluster, state: &StateDir, to: &Restore) -> Result<RunningCluster> {
    cluster::stop(state, DISCARD_GRACE)?;
    let opts = StartOptions {
        command: to.command.into(),
        keep_owner: to.keep_owner,
        accel: crate::machine::accel::AccelRequest::Auto,
        ready_timeout: Duration::from_secs(600),
        readiness: cluster::Readiness::Full,
        from_snapshot: Some(to.name.into()),
        fabric: to.fabric,
    };
    cluster::start(cluster, state, &opts)
}

/// Writes the run's artifacts, publishes its benchmark report if asked,
/// prints its summary; returns its exit code (a stopped run's error).
fn conclude(mut rep: RunReport, dir: &Path, state: &StateDir, opts: &LaneOptions) -> Result<u8> {
    report::write(dir, &mut rep, &Secrets::load(state))?;
    if let Some(to) = &opts.publish {
        match report::bench::publish(dir, &rep.lane, to)? {
            Some(p) => tracing::info!("benchmark report published to {}", p.display()),
            None => tracing::warn!("--publish: this run measured no benchmark figures"),
        }
    }
    report::print_summary(&rep, dir, opts.json)?;
    if matches!(rep.status, RunStatus::Interrupted | RunStatus::Timeout) {
        return Err(crate::stop_error());
    }
    Ok(rep.exit_code)
}
