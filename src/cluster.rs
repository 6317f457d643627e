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
pub fn start(cluster: &Cluster, state: &StateDir, opts: &StartOptions) -> Result<RunningCluster> {
    refuse_if_running(state)?;
    let image = image::resolve(cluster, state)?;
    crate::host::require_program(machine::QEMU, "qemu-system-x86")?;
    crate::host::require_program("qemu-img", "qemu-utils")?;
    crate::host::require_program("mkfs.ext4", "e2fsprogs")?;
    crate::host::require_program("ssh-keygen", "openssh-client")?;
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
    let accel = match &restore {
        // The saved state only runs under the accelerator it was saved from.
        Some(m) => m.record.accel.clone(),
        None => machine::accel::choose(
            opts.accel,
            &image.kernel,
            state.accel_probe().as_std_path(),
            state.root.join("probe").as_std_path(),
        )?,
    };
    let accel_used = accel.used;
    match &accel.fallback_reason {
        Some(r) => tracing::info!("accel: using TCG (software emulation): {r}"),
        None => tracing::info!("accel: using {}", accel.used.name().to_uppercase()),
    }
    if let Some(m) = &restore {
        tracing::info!("snapshot: restoring {:?} saved {}", m.name, m.created);
        m.restore_files(state)?;
    }
    let keys = provision::cluster_keys(state.ssh().as_std_path())?;
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    let mut segment = fabric::Segment::plan(
        opts.fabric,
        state.root.as_std_path(),
        &names,
        &ports
            .values()
            .flat_map(|p| p.all())
            .map(|f| f.host)
            .collect(),
    )?;

    // Prepare every node's disks before launching any, so bad input or a
    // full disk stops us before a single QEMU runs.
    let mut prepared = Vec::new();
    for (index, node) in cluster.nodes.iter().enumerate() {
        let name = node.name.clone();
        let dir = state.node(&name);
        let overlay = dir.join("overlay.qcow2");
        let (kernel, initrd, rootfs, extra_append) = image.for_node(&name);
        let store = image.store_for(&name);
        // A pidfile from an earlier run must not stand for the new QEMU.
        let _ = fs::remove_file(dir.join("qemu.pid"));
        let host_key = match &restore {
            Some(m) => m.host_key(&name)?,
            None => {
                let _ = fs::remove_dir_all(&dir);
                state.create_node(&name)?;
                match &store {
                    // A store-booted NixOS node: a blank state disk, which
                    // NixOS formats at first boot (nix/roles/common.nix).
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
                provision::config_disk(cluster, index, node, &keys, dir.as_std_path())?
            }
        };
        let (host_mac, fabric_mac) = fabric::macs(index);
        let node_ports = ports[&name].clone();
        let mut config = MachineConfig {
            name: name.clone(),
            accel: accel_used,
            memory_mib: node.memory_mib,
            vcpus: node.vcpus,
            kernel,
            initrd,
            extra_append,
            overlay: overlay.into(),
            config_disk: dir.join("config.img").into(),
            serial_log: dir.join("vm.log").into(),
            qmp_socket: dir.join("qmp.sock").into(),
            pidfile: dir.join("qemu.pid").into(),
            forwards: node_ports.all(),
            host_mac,
            fabric_mac,
            fabric: segment.links[&name].clone(),
            machine_id: hex::encode(
                &Sha256::digest(format!("{}/{name}", state.root).as_bytes())[..16],
            ),
            incoming: None,
            store,
        };
        if let Some(m) = &restore {
            m.check_machine(&name, &machine::qemu_args(&config), state.root.as_str())?;
            config.incoming = Some(m.memory(&name));
        }
        prepared.push((node, config, node_ports, host_key));
    }
    let known_hosts = state.ssh().join("known_hosts");
    fs::write(
        &known_hosts,
        prepared
            .iter()
            .map(|(_, _, p, k)| format!("[127.0.0.1]:{} {k}\n", p.ssh))
            .collect::<String>(),
    )?;

    let mut record = RunningCluster {
        name: cluster.name.clone(),
        source: cluster.source.display().to_string(),
        accel: accel.clone(),
        started_unix: chrono::Utc::now().timestamp(),
        ssh_key: keys.private_key.clone(),
        known_hosts: known_hosts.into(),
        image,
        nodes: BTreeMap::new(),
        restored_from: restore.as_ref().map(|m| m.name.clone()),
        owner: Some(state::Owner::me(&opts.command, true)),
        fabric: None,
    };
    // The switch watches the record: save it first, then start the switch
    // before any guest sends a frame.
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

    // Launch in dependency order. Guests boot concurrently (under TCG a
    // sequential boot would multiply the wall time); dependency order decides
    // the launch order and when each node's readiness is judged.
    let order: Vec<String> = cluster
        .boot_order()
        .iter()
        .map(|n| n.name.clone())
        .collect();
    let t0 = Instant::now();
    for name in &order {
        if crate::interrupted() {
            teardown(&record);
            let _ = fs::remove_file(state.cluster_file());
            return Err(crate::stop_error());
        }
        let (node, config, node_ports, _) = prepared
            .iter()
            .find(|p| p.1.name == *name)
            .expect("every ordered node was prepared");
        let dir = state.node(name);
        let child = match machine::launch(config, dir.join("qemu.log").as_std_path()) {
            Ok(c) => c,
            Err(e) => {
                teardown(&record);
                return Err(e);
            }
        };
        crate::own_pid(child.id() as i32);
        record.nodes.insert(
            name.clone(),
            RunningNode {
                role: node.role,
                address: node.address.to_string(),
                pid: child.id() as i32,
                ssh_port: node_ports.ssh,
                forwards: node_ports.forwards.clone(),
                units: node.units.clone(),
                dir: dir.clone().into(),
                booted_unix: chrono::Utc::now().timestamp(),
                ready_after_s: None,
                phases: Some(state::BootPhases {
                    launched_s: t0.elapsed().as_secs_f64(),
                    ..Default::default()
                }),
                qemu_args: machine::qemu_args(config),
            },
        );
        // The Child is dropped without waiting: QEMU outlives `start`.
        drop(child);
        state.save_running(&record)?;
    }

    if restore.is_some() {
        let resumed = snapshot::resume(&record, opts.ready_timeout);
        if let Err(e) = resumed {
            tracing::warn!("restore failed; stopping every node it launched");
            teardown(&record);
            let _ = fs::remove_file(state.cluster_file());
            return Err(e);
        }
    }
    let progress = Progress::new(&order);
    let result = match opts.readiness {
        Readiness::Full => wait_ready(
            cluster,
            &record,
            &prepared_endpoints(&record, &prepared),
            (opts, t0),
            &progress,
        ),
        Readiness::ConsoleLogin => {
            wait_console_login(&record, opts.ready_timeout, &progress).map(|ready| {
                let phases = |name: &String, secs| state::BootPhases {
                    ready_s: Some(secs),
                    ..record.nodes[name].phases.clone().unwrap_or_default()
                };
                ready
                    .into_iter()
                    .map(|(n, s)| (n.clone(), phases(&n, s)))
                    .collect()
            })
        }
    };
    progress.finish();
    match result {
        Ok(ready) => {
            for (name, phases) in ready {
                if let Some(n) = record.nodes.get_mut(&name) {
                    n.ready_after_s = phases.ready_s;
                    n.phases = Some(phases);
                }
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
        Err(e) => {
            tracing::warn!("start failed; stopping every node it launched");
            teardown(&record);
            let _ = fs::remove_file(state.cluster_file());
            Err(e)
        }
    }
}

/// A node's host key line from a saved cluster's known_hosts.
fn prepared_endpoints(
    record: &RunningCluster,
    prepared: &[(&crate::spec::Node, MachineConfig, fabric::NodePorts, String)],
) -> BTreeMap<String, Endpoint> {
    prepared
        .iter()
        .map(|(_, c, p, k)| {
            (
                c.name.clone(),
                Endpoint {
                    node: c.name.clone(),
                    port: p.ssh,
                    key: record.ssh_key.clone(),
                    host_key: k.clone(),
                },
            )
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

/// One thread per node. A node's readiness is judged only after its
/// dependencies are ready; if one of them fails, it stops waiting. Each
/// node's phases are timed from `t0`, the first launch.
fn wait_ready(
    cluster: &Cluster,
    record: &RunningCluster,
    endpoints: &BTreeMap<String, Endpoint>,
    (opts, t0): (&StartOptions, Instant),
    progress: &Progress,
) -> Result<Vec<(String, state::BootPhases)>> {
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
    let results: Vec<Result<(String, state::BootPhases)>> = std::thread::scope(|s| {
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
                    let outcome = (|| -> Result<(String, state::BootPhases)> {
                        progress.set(name, "booting");
                        let guest: Guest =
                            guest::wait_for_ssh(&endpoint, opts.ready_timeout, &console, &abort)?;
                        phases.sshd_s = Some(t0.elapsed().as_secs_f64());
                        if record.restored_from.is_some() {
                            // Restored guests wake with the clock of the save.
                            guest
                                .succeed(&snapshot::set_clock_command(), Duration::from_secs(20))?;
                        }
                        progress.set(name, "sshd up; waiting for dependencies");
                        wait_for_deps(&readiness, name, &deps, &abort)?;
                        phases.units_s = Some(t0.elapsed().as_secs_f64());
                        progress.set(name, &format!("waiting for {} units", node.units.len()));
                        let left = opts.ready_timeout.saturating_sub(started.elapsed());
                        guest::wait_for_units(
                            &guest,
                            &node.units,
                            left.max(Duration::from_secs(30)),
                            &abort,
                        )?;
                        let secs = t0.elapsed().as_secs_f64();
                        progress.done(name, &format!("ready in {secs:.1} s"));
                        phases.ready_s = Some(secs);
                        phases.kernel_s = *kernel_at.lock().expect("kernel banner");
                        Ok((name.clone(), phases))
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
