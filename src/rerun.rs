//! `rerun`: a lane run N times against the running cluster, each time
//! from the same ready snapshot, so every run starts from the same state.
//! Each run leaves a full artifact root (`run-<i>/`); the rerun's own root
//! holds a result.json-shaped report whose checks carry their verdict over
//! every run, with passes, failures, pass rate and spreads
//! (`report::rerun`), and a report.html with a rerun section.
//!
//! Exit: 0 when every check passed every time, 1 when one failed or was
//! flaky, 2 on bad input (before anything starts), else the run's own.

use crate::error::bad_input;
use crate::ledger::Ledger;
use crate::report::{self, RunReport};
use crate::secrets::Secrets;
use crate::smoke::{self, LaneOptions, Restore};
use crate::spec::Cluster;
use crate::state::{RunningCluster, StateDir};
use crate::{cluster, snapshot};
use anyhow::Result;
use std::path::Path;
use std::time::{Duration, Instant};

/// The snapshot `rerun` saves when none is named.
pub const SNAPSHOT: &str = "rerun";

pub struct RerunOptions {
    pub lane: LaneOptions,
    pub times: u32,
    /// An existing snapshot to start every run from; None: save one now.
    pub snapshot: Option<String>,
}

/// Refuses what cannot work before anything changes: no running cluster,
/// a named snapshot that does not exist or does not fit the cluster.
pub fn refuse(cluster: &Cluster, state: &StateDir, opts: &RerunOptions) -> Result<RunningCluster> {
    let record = state.load_running()?.ok_or_else(|| {
        bad_input(format!(
            "no cluster is running in {}; `rerun` runs a lane on a running cluster \
             (photon-cluster start)",
            state.root
        ))
    })?;
    if let Some(name) = &opts.snapshot {
        snapshot::open(state, name, &snapshot::key(cluster, &record.image)?)?;
    }
    Ok(record)
}

/// Runs the lane `times` times, each from the snapshot; writes the rerun's
/// root and returns its exit code. The cluster is left running, restored.
pub fn rerun(cluster: &Cluster, state: &StateDir, opts: &RerunOptions) -> Result<u8> {
    let record = refuse(cluster, state, opts)?;
    let name = match &opts.snapshot {
        Some(n) => n.clone(),
        None => save(cluster, state, &record)?,
    };
    let root = report::create_dir(
        &opts.lane.artifacts,
        &format!("rerun-{}", opts.lane.lane.name),
    )?;
    // The header's wall-clock `started` is now, beside the clock its
    // duration is measured from (a header made when the runs were over
    // carried their end as `started`).
    let lane = &opts.lane.lane;
    let header = RunReport::new("rerun", &lane.name, &lane.source, cluster);
    let started = Instant::now();
    let fabric = record.fabric.as_ref().map(|f| f.kind).unwrap_or_default();
    let (runs, failed) = run_all(cluster, state, opts, &name, &root, fabric)?;
    let done = Done {
        header,
        snapshot: &name,
        root: &root,
        started,
        runs,
        failed,
    };
    conclude(state, opts, done)
}

/// The runs, each after a restore of `snapshot`, until `times` or a stop
/// (Ctrl-C, --timeout). A restore that fails ends them: the runs so far
/// are kept, with the error.
fn run_all(
    cluster: &Cluster,
    state: &StateDir,
    opts: &RerunOptions,
    snapshot: &str,
    root: &Path,
    fabric: crate::fabric::Kind,
) -> Result<(Vec<Run>, Option<anyhow::Error>)> {
    let mut runs = Vec::new();
    let to = Restore {
        name: snapshot,
        command: "rerun",
        keep_owner: false,
        fabric,
    };
    for i in 1..=opts.times {
        if crate::stopped_as().is_some() {
            break;
        }
        tracing::info!("== run {i} of {}: from snapshot {snapshot:?}", opts.times);
        let restored = match smoke::restore(cluster, state, &to) {
            Ok(r) => r,
            Err(e) => {
                let e = e.context(format!("restoring snapshot {snapshot:?} before run {i}"));
                return Ok((runs, Some(e)));
            }
        };
        let dir = format!("run-{i}");
        let rep = smoke::lane_into(cluster, state, &restored, &opts.lane, &root.join(&dir))?;
        tracing::info!("run {i}: {}", rep.status.name());
        runs.push((dir, rep));
    }
    Ok((runs, None))
}

/// One run: its directory under the rerun's root, and its report.
type Run = (String, RunReport);

/// What the runs left, for the rerun's report.
struct Done<'a> {
    /// Made when the runs began: what runs, and when.
    header: RunReport,
    snapshot: &'a str,
    root: &'a Path,
    started: Instant,
    runs: Vec<Run>,
    /// The infrastructure error that ended the reruns early.
    failed: Option<anyhow::Error>,
}

/// Saves the running cluster as the `rerun` snapshot, and stops it (every
/// run restores it, the first one too).
fn save(cluster: &Cluster, state: &StateDir, record: &RunningCluster) -> Result<String> {
    let m = snapshot::save_running(
        cluster,
        state,
        record,
        SNAPSHOT,
        snapshot::After::Stop,
        snapshot::Memory::Raw,
    )?;
    // The guests have quit: this ends the fabric switch, freeing its ports.
    cluster::stop(state, Duration::from_secs(1))?;
    tracing::info!(
        "snapshot {SNAPSHOT:?} saved: {} nodes, {:.0} MiB",
        m.record.nodes.len(),
        m.bytes as f64 / 1048576.0
    );
    Ok(SNAPSHOT.into())
}

/// Sums the runs up, writes the rerun's root and prints its tables.
fn conclude(state: &StateDir, opts: &RerunOptions, done: Done) -> Result<u8> {
    let root = done.root;
    let summary = report::rerun::summarize(opts.times, done.snapshot, &done.runs);
    let mut ledger = ledger(&done);
    (ledger.layers, ledger.steps) = (summary.layers, summary.steps);
    let mut header = done.header;
    header.rerun = Some(summary.rerun);
    let mut rep = ledger.into_report(header, done.started, crate::stopped_as());
    // The rerun's own exit contract (module doc): a check flaky over the
    // runs fails the rerun, which a single run's status does not say.
    rep.exit_code = report::rerun::exit_code(&rep);
    report::write(root, &mut rep, &Secrets::load(state))?;
    let table = report::rerun::render(&rep);
    if opts.lane.json {
        eprint!("{table}");
    } else {
        print!("{table}");
    }
    report::print_summary(&rep, root, opts.lane.json)?;
    if crate::stopped_as().is_some() {
        return Err(crate::stop_error());
    }
    Ok(rep.exit_code)
}

/// The rerun's error and cluster: the error that ended the reruns early,
/// else the first run's own error; the cluster as the last run found it.
fn ledger(done: &Done) -> Ledger {
    let mut ledger = Ledger::default();
    // First, so that it wins: it came after the runs' errors, but it is
    // what stopped the rerun.
    if let Some(e) = &done.failed {
        ledger.fail_with(e);
    }
    for (i, (_, r)) in done.runs.iter().enumerate() {
        ledger.carry_error(&format!("run {}", i + 1), r);
    }
    if let Some((_, last)) = done.runs.last() {
        ledger.describe_as(last);
    }
    ledger
}
