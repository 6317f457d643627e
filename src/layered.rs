//! A lane split at its layers, for builders that cache and spread work (Nix
//! derivations, docs/nix.md): the ready cluster as an output of its own
//! (`run --ready`), each layer run from it in a fresh restore (`run
//! --from-ready DIR --layer NAME`), and the lane assembled from the layers'
//! outputs (`run --assemble DIR...`). Each layer starts from the same ready
//! cluster, so a layer that breaks a node cannot change a sibling's verdict.
//!
//! The ready output is a snapshot directory (snapshot.rs: manifest.json,
//! `ssh/` with the cluster's throwaway keys, `<node>/` with its state and
//! disks) plus `boot.json` (the boot timeline) and `consoles/<node>.log`.

use crate::check::Outcome;
use crate::cluster::{self, StartOptions};
use crate::error::bad_input;
use crate::hermetic::Hermetic;
use crate::lane::Lane;
use crate::ledger::Ledger;
use crate::report::{self, RunReport, Step};
use crate::secrets::Secrets;
use crate::snapshot;
use crate::spec::Cluster;
use crate::state::StateDir;
use anyhow::{Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Boots the cluster, saves it into `out` and stops it. A boot that fails
/// still leaves the consoles in `out`; with `keep_failed` it is an output
/// of its own (`boot.json` says why, `nix-support/failed` is set) whose
/// layers report themselves skipped ([`missing`]), else the error.
pub fn ready(
    cluster: &Cluster,
    state: &StateDir,
    start: &StartOptions,
    out: &Path,
    paths: Hermetic,
    keep_failed: bool,
) -> Result<u8> {
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let t = Instant::now();
    let started = cluster::start(cluster, state, start);
    copy_consoles(cluster, state, out);
    let record = match started {
        Err(e) if keep_failed => return failed_boot(cluster, out, &e, paths),
        started => started?,
    };
    let boot_s = t.elapsed().as_secs_f64();
    let saved = snapshot::save_running(
        cluster,
        state,
        &record,
        "ready",
        snapshot::After::Stop,
        snapshot::Memory::Zstd,
    );
    cluster::stop(state, Duration::from_secs(20))?;
    let m = saved?;
    copy_tree(m.dir(), out)?;
    copy_consoles(cluster, state, out);
    let timeline = serde_json::json!({
        "boot_to_ready_s": boot_s,
        "accel": record.accel,
        "image": record.image,
        "nodes": record.nodes.iter().map(|(n, r)| (n.clone(), serde_json::json!({
            "ready_after_s": r.ready_after_s, "phases": r.phases,
        }))).collect::<serde_json::Map<_, _>>(),
        "hermetic": paths,
    });
    crate::files::write_atomic(
        &out.join("boot.json"),
        &serde_json::to_vec_pretty(&timeline)?,
    )?;
    let support = out.join("nix-support");
    fs::create_dir_all(&support)?;
    let o = out.display();
    fs::write(
        support.join("hydra-build-products"),
        format!("file manifest {o}/manifest.json\nfile boot-timeline {o}/boot.json\n"),
    )?;
    fs::write(
        support.join("hydra-metrics"),
        format!(
            "boot-to-ready {boot_s:.1} s\nsnapshot-bytes {} B\n",
            m.bytes
        ),
    )?;
    println!(
        "ready cluster in {}: {} nodes, {:.0} MiB, boot to ready {boot_s:.1} s",
        out.display(),
        m.record.nodes.len(),
        m.bytes as f64 / 1048576.0
    );
    Ok(0)
}

/// A ready output whose boot failed: why, in `boot.json` and
/// `nix-support/failed`, beside the consoles already copied.
fn failed_boot(cluster: &Cluster, out: &Path, e: &anyhow::Error, paths: Hermetic) -> Result<u8> {
    let why = format!("{e:#}");
    let boot = serde_json::json!({
        "failed": why, "error_kind": crate::error::kind_of(e), "hermetic": paths,
    });
    crate::files::write_atomic(&out.join("boot.json"), &serde_json::to_vec_pretty(&boot)?)?;
    let support = out.join("nix-support");
    fs::create_dir_all(&support)?;
    let o = out.display();
    let mut products = format!("file boot-timeline {o}/boot.json\n");
    for n in &cluster.nodes {
        products.push_str(&format!("file console-{0} {o}/consoles/{0}.log\n", n.name));
    }
    fs::write(support.join("hydra-build-products"), products)?;
    fs::write(support.join("failed"), &why)?;
    eprintln!("the ready cluster's boot failed; its evidence is kept in {o}: {why}");
    Ok(0)
}

/// Why a ready output (`run --from-ready DIR`) holds no cluster, if it
/// holds none: its boot failed (kept with keepFailed), or it is no ready
/// output at all.
pub fn missing(dir: &Path) -> Option<String> {
    if dir.join("manifest.json").is_file() {
        return None;
    }
    let boot: Option<serde_json::Value> = fs::read(dir.join("boot.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    Some(match boot.as_ref().and_then(|b| b["failed"].as_str()) {
        Some(why) => format!(
            "the ready cluster is missing: its boot failed ({}): {why}",
            dir.join("boot.json").display()
        ),
        None => format!(
            "the ready cluster is missing: {} holds no manifest.json",
            dir.display()
        ),
    })
}

/// Saves the running cluster (a layer's end) into `to`, and resumes it for
/// the evidence and the stop that follow; returns the bytes saved.
pub fn save_end(
    cluster: &Cluster,
    state: &StateDir,
    record: &crate::state::RunningCluster,
    to: &Path,
) -> Result<u64> {
    let m = snapshot::save_running(
        cluster,
        state,
        record,
        "end",
        snapshot::After::Resume,
        snapshot::Memory::Zstd,
    )?;
    copy_tree(m.dir(), to)?;
    Ok(m.bytes)
}

/// Each node's console so far, as `consoles/<node>.log` (best effort: it
/// is evidence, and a node that never launched has none).
fn copy_consoles(cluster: &Cluster, state: &StateDir, out: &Path) {
    let dir = out.join("consoles");
    let _ = fs::create_dir_all(&dir);
    for n in &cluster.nodes {
        let _ = fs::copy(
            state.node(&n.name).join("vm.log"),
            dir.join(format!("{}.log", n.name)),
        );
    }
}

/// The lane with only its layer `name`; an unknown name is bad input.
pub fn only_layer(mut lane: Lane, name: &str) -> Result<Lane> {
    if !lane.layers.iter().any(|l| l.name == name) {
        let known: Vec<&str> = lane.layers.iter().map(|l| l.name.as_str()).collect();
        return Err(bad_input(format!(
            "--layer {name}: lane {} ({}) has no such layer; its layers: {}",
            lane.name,
            lane.source.display(),
            known.join(", ")
        )));
    }
    lane.layers.retain(|l| l.name == name);
    Ok(lane)
}

/// One layer's output, read back for the assembly.
struct LayerRun {
    dir: PathBuf,
    report: RunReport,
    /// The lane layer it ran (the first layer that is not `health`).
    name: String,
}

fn read_layer(dir: &Path) -> Result<LayerRun> {
    let path = dir.join("result.json");
    let text = fs::read_to_string(&path)
        .map_err(|e| bad_input(format!("--assemble {}: {e}", path.display())))?;
    let report: RunReport = serde_json::from_str(&text).map_err(|e| {
        bad_input(format!(
            "{}:{}:{}: not a layer's result.json: {e}",
            path.display(),
            e.line(),
            e.column()
        ))
    })?;
    let name = report
        .layers
        .iter()
        .map(|l| l.name.clone())
        .find(|n| n != "health")
        .unwrap_or_else(|| dir.file_name().unwrap_or_default().to_string_lossy().into());
    Ok(LayerRun {
        dir: dir.to_path_buf(),
        report,
        name,
    })
}

/// Assembles the layers' outputs into one artifact tree in `out` with the
/// schema of a whole lane run: every layer's results, its health layer as
/// `health:<layer>`, its steps as `<layer>:<step>`, its evidence tree under
/// `layers/<layer>/`. `stopped`: how the run that made them was stopped
/// early, if it was (the lane's status then says so). Returns the exit
/// code, as `run` does.
pub fn assemble(
    inputs: &[PathBuf],
    out: &Path,
    keep_failed: bool,
    json: bool,
    stopped: Option<crate::error::RunStatus>,
) -> Result<u8> {
    let runs = inputs
        .iter()
        .map(|d| read_layer(d))
        .collect::<Result<Vec<_>>>()?;
    let Some(first) = runs.first() else {
        return Err(bad_input("--assemble: no layer outputs given"));
    };
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let started = Instant::now();
    let header = header(&first.report);
    let mut rep = merged(&runs).into_report(header, started, stopped);
    // The lane took its layers' time, wherever and whenever they ran; not
    // this assembly's.
    rep.duration_s = runs.iter().map(|r| r.report.duration_s).sum();
    for r in &runs {
        copy_tree(&r.dir, &out.join("layers").join(&r.name))?;
    }
    let failed = rep.exit_code != 0;
    report::write(out, &mut rep, &Secrets::default())?;
    crate::hermetic::write_nix_support(out, failed && keep_failed, &rep.metrics())?;
    report::print_summary(&rep, out, json)?;
    Ok(if keep_failed { 0 } else { rep.exit_code })
}

/// The assembled lane's header: the first layer's (lane, cluster, start,
/// `hermetic`), as this command, with no artifacts yet.
fn header(first: &RunReport) -> RunReport {
    let mut header = first.clone();
    header.command = "run --assemble".into();
    header.command_line = Some(std::env::args().collect::<Vec<_>>().join(" "));
    header.artifacts.clear();
    header
}

/// The whole lane's ledger from its layers' reports: every layer's results,
/// its health layer as `health:<layer>`, its steps as `<layer>:<step>`, the
/// first error, and an `assemble` step naming the layers that failed.
fn merged(runs: &[LayerRun]) -> Ledger {
    let mut ledger = Ledger::default();
    if let Some(first) = runs.first() {
        // Every layer restored the same ready cluster; the fabric counters
        // are the first layer's switch's (not summed).
        ledger.describe_as(&first.report);
        ledger.fabric = first.report.fabric.clone();
    }
    for r in runs {
        record_layer(&mut ledger, r);
    }
    let (skipped, failed): (Vec<&LayerRun>, Vec<&LayerRun>) = runs
        .iter()
        .filter(|r| r.report.exit_code != 0)
        .partition(|r| ran_nothing(r));
    let names = |rs: Vec<&LayerRun>| rs.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
    ledger
        .steps
        .push(assemble_step(runs.len(), &names(failed), &names(skipped)));
    ledger
}

/// A layer that ran none of its checks: each one is skipped (the ready
/// cluster it starts from is missing), which is not a failure of its own.
fn ran_nothing(r: &LayerRun) -> bool {
    let mut checks = r.report.layers.iter().flat_map(|l| &l.checks).peekable();
    checks.peek().is_some() && checks.all(|c| c.outcome == Outcome::Skipped)
}

/// One layer's report in the whole lane's ledger.
fn record_layer(ledger: &mut Ledger, r: &LayerRun) {
    for mut l in r.report.layers.clone() {
        if l.name == "health" {
            l.name = format!("health:{}", r.name);
        }
        ledger.layers.push(l);
    }
    for mut s in r.report.steps.clone() {
        s.name = format!("{}:{}", r.name, s.name);
        ledger.steps.push(s);
    }
    ledger.findings.extend(r.report.findings.clone());
    ledger.carry_error(&format!("layer {}", r.name), &r.report);
}

/// The assembly as a step: failed when a layer failed or was skipped,
/// naming the first that failed and those that ran nothing.
fn assemble_step(layers: usize, failed: &[String], skipped: &[String]) -> Step {
    let mut message = match failed.first() {
        None if skipped.is_empty() => {
            format!("{layers} layers, each from the ready cluster: all passed")
        }
        None => format!("{layers} layers, each from the ready cluster"),
        // Each layer started from the ready cluster (or an earlier layer's
        // saved end, with `after`): a failure follows from another only
        // along an `after`.
        Some(first) => format!(
            "{layers} layers, each from the ready cluster; first failed: {first}; failed: {}",
            failed.join(", ")
        ),
    };
    if !skipped.is_empty() {
        message.push_str(&format!(
            "; skipped, their cluster missing: {}",
            skipped.join(", ")
        ));
    }
    let failed = [failed, skipped].concat();
    Step {
        name: "assemble".into(),
        outcome: if failed.is_empty() {
            Outcome::Pass
        } else {
            Outcome::Fail
        },
        duration_s: 0.0,
        message,
    }
}

/// Copies the files under `from` into `to`, writable by their owner (the
/// source may be a read-only store path). Sockets and other specials are left.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for e in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let kind = e.file_type()?;
        if kind.is_dir() {
            copy_tree(&src, &dst)?;
        } else if kind.is_file() {
            let _ = fs::remove_file(&dst);
            fs::copy(&src, &dst)
                .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
            fs::set_permissions(&dst, fs::Permissions::from_mode(0o644))?;
        }
    }
    Ok(())
}
