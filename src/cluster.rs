//! The cluster as a whole: start (boot every node and wait for it to be
//! ready), status, stop and clean. `start` persists what it launched in
//! `<state>/cluster.json`, so later commands attach without guessing.

use crate::error::{ErrorKind, Interrupted, bad_input, named};
use crate::guest::{self, Endpoint, Guest};
use crate::machine::{self, MachineConfig, accel::AccelRequest};
use crate::progress::Progress;
use crate::spec::Cluster;
use crate::state::{self, RunningCluster, RunningNode, StateDir};
use crate::wait::{Probe, Wait};
use crate::{fabric, image, provision, snapshot};
use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct StartOptions {
    pub accel: AccelRequest,
    /// Deadline for each node to become ready, from its launch.
    pub ready_timeout: Duration,
    pub readiness: Readiness,
    /// Restore this snapshot (snapshot.rs) instead of booting.
    pub from_snapshot: Option<String>,
    /// The command starting the cluster; with `keep_owner`, the guests stay
    /// this process's after start (a `fresh-*` run stops them itself, and if
    /// it is killed, the next command reaps them).
    pub command: String,
    pub keep_owner: bool,
    /// The L2 segment: the driver's switch (default) or QEMU's hub.
    pub fabric: fabric::Kind,
}

/// When a node counts as up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// SSH answers with the cluster key and every expected unit is active.
    Full,
    /// The login prompt appeared on the serial console; no driver checks at
    /// all. The baseline `bench boot` compares the driver against.
    ConsoleLogin,
}

/// Refuses to start over a cluster that is still running in this state dir;
/// clears the record of one whose processes are all gone.
fn refuse_if_running(state: &StateDir) -> Result<()> {
    if let Some(running) = state.load_running()? {
        let alive: Vec<&String> = running
            .nodes
            .iter()
            .filter(|(_, n)| machine::is_running(n.pid_now()))
            .map(|(name, _)| name)
            .collect();
        if !alive.is_empty() {
            return Err(named(
                ErrorKind::AlreadyRunning,
                bad_input(format!(
                    "a cluster is already running in {} (nodes {}); run `photon-cluster stop` first",
                    state.root,
                    alive
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            ));
        }
        if let Some(f) = &running.fabric {
            f.kill();
        }
        fs::remove_file(state.cluster_file())?;
    }
    Ok(())
}

/// Boots every node in dependency order and waits until each is ready: SSH
/// answers and its expected units are active. On failure or Ctrl-C, every
/// QEMU started here is killed before returning.
///
/// The steps: refuse what cannot start (a running cluster, a stale
/// snapshot, a missing tool, a taken port) before anything runs; choose
/// the accelerator; prepare every node's disks and QEMU configuration;
/// start the fabric; launch the guests; wait until each is ready.
pub fn start(cluster: &Cluster, state: &StateDir, opts: &StartOptions) -> Result<RunningCluster> {
    refuse_if_running(state)?;
    let image = image::resolve(cluster, state)?;
    require_tools()?;
    // A snapshot is checked before anything starts: a stale one is refused.
    let restore = match &opts.from_snapshot {
        Some(name) => Some(snapshot::open(
            state,
            name,
            &snapshot::key(cluster, &image)?,
        )?),
        None => None,
    };
    // Host ports are chosen afresh, also for a restore: the guests never see
    // them, and several restores of one snapshot then run side by side.
    let ports = fabric::allocate_ports(cluster)?;
    let accel = choose_accel(state, &image, restore.as_ref(), opts.accel)?;
    if let Some(m) = &restore {
        tracing::info!("snapshot: restoring {:?} saved {}", m.name, m.created);
        m.restore_files(state)?;
    }
    let keys = provision::cluster_keys(state.ssh().as_std_path())?;
    let segment = plan_segment(cluster, state, opts.fabric, &ports)?;
    let plan = Plan {
        cluster,
        state,
        image: &image,
        restore: restore.as_ref(),
        keys: &keys,
        accel: accel.used,
    };
    // Every node's disks before any launch, so bad input or a full disk
    // stops us before a single QEMU runs.
    let prepared = cluster
        .nodes
        .iter()
        .enumerate()
        .map(|(index, node)| {
            let link = segment.links[&node.name].clone();
            prepare_node(&plan, index, node, ports[&node.name].clone(), link)
        })
        .collect::<Result<Vec<_>>>()?;
    let known_hosts = state.ssh().join("known_hosts");
    fs::write(&known_hosts, known_hosts_text(&prepared))?;
    let record = RunningCluster {
        name: cluster.name.clone(),
        source: cluster.source.display().to_string(),
        accel,
        started_unix: chrono::Utc::now().timestamp(),
        ssh_key: keys.private_key.clone(),
        known_hosts: known_hosts.into(),
        image: image.clone(),
        nodes: BTreeMap::new(),
        restored_from: restore.as_ref().map(|m| m.name.clone()),
        owner: Some(state::Owner::me(&opts.command, true)),
        fabric: None,
    };
    let mut record = start_fabric(state, record, segment)?;
    let t0 = Instant::now();
    let launched = launch_and_wait(&plan, &mut record, &prepared, opts, t0);
    let ready = match launched {
        Ok(ready) => ready,
        Err(e) => {
            tracing::warn!("start failed; stopping every node it launched");
            teardown(&record);
            let _ = fs::remove_file(state.cluster_file());
            return Err(e);
        }
    };
    for (name, phases, channel) in ready {
        if let Some(n) = record.nodes.get_mut(&name) {
            n.ready_after_s = phases.ready_s;
            n.phases = Some(phases);
            n.channel = channel;
        }
    }
    if cluster.channel == state::ChannelKind::Agent {
        record_channels(&mut record);
    }
    for n in record.nodes.values_mut() {
        n.channel.get_or_insert(state::ChannelKind::Ssh);
    }
    record.owner = opts
        .keep_owner
        .then(|| state::Owner::me(&opts.command, false));
    state.save_running(&record)?;
    crate::release_owned();
    tracing::info!(
        "cluster {}: {} nodes ready in {:.1} s (accel {})",
        record.name,
        record.nodes.len(),
        t0.elapsed().as_secs_f64(),
        record.accel.summary()
    );
    Ok(record)
}

/// The host programs a start needs, each refused with its package's name.
fn require_tools() -> Result<()> {
    crate::host::require_program(machine::QEMU, "qemu-system-x86")?;
    crate::host::require_program("qemu-img", "qemu-utils")?;
    crate::host::require_program("mkfs.ext4", "e2fsprogs")?;
    crate::host::require_program("ssh-keygen", "openssh-client")
}

/// The accelerator: a restore's is the one its memory was saved under.
fn choose_accel(
    state: &StateDir,
    image: &state::ImageRecord,
    restore: Option<&snapshot::Manifest>,
    request: AccelRequest,
) -> Result<machine::accel::AccelChoice> {
    let accel = match restore {
        Some(m) => m.record.accel.clone(),
        None => machine::accel::choose(
            request,
            &image.kernel,
            state.accel_probe().as_std_path(),
            state.root.join("probe").as_std_path(),
        )?,
    };
    match &accel.fallback_reason {
        Some(r) => tracing::info!("accel: using TCG (software emulation): {r}"),
        None => tracing::info!("accel: using {}", accel.used.name().to_uppercase()),
    }
    Ok(accel)
}

/// The L2 segment's links, on ports none of the forwards use.
fn plan_segment(
    cluster: &Cluster,
    state: &StateDir,
    kind: fabric::Kind,
    ports: &BTreeMap<String, fabric::NodePorts>,
) -> Result<fabric::Segment> {
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    let taken = ports
        .values()
        .flat_map(|p| p.all())
        .map(|f| f.host)
        .collect();
    fabric::Segment::plan(kind, state.root.as_std_path(), &names, &taken)
}

/// What preparing the nodes of one start shares.
struct Plan<'a> {
    cluster: &'a Cluster,
    state: &'a StateDir,
    image: &'a state::ImageRecord,
    restore: Option<&'a snapshot::Manifest>,
    keys: &'a provision::ClusterKeys,
    accel: machine::Accel,
}

/// A node ready to launch: its definition, QEMU configuration, host ports
/// and the host key SSH will pin.
struct Prepared<'a> {
    node: &'a crate::spec::Node,
    config: MachineConfig,
    ports: fabric::NodePorts,
    host_key: String,
}

/// Writes a node's disks (or takes a snapshot's) and says how QEMU runs it.
fn prepare_node<'a>(
    plan: &Plan,
    index: usize,
    node: &'a crate::spec::Node,
    ports: fabric::NodePorts,
    link: fabric::Link,
) -> Result<Prepared<'a>> {
    let name = &node.name;
    let dir = plan.state.node(name);
    // A pidfile from an earlier run must not stand for the new QEMU.
    let _ = fs::remove_file(dir.join("qemu.pid"));
    let host_key = match plan.restore {
        Some(m) => m.host_key(name)?,
        None => fresh_disks(plan, index, node)?,
    };
    let mut config = machine_config(plan, node, index, &ports, link);
    if let Some(m) = plan.restore {
        m.check_machine(name, &machine::qemu_args(&config), plan.state.root.as_str())?;
        config.incoming = Some(m.memory(name)?);
    }
    Ok(Prepared {
        node,
        config,
        ports,
        host_key,
    })
}

/// A booted node's new disks: a copy-on-write overlay of its image (or a
/// blank state disk for a store-booted NixOS node) and its config disk.
/// Returns the host key the config disk gives it.
fn fresh_disks(plan: &Plan, index: usize, node: &crate::spec::Node) -> Result<String> {
    let name = &node.name;
    let dir = plan.state.node(name);
    let overlay = dir.join("overlay.qcow2");
    let (_, _, rootfs, _) = plan.image.for_node(name);
    let _ = fs::remove_dir_all(&dir);
    plan.state.create_node(name)?;
    match plan.image.store_for(name) {
        // NixOS formats the blank disk at first boot (nix/roles/common.nix).
        Some(_) => run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&overlay)
            .arg(STATE_DISK)),
        None => run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&rootfs)
            .arg(&overlay)),
    }
    .with_context(|| format!("{name}: creating the copy-on-write overlay"))?;
    provision::config_disk(plan.cluster, index, node, plan.keys, dir.as_std_path())
}

/// How QEMU runs a node: files in its node directory, its host ports and
/// MACs, and a machine id fixed by the state directory and the node's name.
fn machine_config(
    plan: &Plan,
    node: &crate::spec::Node,
    index: usize,
    ports: &fabric::NodePorts,
    link: fabric::Link,
) -> MachineConfig {
    let name = &node.name;
    let dir = plan.state.node(name);
    let (kernel, initrd, _, extra_append) = plan.image.for_node(name);
    let (host_mac, fabric_mac) = fabric::macs(index);
    MachineConfig {
        name: name.clone(),
        accel: plan.accel,
        memory_mib: node.memory_mib,
        vcpus: node.vcpus,
        kernel,
        initrd,
        extra_append,
        overlay: dir.join("overlay.qcow2").into(),
        config_disk: dir.join("config.img").into(),
        serial_log: dir.join("vm.log").into(),
        qmp_socket: dir.join("qmp.sock").into(),
        agent_socket: dir.join("agent.sock").into(),
        pidfile: dir.join("qemu.pid").into(),
        forwards: ports.all(),
        host_mac,
        fabric_mac,
        fabric: link,
        machine_id: hex::encode(
            &Sha256::digest(format!("{}/{name}", plan.state.root).as_bytes())[..16],
        ),
        incoming: None,
        store: plan.image.store_for(name),
    }
}

/// known_hosts pinning each node's host key on its SSH port.
fn known_hosts_text(prepared: &[Prepared]) -> String {
    prepared
        .iter()
        .map(|p| format!("[127.0.0.1]:{} {}\n", p.ports.ssh, p.host_key))
        .collect()
}

/// Saves the record, then starts the switch, which watches it, before any
/// guest sends a frame.
fn start_fabric(
    state: &StateDir,
    mut record: RunningCluster,
    mut segment: fabric::Segment,
) -> Result<RunningCluster> {
    state.save_running(&record)?;
    if let Err(e) = segment.start(
        state.root.join("fabric").as_std_path(),
        state.cluster_file().as_std_path(),
    ) {
        let _ = fs::remove_file(state.cluster_file());
        return Err(e);
    }
    record.fabric = Some(segment);
    state.save_running(&record)?;
    Ok(record)
}

/// Launches every node, resumes a restore, and waits until each is ready;
/// returns each node's boot phases. The caller tears down on error.
fn launch_and_wait(
    plan: &Plan,
    record: &mut RunningCluster,
    prepared: &[Prepared],
    opts: &StartOptions,
    t0: Instant,
) -> Result<Vec<Ready>> {
    // Launch in dependency order. Guests boot concurrently (under TCG a
    // sequential boot would multiply the wall time); dependency order decides
    // the launch order and when each node's readiness is judged.
    let order: Vec<String> = plan
        .cluster
        .boot_order()
        .iter()
        .map(|n| n.name.clone())
        .collect();
    for name in &order {
        if crate::interrupted() {
            return Err(crate::stop_error());
        }
        let p = prepared
            .iter()
            .find(|p| p.config.name == *name)
            .expect("every ordered node was prepared");
        launch(plan.state, record, p, t0)?;
    }
    if plan.restore.is_some() {
        snapshot::resume(record, opts.ready_timeout).inspect_err(|_| {
            tracing::warn!("restore failed");
        })?;
    }
    let progress = Progress::new(&order);
    let result = match opts.readiness {
        Readiness::Full => wait_ready(
            plan.cluster,
            record,
            &prepared_endpoints(record, prepared),
            (opts, t0),
            &progress,
        ),
        Readiness::ConsoleLogin => {
            wait_console_login(record, opts.ready_timeout, &progress).map(|ready| {
                let phases = |name: &String, secs| state::BootPhases {
                    ready_s: Some(secs),
                    ..record.nodes[name].phases.clone().unwrap_or_default()
                };
                // No channel was opened: `start` asks each node afterwards.
                ready
                    .into_iter()
                    .map(|(n, s)| (n.clone(), phases(&n, s), None))
                    .collect()
            })
        }
    };
    progress.finish();
    result
}

/// Starts one node's QEMU and records it (saved at once, so that a killed
/// `start` leaves a record the next command can reap from).
fn launch(state: &StateDir, record: &mut RunningCluster, p: &Prepared, t0: Instant) -> Result<()> {
    let name = &p.config.name;
    let dir = state.node(name);
    let child = machine::launch(&p.config, dir.join("qemu.log").as_std_path())?;
    crate::own_pid(child.id() as i32);
    record.nodes.insert(
        name.clone(),
        RunningNode {
            role: p.node.role,
            address: p.node.address.to_string(),
            pid: child.id() as i32,
            ssh_port: p.ports.ssh,
            forwards: p.ports.forwards.clone(),
            units: p.node.units.clone(),
            dir: dir.clone().into(),
            booted_unix: chrono::Utc::now().timestamp(),
            ready_after_s: None,
            channel: None,
            phases: Some(state::BootPhases {
                launched_s: t0.elapsed().as_secs_f64(),
                ..Default::default()
            }),
            qemu_args: machine::qemu_args(&p.config),
        },
    );
    // The Child is dropped without waiting: QEMU outlives `start`.
    drop(child);
    state.save_running(record)
}

/// Each node's SSH endpoint: its port, the cluster key, its pinned host key.
fn prepared_endpoints(
    record: &RunningCluster,
    prepared: &[Prepared],
) -> BTreeMap<String, Endpoint> {
    prepared
        .iter()
        .map(|p| {
            let name = p.config.name.clone();
            let endpoint = Endpoint {
                node: name.clone(),
                port: p.ports.ssh,
                key: record.ssh_key.clone(),
                host_key: p.host_key.clone(),
            };
            (name, endpoint)
        })
        .collect()
}

/// The size of a store-booted node's blank state disk (sparse qcow2).
const STATE_DISK: &str = "8G";

#[derive(Clone, PartialEq)]
enum Phase {
    Waiting,
    Ready,
    Failed,
}

/// A node that became ready: its name, its boot's phases, and the channel
/// its readiness was seen over (None: not known yet).
type Ready = (String, state::BootPhases, Option<state::ChannelKind>);

/// One thread per node. A node's readiness is judged only after its
/// dependencies are ready; if one of them fails, it stops waiting. Each
/// node's phases are timed from `t0`, the first launch.
fn wait_ready(
    cluster: &Cluster,
    record: &RunningCluster,
    endpoints: &BTreeMap<String, Endpoint>,
    (opts, t0): (&StartOptions, Instant),
    progress: &Progress,
) -> Result<Vec<Ready>> {
    let readiness: Arc<(Mutex<BTreeMap<String, Phase>>, Condvar)> = Arc::new((
        Mutex::new(
            record
                .nodes
                .keys()
                .map(|k| (k.clone(), Phase::Waiting))
                .collect(),
        ),
        Condvar::new(),
    ));
    let started = Instant::now();
    let results: Vec<Result<Ready>> = std::thread::scope(|s| {
        let handles: Vec<_> = record
            .nodes
            .iter()
            .map(|(name, node)| {
                let readiness = readiness.clone();
                let spec = cluster.node(name).expect("node in spec");
                let deps: Vec<String> = spec.depends_on.clone();
                let endpoint = endpoints[name].clone();
                s.spawn(move || {
                    let _node = tracing::info_span!("node", node = %name).entered();
                    let console = node.dir.join("vm.log");
                    let pid = node.pid;
                    let mut phases = node.phases.clone().unwrap_or_default();
                    // The kernel's banner, looked for on the console while sshd is awaited.
                    let kernel_at: Mutex<Option<f64>> = Mutex::new(None);
                    let kernel_ref = &kernel_at;
                    let console_ref = &console;
                    // A QMP look for a guest paused on a full disk, every 5 s.
                    let looked = std::sync::Mutex::new(Instant::now());
                    let abort = move || -> Option<anyhow::Error> {
                        if let Ok(mut k) = kernel_ref.lock()
                            && k.is_none()
                            && shows_kernel_banner(&fs::read(console_ref).unwrap_or_default())
                        {
                            *k = Some(t0.elapsed().as_secs_f64());
                        }
                        if crate::interrupted() {
                            return Some(crate::stop_error());
                        }
                        if let Ok(mut at) = looked.lock()
                            && at.elapsed() >= Duration::from_secs(5)
                        {
                            *at = Instant::now();
                            if let Some(e) = machine::disk_stall(name, &node.dir) {
                                return Some(e);
                            }
                        }
                        // A second look before declaring a death: one
                        // unexplained early "exit" with empty logs was seen.
                        if !machine::is_running(pid) && {
                            std::thread::sleep(Duration::from_millis(200));
                            !machine::is_running(pid)
                        } {
                            return Some(machine::boot_death(name, "boot", &node.dir));
                        }
                        None
                    };
                    // The agent's port where the cluster asked for it.
                    let agent = (cluster.channel == state::ChannelKind::Agent)
                        .then(|| node.dir.join("agent.sock"));
                    let outcome = (|| -> Result<Ready> {
                        progress.set(name, "booting");
                        let guest: Guest = guest::wait_for_guest(
                            &endpoint,
                            agent.as_deref(),
                            opts.ready_timeout,
                            &console,
                            &abort,
                        )?;
                        phases.sshd_s = Some(t0.elapsed().as_secs_f64());
                        if record.restored_from.is_some() {
                            // Restored guests wake with the clock of the save.
                            guest.set_clock(Duration::from_secs(20))?;
                        }
                        if let Some(ch) = guest.agent() {
                            ch.follow(&node.units);
                        }
                        let up = match guest.channel() {
                            state::ChannelKind::Agent => "agent up",
                            state::ChannelKind::Ssh => "sshd up",
                        };
                        progress.set(name, &format!("{up}; waiting for dependencies"));
                        wait_for_deps(&readiness, name, &deps, &abort)?;
                        phases.units_s = Some(t0.elapsed().as_secs_f64());
                        progress.set(name, &format!("waiting for {} units", node.units.len()));
                        let left = opts.ready_timeout.saturating_sub(started.elapsed());
                        let units = guest::wait_for_units(
                            &guest,
                            &node.units,
                            left.max(Duration::from_secs(30)),
                            &abort,
                        )?;
                        let secs = units.known.saturating_duration_since(t0).as_secs_f64();
                        progress.done(name, &format!("ready in {secs:.1} s"));
                        phases.ready_s = Some(secs);
                        phases.active_s = units
                            .active
                            .map(|at| at.saturating_duration_since(t0).as_secs_f64());
                        phases.noticed_s = phases
                            .active_s
                            .map(|active| secs - active.max(phases.units_s.unwrap_or(0.0)));
                        phases.kernel_s = *kernel_at.lock().expect("kernel banner");
                        Ok((name.clone(), phases, Some(guest.channel())))
                    })();
                    let (lock, cvar) = &*readiness;
                    lock.lock().expect("phases").insert(
                        name.clone(),
                        if outcome.is_ok() {
                            Phase::Ready
                        } else {
                            Phase::Failed
                        },
                    );
                    cvar.notify_all();
                    if let Err(e) = &outcome {
                        progress.done(name, &format!("FAILED: {}", first_line(e)));
                    }
                    outcome
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("node thread"))
            .collect()
    });
    let mut ready = Vec::new();
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(x) => ready.push(x),
            Err(e) if e.is::<Interrupted>() || e.is::<crate::error::TimedOut>() => return Err(e),
            Err(e) => errors.push(e),
        }
    }
    // Report the root cause first, not the nodes that gave up waiting on it.
    errors.sort_by_key(|e| e.to_string().contains("dependency"));
    match errors.into_iter().next() {
        None => Ok(ready),
        Some(e) => Err(e),
    }
}

/// Waits for the login prompt on every node's console, and nothing else.
fn wait_console_login(
    record: &RunningCluster,
    deadline: Duration,
    progress: &Progress,
) -> Result<Vec<(String, f64)>> {
    let started = Instant::now();
    let mut pending: BTreeMap<&String, &RunningNode> = record.nodes.iter().collect();
    let mut ready = Vec::new();
    let stop = || crate::interrupted().then(crate::stop_error);
    Wait::new("login prompt on every console", deadline)
        .stop_when(&stop)
        .run(|| {
            pending.retain(|name, node| {
                let text = fs::read(node.dir.join("vm.log")).unwrap_or_default();
                if shows_login_prompt(&text) {
                    let secs = started.elapsed().as_secs_f64();
                    progress.done(name, &format!("login prompt after {secs:.1} s"));
                    ready.push(((*name).clone(), secs));
                    return false;
                }
                true
            });
            if let Some((name, node)) = pending.iter().find(|(_, n)| !machine::is_running(n.pid)) {
                bail!(
                    "{name}: QEMU exited before the login prompt; see {}",
                    node.dir.join("vm.log").display()
                );
            }
            Ok(if pending.is_empty() {
                Probe::Done(())
            } else {
                Probe::Pending(format!("waiting on {:?}", pending.keys()))
            })
        })
        .map_err(crate::wait::unwrap_stopped)?;
    Ok(ready)
}

fn shows_kernel_banner(console: &[u8]) -> bool {
    console.windows(14).any(|w| w == b"Linux version ")
}

fn shows_login_prompt(console: &[u8]) -> bool {
    console.windows(7).any(|w| w == b" login:")
}

fn first_line(e: &anyhow::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

fn wait_for_deps(
    phases: &(Mutex<BTreeMap<String, Phase>>, Condvar),
    name: &str,
    deps: &[String],
    abort: guest::Stop,
) -> Result<()> {
    let (lock, cvar) = phases;
    let mut map = lock.lock().expect("phases");
    loop {
        if let Some(d) = deps.iter().find(|d| map.get(*d) == Some(&Phase::Failed)) {
            bail!("{name}: dependency {d} failed to become ready");
        }
        if deps.iter().all(|d| map.get(d) == Some(&Phase::Ready)) {
            return Ok(());
        }
        if let Some(e) = abort() {
            return Err(e);
        }
        map = cvar
            .wait_timeout(map, Duration::from_millis(500))
            .expect("phases")
            .0;
    }
}

/// Reaps the guests of a command that was killed while it owned them (a
/// SIGKILLed `start` or `fresh-*`): kills its QEMUs and removes the record.
/// Returns what it did, for the user; nothing when no owner was lost.
pub fn reap_abandoned(state: &StateDir) -> Result<Option<String>> {
    let Some(record) = state.load_running()? else {
        return Ok(None);
    };
    let Some(owner) = &record.owner else {
        return Ok(None);
    };
    if owner.alive() {
        return Ok(None);
    }
    let running: Vec<String> = record
        .nodes
        .iter()
        .filter(|(_, n)| machine::is_running(n.pid_now()))
        .map(|(name, n)| format!("{name} (pid {})", n.pid_now()))
        .collect();
    teardown(&record);
    fs::remove_file(state.cluster_file())?;
    Ok(Some(format!(
        "`{}` (pid {}) ended without {} its cluster; reaped {} QEMU process(es): {}",
        owner.command,
        owner.pid,
        if owner.starting {
            "finishing"
        } else {
            "stopping"
        },
        running.len(),
        if running.is_empty() {
            "none left".to_string()
        } else {
            running.join(", ")
        }
    )))
}

/// Kills every node of a record at once (failure or Ctrl-C during start),
/// and its switch.
pub fn teardown(record: &RunningCluster) {
    for node in record.nodes.values() {
        machine::kill_now(node.pid_now());
    }
    if let Some(f) = &record.fabric {
        f.kill();
    }
}

/// Powers every node down over QMP, killing what does not stop in `grace`.
pub fn stop(state: &StateDir, grace: Duration) -> Result<Vec<(String, String)>> {
    let Some(record) = state.load_running()? else {
        return Ok(Vec::new());
    };
    let notes: Vec<(String, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = record
            .nodes
            .iter()
            .map(|(name, n)| {
                s.spawn(move || {
                    (
                        name.clone(),
                        machine::stop(n.pid_now(), &n.dir.join("qmp.sock"), grace),
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("stop thread"))
            .collect()
    });
    let left: Vec<&String> = record
        .nodes
        .iter()
        .filter(|(_, n)| machine::is_running(n.pid_now()))
        .map(|(name, _)| name)
        .collect();
    if !left.is_empty() {
        bail!("QEMU still running for {left:?} after stop");
    }
    if let Some(f) = &record.fabric {
        f.kill();
    }
    fs::remove_file(state.cluster_file())?;
    Ok(notes)
}

/// Removes the runtime state (and with `all`, the images, snapshots and probe cache).
pub fn clean(state: &StateDir, all: bool) -> Result<()> {
    if state.load_running()?.is_some() {
        stop(state, Duration::from_secs(30))?;
    }
    for dir in state.node_dirs() {
        let _ = fs::remove_dir_all(dir);
    }
    for dir in [
        state.root.join("nodes"),
        state.root.join("fabric"),
        state.ssh(),
        state.root.join("probe"),
    ] {
        let _ = fs::remove_dir_all(dir);
    }
    if all {
        let _ = fs::remove_dir_all(state.images());
        let _ = fs::remove_dir_all(state.snapshots());
        let _ = fs::remove_file(state.accel_probe());
    }
    Ok(())
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// For a cluster that asks for the agent (`[cluster] channel = "agent"`):
/// which way the driver will reach each ready node whose readiness did not
/// show it (a console-login start opens no channel): its agent if the
/// agent answers on the node's port (asked of all nodes at once), else SSH.
fn record_channels(record: &mut RunningCluster) {
    let found: Vec<(String, state::ChannelKind)> = std::thread::scope(|s| {
        let asks: Vec<_> = record
            .nodes
            .iter()
            .filter(|(_, n)| n.channel.is_none())
            .map(|(name, n)| {
                s.spawn(move || {
                    let sock = n.dir.join("agent.sock");
                    let kind = match guest::Channel::connect(name, &sock, Duration::from_secs(2)) {
                        Ok(_) => state::ChannelKind::Agent,
                        Err(e) => {
                            tracing::info!("{name}: no guest agent ({e:#}); driven over SSH");
                            state::ChannelKind::Ssh
                        }
                    };
                    (name.clone(), kind)
                })
            })
            .collect();
        asks.into_iter()
            .map(|a| a.join().expect("channel probe"))
            .collect()
    });
    for (name, kind) in found {
        if let Some(n) = record.nodes.get_mut(&name) {
            n.channel = Some(kind);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The steps of `start` that need no QEMU: ports, the fabric's links,
    /// each node's configuration and the known_hosts that pins them.
    #[test]
    fn start_prepares_each_node_from_its_ports_link_and_state_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let cluster = Cluster::profile("reference").unwrap();
        let state = StateDir::new(tmp.path().join("a")).unwrap();
        let image: state::ImageRecord = serde_json::from_value(serde_json::json!({
            "provider": "prebuilt", "kernel": "/img/k", "initrd": "/img/i",
            "rootfs": "/img/r", "id": "x"
        }))
        .unwrap();
        let keys = provision::cluster_keys(tmp.path().join("ssh").as_path()).unwrap();
        let plan = Plan {
            cluster: &cluster,
            state: &state,
            image: &image,
            restore: None,
            keys: &keys,
            accel: machine::Accel::Tcg,
        };
        let ports = fabric::allocate_ports(&cluster).unwrap();
        let segment = plan_segment(&cluster, &state, fabric::Kind::Switch, &ports).unwrap();
        let forwarded: BTreeSet<u16> = ports
            .values()
            .flat_map(|p| p.all())
            .map(|f| f.host)
            .collect();
        let mut prepared = Vec::new();
        for (i, node) in cluster.nodes.iter().enumerate() {
            let link = segment.links[&node.name].clone();
            let fabric::Link::Switch {
                switch_port,
                qemu_port,
            } = link
            else {
                panic!("a switched segment");
            };
            assert!(!forwarded.contains(&switch_port) && !forwarded.contains(&qemu_port));
            let c = machine_config(&plan, node, i, &ports[&node.name], link);
            assert_eq!(
                (c.forwards[0].guest, c.forwards[0].host),
                (22, ports[&node.name].ssh)
            );
            assert!(c.overlay.starts_with(state.node(&node.name).as_std_path()));
            assert_eq!(c.kernel, std::path::Path::new("/img/k"));
            assert_eq!(c.accel, machine::Accel::Tcg);
            prepared.push(Prepared {
                node,
                config: c,
                ports: ports[&node.name].clone(),
                host_key: format!("ssh-ed25519 KEY{i}"),
            });
        }
        let distinct = |f: &dyn Fn(&MachineConfig) -> String| {
            prepared
                .iter()
                .map(|p| f(&p.config))
                .collect::<BTreeSet<_>>()
                .len()
        };
        let n = cluster.nodes.len();
        assert_eq!(distinct(&|c| c.machine_id.clone()), n);
        assert_eq!(distinct(&|c| c.fabric_mac.clone()), n);
        // The machine id is the state directory's and the node's: the same
        // node in another state directory is another machine.
        let other = StateDir::new(tmp.path().join("b")).unwrap();
        let elsewhere = Plan {
            state: &other,
            ..plan
        };
        let first = &cluster.nodes[0];
        let p0 = &ports[&first.name];
        let link = segment.links[&first.name].clone();
        let again = machine_config(&plan, first, 0, p0, link.clone());
        assert_eq!(again.machine_id, prepared[0].config.machine_id);
        assert_ne!(
            machine_config(&elsewhere, first, 0, p0, link).machine_id,
            again.machine_id
        );
        let hosts = known_hosts_text(&prepared);
        assert_eq!(hosts.lines().count(), n);
        assert!(hosts.starts_with(&format!("[127.0.0.1]:{} ssh-ed25519 KEY0\n", p0.ssh)));
    }
}
