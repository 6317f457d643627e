//! What each command does: the mapping from a parsed command line to the
//! functions that do the work (the definitions are in `cli/mod.rs`).

use super::{CaptureCmd, Cli, Cmd, FaultCmd, LaneRun, RunArgs, SnapshotCmd, StartArgs, Target};
use crate::cluster;
use crate::error::bad_input;
use crate::lane::Lane;
use crate::machine;
use crate::smoke::{self, LaneOptions};
use crate::spec::Cluster;
use crate::state::{self, RunningCluster, StateDir};
use crate::{image, status};
use anyhow::{Context, Result};
use std::time::Duration;

pub fn run(cli: Cli) -> Result<i32> {
    crate::log::init(
        cli.log_format,
        crate::log::default_level(cli.quiet, cli.verbose),
    );
    crate::progress::set_quiet(cli.quiet);
    if let Some(secs) = cli.timeout {
        crate::arm_timeout(Duration::from_secs(secs));
    }
    // Commands that need no cluster definition.
    match &cli.command {
        Cmd::FabricSwitch { config } => {
            let text = std::fs::read_to_string(config)?;
            crate::fabric::switch::serve(serde_json::from_str(&text)?)?;
            return Ok(0);
        }
        Cmd::Report { dir } => {
            let written = crate::report::rerender(dir)?;
            for f in written {
                println!("{}", f.display());
            }
            return Ok(0);
        }
        Cmd::Compare { old, new, json } => {
            let c = crate::compare::compare_paths(old, new)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&c)?);
            } else {
                print!("{}", crate::compare::render(&c));
            }
            return Ok(c.exit_code.into());
        }
        Cmd::Completions { shell } => {
            let shells = clap_complete::env::Shells::builtins();
            let shell = shells
                .completer(shell)
                .expect("clap checked the shell name");
            let name = "photon-cluster";
            shell.write_registration("COMPLETE", name, name, name, &mut std::io::stdout())?;
            return Ok(0);
        }
        Cmd::Man => {
            let man = clap_mangen::Man::new(<Cli as clap::CommandFactory>::command());
            man.render(&mut std::io::stdout())?;
            return Ok(0);
        }
        Cmd::Check { json: true } => return check_json(&cli.target),
        _ => {}
    }
    let name = format!("{:?}", cli.command);
    let name = name
        .split([' ', '(', '{'])
        .next()
        .unwrap_or_default()
        .to_lowercase();
    let _command = tracing::info_span!("command", name).entered();
    let cluster = cli.target.load(cli.command.default_profile())?;
    if let Cmd::Run(args) = &cli.command {
        return hermetic_run(cluster, &cli.target, args);
    }
    let state = cli.target.state(&cluster)?;
    // Guests of a killed `start` or `fresh-*` must not outlive it for long:
    // any command on the state directory reaps them, and says so.
    if let Some(note) = cluster::reap_abandoned(&state)? {
        tracing::warn!("{note}");
    }
    match cli.command {
        Cmd::Run(_) => unreachable!("handled above"),
        Cmd::Report { .. } | Cmd::Compare { .. } | Cmd::Completions { .. } | Cmd::Man => {
            unreachable!("handled above")
        }
        Cmd::Check { .. } => {
            println!(
                "{}: valid ({} nodes)",
                cluster.source.display(),
                cluster.nodes.len()
            );
        }
        Cmd::Plan { select, json } => {
            let lane = select.load(&cluster)?;
            if json {
                let checks: Vec<serde_json::Value> = lane
                    .checks()
                    .map(|c| {
                        serde_json::json!({
                            "id": c.id, "layer": c.layer, "kind": c.kind,
                            "target": c.target, "origin": c.origin,
                        })
                    })
                    .collect();
                let doc = serde_json::json!({ "lane": lane.name, "checks": checks });
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                for c in lane.checks() {
                    println!("{:<14} {:<40} {:<14} {}", c.layer, c.id, c.kind, c.origin);
                }
            }
        }
        Cmd::Lanes { json: true } => {
            let lanes: Vec<serde_json::Value> = crate::lane::LANES
                .iter()
                .map(|(name, _)| match lane_for(&cli.target, &cluster, name) {
                    Ok(l) => serde_json::json!({
                        "name": name, "valid": true, "checks": l.check_count(),
                        "cluster": l.cluster,
                        "layers": l.layers.iter().map(|l| &l.name).collect::<Vec<_>>(),
                        "description": l.description,
                    }),
                    Err(e) => {
                        serde_json::json!({ "name": name, "valid": false, "error": e })
                    }
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&lanes)?);
        }
        Cmd::Lanes { json: false } => {
            for (name, _) in crate::lane::LANES {
                match lane_for(&cli.target, &cluster, name) {
                    Ok(l) => {
                        println!(
                            "{name:<28} {:>3} checks  {} (on {})",
                            l.check_count(),
                            l.description,
                            l.cluster
                        );
                        let layers: Vec<&str> = l.layers.iter().map(|l| l.name.as_str()).collect();
                        println!("{:<28} layers: {}", "", layers.join(", "));
                    }
                    Err(e) => println!("{name:<28} not valid for this cluster: {e}"),
                }
            }
        }
        Cmd::Validate { select, json } => {
            let lane = select.load(&cluster)?;
            let items = crate::validate::run(&cluster, &state, &lane);
            if json {
                println!("{}", serde_json::to_string_pretty(&items)?);
            } else {
                crate::validate::print(&items);
            }
            let failed = items
                .iter()
                .any(|i| i.outcome == crate::check::Outcome::Fail);
            return Ok(if failed { 1 } else { 0 });
        }
        Cmd::Smoke(lane) => {
            let opts = lane.options(&cluster, "smoke")?;
            let _lock = state.lock("smoke")?;
            return Ok(smoke::smoke(&cluster, &state, &opts)? as i32);
        }
        Cmd::Rerun(args) => {
            let opts = args.options(&cluster)?;
            let _lock = state.lock("rerun")?;
            return Ok(crate::rerun::rerun(&cluster, &state, &opts)? as i32);
        }
        Cmd::FreshSmoke { lane, start } => {
            let opts = lane.options(&cluster, "fresh-smoke")?;
            let _lock = state.lock("fresh-smoke")?;
            return Ok(smoke::fresh_smoke(
                &cluster,
                &state,
                &opts,
                &start.options("fresh-smoke", true),
            )? as i32);
        }
        Cmd::Script {
            file,
            deadline,
            lane,
        } => {
            let opts = lane.options(script_lane(&file, deadline, &cluster)?, "script");
            let _lock = state.lock("script")?;
            return Ok(smoke::smoke(&cluster, &state, &opts)? as i32);
        }
        Cmd::Matrix(run) => return lane_on_running(&cluster, &state, "matrix", &run),
        Cmd::BenchStorage(run) => return lane_on_running(&cluster, &state, "bench-storage", &run),
        Cmd::FreshMatrix { lane, start } => {
            return fresh_lane(&cluster, &state, "matrix", &lane, &start, "fresh-matrix");
        }
        Cmd::FreshBenchStorage { lane, start } => {
            let cmd = "fresh-bench-storage";
            return fresh_lane(&cluster, &state, "bench-storage", &lane, &start, cmd);
        }
        Cmd::BenchCoronafsLocalMatrix { lane, start } => {
            let name = "bench-coronafs-local-matrix";
            return running_or_fresh(&cluster, &state, name, &lane, &start);
        }
        Cmd::ProviderVmRealityProof { lane, start } => {
            let name = "provider-vm-reality-proof";
            return running_or_fresh(&cluster, &state, name, &lane, &start);
        }
        Cmd::Build => {
            let _lock = state.lock("build")?;
            let img = image::build(&cluster, &state)?;
            println!("kernel  {}", img.kernel.display());
            println!("initrd  {}", img.initrd.display());
            if img.rootfs.as_os_str().is_empty() {
                println!("rootfs  (none: the nodes boot from the store)");
            } else {
                println!("rootfs  {}", img.rootfs.display());
            }
        }
        Cmd::Start(args) => {
            let _lock = state.lock("start")?;
            cluster::start(&cluster, &state, &args.options("start", false))?;
            status::print(&status::collect(&require_running(&state)?), false)?;
        }
        Cmd::Status { json } => {
            let record = require_running(&state)?;
            if let Some(owner) = record.owner.as_ref().filter(|o| o.starting && o.alive()) {
                // Answer at once: the guests are still booting, and their
                // sessions belong to `start`.
                let doc = serde_json::json!({
                    "state": "starting",
                    "owner": owner,
                    "launched": record.nodes.keys().collect::<Vec<_>>(),
                });
                if json {
                    println!("{}", serde_json::to_string_pretty(&doc)?);
                } else {
                    println!(
                        "cluster {} is starting (`{}`, pid {}): {} node(s) launched: {}",
                        record.name,
                        owner.command,
                        owner.pid,
                        record.nodes.len(),
                        record.nodes.keys().cloned().collect::<Vec<_>>().join(", ")
                    );
                }
                return Ok(0);
            }
            status::print(&status::collect(&record), json)?;
        }
        Cmd::Ssh { node, command } => {
            let record = require_running(&state)?;
            if command.is_empty() {
                return interactive_ssh(&record, &node);
            }
            let guest = crate::guest::connect(&record, &node)?;
            let out = guest.exec(&remote_command(&command)?, Duration::from_secs(600))?;
            print!("{}", out.stdout);
            eprint!("{}", out.stderr);
            return Ok(out.code);
        }
        Cmd::Bench { start, execs, out } => {
            let _lock = state.lock("bench")?;
            crate::bench::suite(&cluster, &state, &start.options("bench", true), execs, &out)?;
        }
        Cmd::BenchBoot(args) => {
            let _lock = state.lock("bench-boot")?;
            crate::bench::boot(&cluster, &state, &args.options("bench-boot", true))?;
        }
        Cmd::Stop { grace } => {
            let _lock = state.lock("stop")?;
            let notes = cluster::stop(&state, Duration::from_secs(grace))?;
            if notes.is_empty() {
                println!("no cluster running in {}", state.root);
            }
            for (node, note) in notes {
                println!("{node}: {note}");
            }
        }
        Cmd::Snapshot(cmd) => snapshot_command(&cluster, &state, cmd)?,
        Cmd::BenchFabric {
            start,
            from,
            to,
            transfers,
        } => {
            let _lock = state.lock("bench-fabric")?;
            let opts = start.options("bench-fabric", true);
            crate::bench::fabric(&cluster, &state, &opts, (&from, &to), transfers)?;
        }
        Cmd::Fault(cmd) => fault_command(&require_running(&state)?, cmd)?,
        Cmd::Restart {
            node,
            ready_timeout,
        } => {
            let record = require_running(&state)?;
            let timeout = Duration::from_secs(ready_timeout);
            println!("{}", crate::fault::restart(&record, &node, timeout)?.0);
        }
        Cmd::Capture(CaptureCmd::Start { file }) => {
            let file = file.unwrap_or_else(|| {
                let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
                state
                    .root
                    .join(format!("fabric/capture-{stamp}.pcap"))
                    .into()
            });
            println!(
                "{}",
                crate::fault::capture_start(&require_running(&state)?, &file)?
            );
        }
        Cmd::Capture(CaptureCmd::Stop) => {
            match crate::fault::capture_stop(&require_running(&state)?)? {
                (Some(file), frames) => println!("{frames} frames in {}", file.display()),
                (None, _) => println!("no capture was running"),
            }
        }
        Cmd::FabricSwitch { .. } => unreachable!("handled above"),
        Cmd::Clean { all } => {
            let _lock = state.lock("clean")?;
            cluster::clean(&state, all)?;
            println!("cleaned {}", state.root);
        }
    }
    Ok(0)
}

fn fault_command(record: &RunningCluster, cmd: FaultCmd) -> Result<()> {
    use crate::fault;
    let said = match cmd {
        FaultCmd::Partition { groups } => {
            let groups: Vec<Vec<String>> = groups
                .iter()
                .map(|g| g.split(',').map(|n| n.trim().to_string()).collect())
                .collect();
            fault::partition(record, &groups)?
        }
        FaultCmd::Heal => fault::heal(record)?,
        FaultCmd::Link {
            node,
            loss,
            delay,
            duplicate,
        } => {
            let f = crate::fabric::switch::LinkFault {
                loss,
                delay_ms: delay,
                duplicate,
            };
            fault::link(record, &node, f)?
        }
        FaultCmd::Crash { node } => fault::crash(record, &node)?,
        FaultCmd::Pause { node } => fault::pause(record, &node, true)?,
        FaultCmd::Resume { node } => fault::pause(record, &node, false)?,
        FaultCmd::Status { json } => {
            let s = fault::fabric_status(record)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(());
            }
            let mut out = format!(
                "partition: {}\n",
                match &s.partition {
                    Some(g) => g
                        .iter()
                        .map(|g| g.join(","))
                        .collect::<Vec<_>>()
                        .join(" | "),
                    None => "none".into(),
                }
            );
            for p in &s.ports {
                let link = s.links.get(&p.node).copied().unwrap_or_default();
                out.push_str(&format!(
                    "{:<10} rx {:>9} tx {:>9} dropped {:>7} (partition) {:>7} (loss)  \
                     loss {:.0}% delay {} ms dup {:.0}%\n",
                    p.node,
                    p.rx_frames,
                    p.tx_frames,
                    p.dropped_partition,
                    p.dropped_loss,
                    link.loss * 100.0,
                    link.delay_ms,
                    link.duplicate * 100.0
                ));
            }
            out.trim_end().to_string()
        }
    };
    println!("{said}");
    Ok(())
}

fn snapshot_command(cluster: &Cluster, state: &StateDir, cmd: SnapshotCmd) -> Result<()> {
    use crate::snapshot::{self, After};
    match cmd {
        SnapshotCmd::Save { name, stop } => {
            let _lock = state.lock("snapshot save")?;
            let record = require_running(state)?;
            let key = snapshot::key(cluster, &record.image)?;
            // The command line each QEMU really runs, for the restore to match.
            let machines = crate::bench::running_machines(&record, state.root.as_str())?;
            let after = if stop { After::Stop } else { After::Resume };
            let t = std::time::Instant::now();
            let m = snapshot::save(state, &record, key, machines, &name, after)?;
            if stop {
                // The guests have quit; this ends the fabric switch too, so
                // a restore finds its ports free.
                cluster::stop(state, std::time::Duration::from_secs(20))?;
            }
            println!(
                "snapshot {:?}: {} nodes, {:.0} MiB in {:.1} s (guests paused {:.1} s); {}",
                m.name,
                m.record.nodes.len(),
                m.bytes as f64 / 1048576.0,
                t.elapsed().as_secs_f64(),
                m.paused_s,
                if stop {
                    "cluster stopped"
                } else {
                    "cluster resumed"
                }
            );
        }
        SnapshotCmd::List => {
            for m in snapshot::list(state)? {
                println!(
                    "{:<16} {:>7.0} MiB  {}  image {}  driver {}",
                    m.name,
                    m.bytes as f64 / 1048576.0,
                    m.created,
                    m.key.image,
                    m.key.driver
                );
            }
        }
        SnapshotCmd::Rm { name } => {
            let _lock = state.lock("snapshot rm")?;
            snapshot::remove(state, &name)?;
            println!("removed snapshot {name:?}");
        }
    }
    Ok(())
}

/// `run`: checks the store paths before anything starts, then runs the lane.
fn hermetic_run(mut cluster: Cluster, target: &Target, args: &RunArgs) -> Result<i32> {
    if !args.assemble.is_empty() {
        let code =
            crate::layered::assemble(&args.assemble, &args.out, args.keep_failed, args.json)?;
        return Ok(code as i32);
    }
    let images = args
        .image_dir
        .as_deref()
        .expect("clap requires --image-dir");
    let mut paths = crate::hermetic::use_image_dir(&mut cluster, images)?;
    paths.extend(crate::hermetic::tool_paths()?);
    paths.push(("driver".into(), std::env::current_exe()?));
    if let Some(ready) = &args.from_ready {
        paths.push(("ready cluster".into(), ready.clone()));
    }
    let checked =
        crate::hermetic::check_paths(&paths, &crate::hermetic::store_dir(), &args.allow_impure)?;
    let base = match &target.state_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join("photon-state"),
    };
    let state = StateDir::new(state::state_dir(Some(&base), &cluster.state_suffix)?)?;
    let mut start = args.start.options("run", true);
    if args.ready {
        let _lock = state.lock("run --ready")?;
        return Ok(crate::layered::ready(&cluster, &state, &start, &args.out, checked)? as i32);
    }
    let mut lane = args.select.load(&cluster)?;
    if let (Some(ready), Some(layer)) = (&args.from_ready, &args.layer) {
        lane = crate::layered::only_layer(lane, layer)?;
        start.from_snapshot = Some(std::path::absolute(ready)?.display().to_string());
    }
    let opts = LaneOptions {
        command: "run".into(),
        lane,
        artifacts: args.out.clone(),
        keep_going: args.keep_going,
        grace: Duration::from_secs(args.grace),
        json: args.json,
        publish: None,
        save_end: args.save_end.then(|| args.out.join("end")),
    };
    let _lock = state.lock("run")?;
    let code = smoke::hermetic(
        &cluster,
        &state,
        &opts,
        &start,
        &args.out,
        checked,
        args.keep_failed,
    )?;
    Ok(code as i32)
}

/// An embedded lane against the running cluster (`smoke --lane <name>`),
/// from the command of the lane's name.
fn lane_on_running(cluster: &Cluster, state: &StateDir, lane: &str, run: &LaneRun) -> Result<i32> {
    let opts = run.options(Lane::embedded(lane, cluster)?, lane);
    let _lock = state.lock(lane)?;
    Ok(smoke::smoke(cluster, state, &opts)? as i32)
}

/// An embedded lane on a fresh cluster (`fresh-smoke --lane <name>`).
fn fresh_lane(
    cluster: &Cluster,
    state: &StateDir,
    lane: &str,
    run: &LaneRun,
    start: &StartArgs,
    command: &str,
) -> Result<i32> {
    let opts = run.options(Lane::embedded(lane, cluster)?, command);
    let _lock = state.lock(&format!("fresh-{lane}"))?;
    Ok(smoke::fresh_smoke(cluster, state, &opts, &start.options(command, true))? as i32)
}

/// An embedded lane, expanded against the cluster the command line names,
/// else against the lane's own default profile (`lanes`).
fn lane_for(target: &Target, cluster: &Cluster, name: &str) -> Result<Lane, String> {
    if target.cluster.is_some() || target.profile.is_some() {
        return Lane::embedded(name, cluster).map_err(|e| e.message);
    }
    let own = Cluster::profile(crate::lane::default_profile(name)).map_err(|e| format!("{e:#}"))?;
    Lane::embedded(name, &own).map_err(|e| e.message)
}

/// An embedded lane against the running cluster, or on a fresh one (booted
/// and stopped for it, under the lane's own name) when none runs.
fn running_or_fresh(
    cluster: &Cluster,
    state: &StateDir,
    lane: &str,
    run: &LaneRun,
    start: &StartArgs,
) -> Result<i32> {
    if state.load_running()?.is_some() {
        lane_on_running(cluster, state, lane, run)
    } else {
        fresh_lane(cluster, state, lane, run, start, lane)
    }
}

/// `check --json`: the verdict as JSON on stdout, also when it is invalid
/// (exit 2, as without --json).
fn check_json(target: &Target) -> Result<i32> {
    let (doc, code) = match target.load("reference") {
        Ok(c) => (
            serde_json::json!({
                "valid": true, "source": c.source, "name": c.name,
                "nodes": c.node_names().collect::<Vec<_>>(),
            }),
            0,
        ),
        Err(e) => (
            serde_json::json!({
                "valid": false, "error": format!("{e:#}"),
                "kind": crate::error::kind_of(&e).name(),
            }),
            crate::error::exit_code(&e) as i32,
        ),
    };
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(code)
}

/// What `ssh NODE CMD...` runs: one argument is a shell command line as
/// typed; several are a program and its arguments, each quoted for the
/// guest's shell so that spaces and quotes arrive as they were given.
fn remote_command(args: &[String]) -> Result<String> {
    match args {
        [line] => Ok(line.clone()),
        _ => shlex::try_join(args.iter().map(String::as_str))
            .map_err(|e| bad_input(format!("ssh: cannot quote the command: {e}"))),
    }
}

fn require_running(state: &StateDir) -> Result<RunningCluster> {
    state.load_running()?.ok_or_else(|| {
        bad_input(format!(
            "no cluster is running in {}; run `photon-cluster start` first",
            state.root
        ))
    })
}

/// Hands the terminal to OpenSSH for an interactive shell, pinned to the
/// cluster's key and the host keys the driver gave each node.
fn interactive_ssh(record: &RunningCluster, node: &str) -> Result<i32> {
    use std::os::unix::process::CommandExt;
    let n = record
        .nodes
        .get(node)
        .ok_or_else(|| bad_input(format!("no node {node:?} in the running cluster")))?;
    if !machine::is_running(n.pid_now()) {
        anyhow::bail!("{node}: QEMU (pid {}) is not running", n.pid_now());
    }
    let err = crate::guest::openssh(record, node).exec();
    Err(err).context("running ssh (install openssh-client)")
}

/// A lane of one layer that holds the script as its one check, so that a
/// script run is written out like any lane run. Its name is the script's.
fn script_lane(file: &std::path::Path, deadline: u64, cluster: &Cluster) -> Result<Lane> {
    let file = std::path::absolute(file)?;
    // Said here with the script's own file:line, not the generated lane's.
    crate::script::check_syntax(&file).map_err(crate::error::bad_input)?;
    let stem = file.file_stem().unwrap_or_default().to_string_lossy();
    let name = file.file_name().unwrap_or_default().to_string_lossy();
    let text = format!(
        "[lane]\nname = {stem:?}\ndescription = \"test script {name}\"\n\n\
         [[layer]]\nname = \"script\"\n\n\
         [[layer.check]]\nname = {stem:?}\nkind = \"script\"\nfile = {name:?}\ndeadline = {deadline}\n"
    );
    Ok(crate::lane::parse(&file, &text, cluster)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_keeps_one_command_line_and_quotes_several_arguments() {
        let one = vec!["journalctl -u etcd | tail".to_string()];
        assert_eq!(remote_command(&one).unwrap(), "journalctl -u etcd | tail");
        let argv: Vec<String> = ["printf", "%s|", "a b", "it's", ""]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            remote_command(&argv).unwrap(),
            r#"printf '%s|' 'a b' "it's" ''"#
        );
    }
}
