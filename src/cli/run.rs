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
    let _command = tracing::info_span!("command", name = command_name(&cli.command)).entered();
    let on = On {
        target: &cli.target,
        profile: cli.command.default_profile(),
    };
    match cli.command {
        // No cluster definition.
        Cmd::FabricSwitch { config } => fabric_switch(&config),
        Cmd::Report { dir } => rerender(&dir),
        Cmd::Compare { old, new, json } => compare(&old, &new, json),
        Cmd::Completions { shell } => completions(&shell),
        Cmd::Man => man(),
        Cmd::Check { json: true } => check_json(&cli.target),
        // The definition only.
        Cmd::Check { json: false } => check(&on.cluster()?),
        Cmd::Plan { select, json } => plan(&select.load(&on.cluster()?)?, json),
        Cmd::Lanes { json } => lanes(&cli.target, &on.cluster()?, json),
        Cmd::Run(args) => hermetic_run(on.cluster()?, &cli.target, &args),
        // The definition and its state directory.
        Cmd::Validate { select, json } => on.with(|c, s| validate(c, s, &select.load(c)?, json)),
        Cmd::Smoke(lane) => on.with(|c, s| on_running(c, s, lane.options(c, "smoke")?)),
        Cmd::Script {
            interactive: true, ..
        } => on.with(|_, s| {
            let record = require_running(s)?;
            crate::script::interactive(&record, &s.root.join("interactive").into_std_path_buf())
        }),
        Cmd::Script {
            file,
            deadline,
            fresh: on_fresh,
            lane,
            start,
            ..
        } => on.with(|c, s| {
            // clap asks for FILE unless --interactive.
            let file = file.ok_or_else(|| bad_input("script: a FILE, or --interactive"))?;
            let opts = lane.options(script_lane(&file, deadline, c)?, "script");
            match on_fresh {
                true => fresh(c, s, &opts, &start),
                false => on_running(c, s, opts),
            }
        }),
        Cmd::Matrix(run) => on.with(|c, s| lane_on_running(c, s, "matrix", &run)),
        Cmd::BenchStorage(run) => on.with(|c, s| lane_on_running(c, s, "bench-storage", &run)),
        Cmd::Rerun(args) => on.with(|c, s| {
            let opts = args.options(c)?;
            let _lock = s.lock("rerun")?;
            Ok(crate::rerun::rerun(c, s, &opts)? as i32)
        }),
        Cmd::FreshSmoke { lane, start, save } => on.with(|c, s| {
            let mut opts = lane.options(c, "fresh-smoke")?;
            save.apply(&mut opts)?;
            fresh(c, s, &opts, &start)
        }),
        Cmd::FreshMatrix { lane, start, save } => on.with(|c, s| {
            let mut opts = lane.options(Lane::embedded("matrix", c)?, "fresh-matrix");
            save.apply(&mut opts)?;
            fresh(c, s, &opts, &start)
        }),
        Cmd::FreshBenchStorage { lane, start, save } => on.with(|c, s| {
            let lane_file = Lane::embedded("bench-storage", c)?;
            let mut opts = lane.options(lane_file, "fresh-bench-storage");
            save.apply(&mut opts)?;
            fresh(c, s, &opts, &start)
        }),
        Cmd::BenchCoronafsLocalMatrix { lane, start } => {
            on.with(|c, s| running_or_fresh(c, s, "bench-coronafs-local-matrix", &lane, &start))
        }
        Cmd::ProviderVmRealityProof { lane, start } => {
            on.with(|c, s| running_or_fresh(c, s, "provider-vm-reality-proof", &lane, &start))
        }
        Cmd::Build => on.with(build),
        Cmd::Start(args) => on.with(|c, s| start(c, s, &args)),
        Cmd::Status { json } => on.with(|_, s| status_command(s, json)),
        Cmd::Ssh { node, command } => on.with(|_, s| ssh(s, &node, &command)),
        Cmd::Stop { grace } => on.with(|_, s| stop(s, grace)),
        Cmd::Clean { all } => on.with(|_, s| {
            let _lock = s.lock("clean")?;
            cluster::clean(s, all)?;
            println!("cleaned {}", s.root);
            Ok(0)
        }),
        Cmd::Snapshot(cmd) => on.with(|c, s| snapshot_command(c, s, cmd).map(|()| 0)),
        Cmd::Fault(cmd) => on.with(|_, s| fault_command(&require_running(s)?, cmd).map(|()| 0)),
        Cmd::Restart {
            node,
            ready_timeout,
        } => on.with(|_, s| {
            let timeout = Duration::from_secs(ready_timeout);
            println!(
                "{}",
                crate::fault::restart(&require_running(s)?, &node, timeout)?.0
            );
            Ok(0)
        }),
        Cmd::Capture(cmd) => on.with(|_, s| capture(s, cmd)),
        Cmd::Bench { start, execs, out } => on.with(|c, s| {
            let _lock = s.lock("bench")?;
            crate::bench::suite(c, s, &start.options("bench", true), execs, &out)?;
            Ok(0)
        }),
        Cmd::BenchBoot(args) => on.with(|c, s| {
            let _lock = s.lock("bench-boot")?;
            crate::bench::boot(c, s, &args.options("bench-boot", true))?;
            Ok(0)
        }),
        Cmd::BenchFabric {
            start,
            from,
            to,
            transfers,
        } => on.with(|c, s| {
            let _lock = s.lock("bench-fabric")?;
            let opts = start.options("bench-fabric", true);
            crate::bench::fabric(c, s, &opts, (&from, &to), transfers)?;
            Ok(0)
        }),
    }
}

/// The command's name for the log's span: its variant, in lower case.
fn command_name(cmd: &Cmd) -> String {
    let name = format!("{cmd:?}");
    name.split([' ', '(', '{'])
        .next()
        .unwrap_or_default()
        .to_lowercase()
}

/// What a command stands on, loaded only when its arm asks: the cluster's
/// definition, and with it the state directory.
struct On<'a> {
    target: &'a Target,
    /// The cluster when the command line names none (`Cmd::default_profile`).
    profile: &'static str,
}

impl On<'_> {
    fn cluster(&self) -> Result<Cluster> {
        self.target.load(self.profile)
    }

    /// Runs `f` on the cluster and its state directory.
    fn with<T>(&self, f: impl FnOnce(&Cluster, &StateDir) -> Result<T>) -> Result<T> {
        let cluster = self.cluster()?;
        let state = self.target.state(&cluster)?;
        // Guests of a killed `start` or `fresh-*` must not outlive it for
        // long: any command on the state directory reaps them, and says so.
        if let Some(note) = cluster::reap_abandoned(&state)? {
            tracing::warn!("{note}");
        }
        f(&cluster, &state)
    }
}

/// The fabric's switch process (started by `start`, never by hand).
fn fabric_switch(config: &std::path::Path) -> Result<i32> {
    let text = std::fs::read_to_string(config)?;
    crate::fabric::switch::serve(serde_json::from_str(&text)?)?;
    Ok(0)
}

fn rerender(dir: &std::path::Path) -> Result<i32> {
    for f in crate::report::rerender(dir)? {
        println!("{}", f.display());
    }
    Ok(0)
}

fn compare(old: &std::path::Path, new: &std::path::Path, json: bool) -> Result<i32> {
    let c = crate::compare::compare_paths(old, new)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&c)?);
    } else {
        print!("{}", crate::compare::render(&c));
    }
    Ok(c.exit_code.into())
}

fn completions(shell: &str) -> Result<i32> {
    let shells = clap_complete::env::Shells::builtins();
    let shell = shells
        .completer(shell)
        .expect("clap checked the shell name");
    let name = "photon-cluster";
    shell.write_registration("COMPLETE", name, name, name, &mut std::io::stdout())?;
    Ok(0)
}

fn man() -> Result<i32> {
    let man = clap_mangen::Man::new(<Cli as clap::CommandFactory>::command());
    man.render(&mut std::io::stdout())?;
    Ok(0)
}

fn check(cluster: &Cluster) -> Result<i32> {
    println!(
        "{}: valid ({} nodes)",
        cluster.source.display(),
        cluster.nodes.len()
    );
    Ok(0)
}

fn plan(lane: &Lane, json: bool) -> Result<i32> {
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
    Ok(0)
}

/// The embedded lanes, each expanded against its cluster (or why it cannot be).
fn lanes(target: &Target, cluster: &Cluster, json: bool) -> Result<i32> {
    let each = crate::lane::LANES
        .iter()
        .map(|(name, _)| (*name, lane_for(target, cluster, name)));
    if json {
        let doc: Vec<serde_json::Value> = each
            .map(|(name, lane)| match lane {
                Ok(l) => serde_json::json!({
                    "name": name, "valid": true, "checks": l.check_count(),
                    "cluster": l.cluster,
                    "layers": l.layers.iter().map(|l| &l.name).collect::<Vec<_>>(),
                    "description": l.description,
                }),
                Err(e) => serde_json::json!({ "name": name, "valid": false, "error": e }),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(0);
    }
    for (name, lane) in each {
        match lane {
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
    Ok(0)
}

/// `validate`: exit 1 when any item failed.
fn validate(cluster: &Cluster, state: &StateDir, lane: &Lane, json: bool) -> Result<i32> {
    let items = crate::validate::run(cluster, state, lane);
    if json {
        println!("{}", serde_json::to_string_pretty(&items)?);
    } else {
        crate::validate::print(&items);
    }
    let failed = items
        .iter()
        .any(|i| i.outcome == crate::check::Outcome::Fail);
    Ok(if failed { 1 } else { 0 })
}

fn build(cluster: &Cluster, state: &StateDir) -> Result<i32> {
    let _lock = state.lock("build")?;
    let img = image::build(cluster, state)?;
    println!("kernel  {}", img.kernel.display());
    println!("initrd  {}", img.initrd.display());
    if img.rootfs.as_os_str().is_empty() {
        println!("rootfs  (none: the nodes boot from the store)");
    } else {
        println!("rootfs  {}", img.rootfs.display());
    }
    Ok(0)
}

fn start(cluster: &Cluster, state: &StateDir, args: &StartArgs) -> Result<i32> {
    let _lock = state.lock("start")?;
    cluster::start(cluster, state, &args.options("start", false))?;
    status::print(&status::collect(&require_running(state)?), false)?;
    Ok(0)
}

fn status_command(state: &StateDir, json: bool) -> Result<i32> {
    let record = require_running(state)?;
    let Some(owner) = record.owner.as_ref().filter(|o| o.starting && o.alive()) else {
        status::print(&status::collect(&record), json)?;
        return Ok(0);
    };
    // Answer at once: the guests are still booting, and their sessions
    // belong to `start`.
    if json {
        let doc = serde_json::json!({
            "state": "starting",
            "owner": owner,
            "launched": record.nodes.keys().collect::<Vec<_>>(),
        });
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
    Ok(0)
}

/// `ssh NODE [CMD...]`: an interactive shell, or one command's output and
/// exit code.
fn ssh(state: &StateDir, node: &str, command: &[String]) -> Result<i32> {
    let record = require_running(state)?;
    if command.is_empty() {
        return interactive_ssh(&record, node);
    }
    // `ssh NODE CMD` stays SSH, as its name says.
    let guest = crate::guest::connect_ssh(&record, node)?;
    let out = guest.exec(&remote_command(command)?, Duration::from_secs(600))?;
    print!("{}", out.stdout);
    eprint!("{}", out.stderr);
    Ok(out.code)
}

fn stop(state: &StateDir, grace: u64) -> Result<i32> {
    let _lock = state.lock("stop")?;
    let notes = cluster::stop(state, Duration::from_secs(grace))?;
    if notes.is_empty() {
        println!("no cluster running in {}", state.root);
    }
    for (node, note) in notes {
        println!("{node}: {note}");
    }
    Ok(0)
}

fn capture(state: &StateDir, cmd: CaptureCmd) -> Result<i32> {
    let record = require_running(state)?;
    match cmd {
        CaptureCmd::Start { file } => {
            let file = file.unwrap_or_else(|| {
                let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
                state
                    .root
                    .join(format!("fabric/capture-{stamp}.pcap"))
                    .into()
            });
            println!("{}", crate::fault::capture_start(&record, &file)?);
        }
        CaptureCmd::Stop => match crate::fault::capture_stop(&record)? {
            (Some(file), frames) => println!("{frames} frames in {}", file.display()),
            (None, _) => println!("no capture was running"),
        },
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
            let after = if stop { After::Stop } else { After::Resume };
            let t = std::time::Instant::now();
            let m = snapshot::save_running(
                cluster,
                state,
                &record,
                &name,
                after,
                snapshot::Memory::Raw,
            )?;
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
            crate::layered::assemble(&args.assemble, &args.out, args.keep_failed, args.json, None)?;
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
    // The lane, read before anything starts: its script checks run python3,
    // which is then judged and recorded like the other tools.
    let lane = match args.ready {
        true => None,
        false => Some(args.select.load(&cluster)?),
    };
    if lane
        .iter()
        .flat_map(|l| l.checks())
        .any(|c| c.kind == "script")
    {
        paths.push(crate::hermetic::tool_path("python3")?);
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
        let code = crate::layered::ready(
            &cluster,
            &state,
            &start,
            &args.out,
            checked,
            args.keep_failed,
        )?;
        return Ok(code as i32);
    }
    let mut lane = lane.expect("read above unless --ready");
    if let Some(jobs) = args.jobs {
        let (out, keep, json) = (&args.out, args.keep_failed, args.json);
        return Ok(crate::graph::run(&lane, out, jobs.into(), keep, json)? as i32);
    }
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
        save_ready: None,
    };
    let _lock = state.lock("run")?;
    if let Some(why) = args.from_ready.as_deref().and_then(crate::layered::missing) {
        let (out, keep) = (&args.out, args.keep_failed);
        let code =
            smoke::hermetic_without_ready(&cluster, &state, &opts, out, checked, &why, keep)?;
        return Ok(code as i32);
    }
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

/// A lane against the running cluster.
fn on_running(cluster: &Cluster, state: &StateDir, opts: LaneOptions) -> Result<i32> {
    let _lock = state.lock(&opts.command)?;
    Ok(smoke::smoke(cluster, state, &opts)? as i32)
}

/// A lane on a fresh cluster, booted and stopped for it.
fn fresh(
    cluster: &Cluster,
    state: &StateDir,
    opts: &LaneOptions,
    start: &StartArgs,
) -> Result<i32> {
    let _lock = state.lock(&opts.command)?;
    let start = start.options(&opts.command, true);
    Ok(smoke::fresh_smoke(cluster, state, opts, &start)? as i32)
}

/// An embedded lane against the running cluster (`smoke --lane <name>`),
/// from the command of the lane's name.
fn lane_on_running(cluster: &Cluster, state: &StateDir, lane: &str, run: &LaneRun) -> Result<i32> {
    on_running(
        cluster,
        state,
        run.options(Lane::embedded(lane, cluster)?, lane),
    )
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
        fresh(
            cluster,
            state,
            &run.options(Lane::embedded(lane, cluster)?, lane),
            start,
        )
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
