//! Snapshots of a running cluster: every guest's RAM and device state, its
//! disk overlay and config disk, the cluster's keys and its record (ports,
//! addresses), saved at one instant so that `start --from-snapshot` brings
//! the same cluster back without booting it.
//!
//! How: every guest is paused first (QMP `stop`, all within a few
//! milliseconds), then each one's state is streamed by QEMU's own migration
//! into a file (`exec:cat > memory.bin`: QEMU 7.2 has no `file:` URI; a
//! ready output for Nix goes through `zstd -1` into `memory.bin.zst`), its
//! overlay is copied while nothing writes to it, and the guests resume (or
//! stop). A restore launches each QEMU with the same command line plus
//! `-incoming exec:zstd -dc memory.bin.zst` (or `cat`), resumes all guests together, and sets
//! their clocks to the host's before anything else talks to them.
//!
//! A snapshot is keyed by what would make it wrong to use: the image id,
//! the cluster definition, the driver's version, the QEMU version and each
//! node's QEMU command line. A key that no longer matches is refused (exit
//! 2), never used.
//!
//! A restore may happen in another state directory than the save, from a
//! read-only copy (a Nix store path): the disks and keys are copied into the
//! run's own directory, the guest state is only read, and host ports are
//! chosen afresh (the guests never see them; they keep their addresses).
//!
//! Layout: `<state>/snapshots/<name>/manifest.json` (written last: a
//! directory without it is an unfinished save), `ssh/`, and `<node>/`
//! with `memory.bin.zst` (or `memory.bin`), `overlay.qcow2`, `config.img`.

use crate::error::BadInput;
use crate::files::write_atomic;
use crate::machine::qmp::Qmp;
use crate::spec::Cluster;
use crate::state::{ImageRecord, RunningCluster, StateDir};
use crate::wait::{Pause, Probe, Wait};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What a snapshot must match to be used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Key {
    pub image: String,
    /// A hash of the validated cluster definition.
    pub cluster: String,
    pub driver: String,
    pub qemu: String,
}

/// `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub created: String,
    pub key: Key,
    /// Per node: a hash of its QEMU command line (without `-incoming`).
    pub machines: BTreeMap<String, String>,
    /// The running cluster as it was saved: ports, accel, units.
    pub record: RunningCluster,
    /// Seconds the guests were paused while saving.
    pub paused_s: f64,
    pub bytes: u64,
    /// Where this snapshot was read from: `<state>/snapshots/<name>`, or a
    /// directory named on its own (a Nix store path), used read-only.
    #[serde(skip)]
    pub location: PathBuf,
}

/// What was asked of the guests after the save.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    Resume,
    Stop,
}

/// How a save keeps each guest's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Memory {
    /// As QEMU streams it (`memory.bin`): the fastest restore, for the
    /// state directory's own snapshots.
    Raw,
    /// Through `zstd -1` (`memory.bin.zst`), about a third of the size, for
    /// outputs that travel (a Nix ready output, a binary cache); a restore
    /// costs a few seconds more on a loaded host (docs/performance.md).
    /// Raw when the host has no zstd.
    Zstd,
}

pub const DEFAULT: &str = "default";

fn dir(state: &StateDir, name: &str) -> PathBuf {
    state.snapshots().join(name).into()
}

/// The key of `cluster` booted from `image` by this driver and this QEMU.
pub fn key(cluster: &Cluster, image: &ImageRecord) -> Result<Key> {
    let mut model = cluster.clone();
    model.source = PathBuf::new();
    let qemu = std::process::Command::new(crate::machine::QEMU)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", crate::machine::QEMU))?;
    let qemu = String::from_utf8_lossy(&qemu.stdout);
    Ok(Key {
        image: image.id.clone(),
        cluster: hash(format!("{model:?}").as_bytes()),
        driver: env!("CARGO_PKG_VERSION").to_string(),
        qemu: qemu.lines().next().unwrap_or_default().to_string(),
    })
}

/// A hash of a node's QEMU command line, for the manifest: of the parts
/// that the saved state depends on. Left out are what a restore chooses
/// afresh, none of which the guest sees: the state directory (paths), the
/// host ports of its forwards and fabric socket, the machine id passed at
/// boot (the guest booted long ago) and `-incoming`.
pub fn machine_hash(args: &[String], state_root: &str) -> String {
    hash(normalize(args, state_root).join("\0").as_bytes())
}

fn normalize(args: &[String], state_root: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "-incoming" {
            it.next();
            continue;
        }
        let a = a.replace(state_root, "$STATE");
        out.push(if a.starts_with("socket,id=fabric") {
            "socket,id=fabric".to_string()
        } else if a.contains("hostfwd=") || a.contains("systemd.machine_id=") {
            a.split([',', ' '])
                .map(unported)
                .collect::<Vec<_>>()
                .join(",")
        } else {
            a
        });
    }
    out
}

/// `hostfwd=tcp:127.0.0.1:40122-:22` without its host port, and
/// `systemd.machine_id=...` without its value.
fn unported(part: &str) -> String {
    if let Some(rest) = part.strip_prefix("hostfwd=") {
        let proto = rest.split(':').next().unwrap_or_default();
        let guest = rest.rsplit("-:").next().unwrap_or_default();
        return format!("hostfwd={proto}:*-:{guest}");
    }
    if part.starts_with("systemd.machine_id=") {
        return "systemd.machine_id=*".into();
    }
    part.to_string()
}

fn hash(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..12])
}

/// Refuses a name that could leave the snapshots directory.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !name.starts_with('.');
    if !ok {
        return Err(crate::error::bad_input(format!(
            "snapshot name {name:?}: use letters, digits, '-', '_' and '.'"
        )));
    }
    Ok(())
}

/// Every finished snapshot in `state`, by name.
pub fn list(state: &StateDir) -> Result<Vec<Manifest>> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(state.snapshots()) else {
        return Ok(out);
    };
    for e in entries.flatten() {
        let path = e.path().join("manifest.json");
        if let Ok(bytes) = fs::read(&path) {
            let mut m: Manifest = serde_json::from_slice(&bytes)
                .with_context(|| format!("parsing {}", path.display()))?;
            m.location = e.path();
            out.push(m);
        }
    }
    out.sort_by(|a: &Manifest, b| a.name.cmp(&b.name));
    Ok(out)
}

pub fn remove(state: &StateDir, name: &str) -> Result<()> {
    check_name(name)?;
    let d = dir(state, name);
    if !d.exists() {
        return Err(crate::error::bad_input(format!(
            "no snapshot {name:?} in {}",
            state.snapshots()
        )));
    }
    fs::remove_dir_all(&d).with_context(|| format!("removing {}", d.display()))
}

/// Why a snapshot cannot be used for this cluster, or nothing.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(
        "no snapshot {name:?} in {dir} (saved: {saved}); `photon-cluster snapshot save {name}` on a ready cluster makes one"
    )]
    Missing {
        name: String,
        dir: String,
        saved: String,
    },
    #[error(
        "snapshot {name:?} does not match this cluster ({what}); it was not used. Save a new one, or `photon-cluster snapshot rm {name}`"
    )]
    Stale { name: String, what: String },
}

/// The snapshot `name` (a name in `state`, or with a `/`, a directory of
/// its own such as a store path), if its key matches `key`.
pub fn open(state: &StateDir, name: &str, key: &Key) -> Result<Manifest> {
    let location = if name.contains('/') {
        PathBuf::from(name)
    } else {
        check_name(name)?;
        dir(state, name)
    };
    let path = location.join("manifest.json");
    if name.contains('/') && !path.is_file() {
        return Err(crate::error::named(
            crate::error::ErrorKind::SnapshotMissing,
            crate::error::bad_input(format!(
                "no snapshot in {name}: it has no manifest.json (`photon-cluster snapshot save` or \
                 `photon-cluster ready --out DIR` makes one)"
            )),
        ));
    }
    let Ok(bytes) = fs::read(&path) else {
        let saved: Vec<String> = list(state)?.into_iter().map(|m| m.name).collect();
        return Err(crate::error::named(
            crate::error::ErrorKind::SnapshotMissing,
            BadInput::wrap(SnapshotError::Missing {
                name: name.into(),
                dir: state.snapshots().to_string(),
                saved: if saved.is_empty() {
                    "none".into()
                } else {
                    saved.join(", ")
                },
            }),
        ));
    };
    let mut m: Manifest =
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?;
    m.location = location;
    let mut differs = Vec::new();
    for (what, saved, now) in [
        ("image", &m.key.image, &key.image),
        ("cluster definition", &m.key.cluster, &key.cluster),
        ("driver version", &m.key.driver, &key.driver),
        ("QEMU version", &m.key.qemu, &key.qemu),
    ] {
        if saved != now {
            differs.push(format!("{what}: saved {saved:?}, now {now:?}"));
        }
    }
    if !differs.is_empty() {
        return Err(crate::error::named(
            crate::error::ErrorKind::SnapshotStale,
            BadInput::wrap(SnapshotError::Stale {
                name: name.into(),
                what: differs.join("; "),
            }),
        ));
    }
    Ok(m)
}

impl Manifest {
    pub fn dir(&self) -> &Path {
        &self.location
    }

    /// Refuses a node whose QEMU command line (as `machine_hash` sees it)
    /// differs from the saved one.
    pub fn check_machine(&self, node: &str, args: &[String], state_root: &str) -> Result<()> {
        let now = machine_hash(args, state_root);
        match self.machines.get(node) {
            Some(saved) if *saved == now => Ok(()),
            _ => Err(crate::error::named(
                crate::error::ErrorKind::SnapshotStale,
                BadInput::wrap(SnapshotError::Stale {
                    name: self.name.clone(),
                    what: format!("{node}'s QEMU command line changed"),
                }),
            )),
        }
    }

    /// Puts the saved keys and a node's disks in place for a restore: copies
    /// in the run's own state directory, writable by their owner only (the
    /// snapshot itself may be a read-only store path, whose files are 0444).
    pub fn restore_files(&self, state: &StateDir) -> Result<()> {
        let src = self.dir();
        copy_dir(&src.join("ssh"), state.ssh().as_std_path())?;
        for node in self.record.nodes.keys() {
            let to = state.node(node);
            let _ = fs::remove_dir_all(&to);
            state.create_node(node)?;
            for f in ["overlay.qcow2", "config.img"] {
                copy(&src.join(node).join(f), to.join(f).as_std_path())?;
            }
        }
        Ok(())
    }

    /// The file QEMU reads the node's state from (read-only: it is only
    /// read): compressed if the save had zstd, raw otherwise. Refused (exit
    /// 2) when it is compressed and this host has no zstd to read it.
    pub fn memory(&self, node: &str) -> Result<PathBuf> {
        let zst = self.dir().join(node).join(MEMORY_ZSTD);
        if !zst.is_file() {
            return Ok(self.dir().join(node).join(MEMORY_RAW));
        }
        if !zstd_on_path() {
            return Err(crate::error::bad_input(format!(
                "{}: the guest state is compressed with zstd, and `zstd` is not on PATH",
                zst.display()
            )));
        }
        Ok(zst)
    }

    /// The saved host key of `node`, from the snapshot's own known_hosts.
    pub fn host_key(&self, node: &str) -> Result<String> {
        let mut record = self.record.clone();
        record.known_hosts = self.dir().join("ssh").join("known_hosts");
        Ok(crate::guest::endpoint(&record, node)?.host_key)
    }
}

/// Saves the running cluster as `name` under its key, with each QEMU's
/// command line as it runs (what a restore must match).
pub fn save_running(
    cluster: &Cluster,
    state: &StateDir,
    record: &RunningCluster,
    name: &str,
    after: After,
    memory: Memory,
) -> Result<Manifest> {
    let key = key(cluster, &record.image)?;
    let machines = running_machines(record, state.root.as_str())?;
    save(state, record, key, machines, name, (after, memory))
}

/// Each node's QEMU command line as it runs, hashed for a snapshot.
fn running_machines(
    record: &RunningCluster,
    state_root: &str,
) -> Result<std::collections::BTreeMap<String, String>> {
    let mut machines = std::collections::BTreeMap::new();
    for (node, n) in &record.nodes {
        let raw = std::fs::read(format!("/proc/{}/cmdline", n.pid_now()))
            .with_context(|| format!("{node}: QEMU (pid {}) is not running", n.pid_now()))?;
        let args: Vec<String> = String::from_utf8_lossy(&raw)
            .split('\0')
            .skip(1)
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect();
        machines.insert(node.clone(), machine_hash(&args, state_root));
    }
    Ok(machines)
}

/// Saves the running cluster as `name`, replacing an older one of that name.
pub fn save(
    state: &StateDir,
    record: &RunningCluster,
    key: Key,
    machines: BTreeMap<String, String>,
    name: &str,
    (after, memory): (After, Memory),
) -> Result<Manifest> {
    check_name(name)?;
    let file = match memory {
        Memory::Zstd if zstd_on_path() => MEMORY_ZSTD,
        _ => MEMORY_RAW,
    };
    let target = dir(state, name);
    let work = state.snapshots().join(format!(".{name}.partial"));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let mut qmps: BTreeMap<&String, Qmp> = BTreeMap::new();
    for (node, n) in &record.nodes {
        if !crate::machine::is_running(n.pid_now()) {
            bail!(
                "{node}: QEMU (pid {}) is not running; nothing to save",
                n.pid
            );
        }
        qmps.insert(
            node,
            Qmp::connect(&n.dir.join("qmp.sock"), Duration::from_secs(10))?,
        );
    }
    // One instant for the whole cluster: pause everyone before saving anyone.
    let paused = Instant::now();
    for q in qmps.values_mut() {
        q.execute("stop")?;
    }
    let saved = std::thread::scope(|s| {
        let handles: Vec<_> = qmps
            .iter_mut()
            .map(|(node, q)| {
                let out = work.join(node.as_str());
                let n = &record.nodes[node.as_str()];
                s.spawn(move || save_node(q, node, &n.dir, &out.as_std_path().join(file)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("save thread"))
            .collect::<Result<Vec<u64>>>()
    });
    let finish = |q: &mut Qmp| match after {
        After::Resume => q.execute("cont").map(|_| ()),
        After::Stop => q.execute("quit").map(|_| ()),
    };
    let mut resumed = Ok(());
    for q in qmps.values_mut() {
        resumed = resumed.and(finish(q));
    }
    let paused_s = paused.elapsed().as_secs_f64();
    let bytes = saved?.into_iter().sum();
    resumed.context("resuming the guests after the save")?;
    copy_dir(state.ssh().as_std_path(), work.join("ssh").as_std_path())?;
    let manifest = Manifest {
        name: name.into(),
        created: chrono::Utc::now().to_rfc3339(),
        key,
        machines,
        record: record.clone(),
        paused_s,
        bytes,
        location: target.clone(),
    };
    write_atomic(
        work.join("manifest.json").as_std_path(),
        &serde_json::to_vec_pretty(&manifest)?,
    )?;
    let _ = fs::remove_dir_all(&target);
    fs::rename(&work, &target).with_context(|| format!("moving to {}", target.display()))?;
    Ok(manifest)
}

/// The guest state as QEMU's migration stream wrote it.
const MEMORY_RAW: &str = "memory.bin";
/// The same, through `zstd -1` ([`Memory::Zstd`]).
const MEMORY_ZSTD: &str = "memory.bin.zst";

/// Whether the host has `zstd` (a save compresses only then).
fn zstd_on_path() -> bool {
    crate::host::has_program("zstd")
}

/// The shell command QEMU's `exec:` migration runs to write `file`.
fn save_command(file: &Path) -> String {
    let quoted = crate::text::shell_quote(&file.display().to_string());
    match crate::machine::cmdline::compressed(file) {
        true => format!("zstd -q -1 -T1 > {quoted}"),
        false => format!("cat > {quoted}"),
    }
}

/// Streams one paused guest's state into `memory` (raw, or compressed
/// when it ends in `.zst`), then copies its disks beside it (the migration
/// flushed them and QEMU writes nothing until `cont`).
fn save_node(q: &mut Qmp, node: &str, node_dir: &Path, memory: &Path) -> Result<u64> {
    let out = memory.parent().expect("a file in the node's directory");
    fs::create_dir_all(out)?;
    // The guest is paused, so there is no downtime to limit: let it go fast.
    q.call(
        "migrate-set-parameters",
        json!({ "max-bandwidth": 8u64 << 30, "downtime-limit": 60_000 }),
    )?;
    q.call(
        "migrate",
        json!({ "uri": format!("exec:{}", save_command(memory)) }),
    )?;
    Wait::new(format!("{node}: state saved"), Duration::from_secs(600))
        .pause(Pause::Backoff {
            first: Duration::from_millis(20),
            max: Duration::from_millis(500),
        })
        .run(|| {
            let m = q.execute("query-migrate")?;
            match m["status"].as_str().unwrap_or("") {
                "completed" => Ok(Probe::Done(())),
                "failed" | "cancelled" => bail!("{node}: saving the state: {m}"),
                s => Ok(Probe::Pending(s.to_string())),
            }
        })?;
    let mut bytes = fs::metadata(memory)?.len();
    for f in ["overlay.qcow2", "config.img"] {
        bytes += copy(&node_dir.join(f), &out.join(f))?;
    }
    Ok(bytes)
}

/// After `-incoming`: waits until every guest has read its state, resumes
/// them all together, and sets each one's clock to the host's.
pub fn resume(record: &RunningCluster, timeout: Duration) -> Result<()> {
    let mut qmps = Vec::new();
    for (node, n) in &record.nodes {
        let stop = || {
            (!crate::machine::is_running(n.pid_now())).then(|| {
                anyhow::anyhow!(
                    "{node}: QEMU exited while restoring; qemu.log: {}",
                    fs::read_to_string(n.dir.join("qemu.log"))
                        .unwrap_or_default()
                        .trim()
                )
            })
        };
        let mut q = Wait::new(format!("{node}: QMP socket"), Duration::from_secs(30))
            .stop_when(&stop)
            .run(|| {
                Ok(
                    match Qmp::connect(&n.dir.join("qmp.sock"), Duration::from_secs(10)) {
                        Ok(q) => Probe::Done(q),
                        Err(e) => Probe::Pending(format!("{e:#}")),
                    },
                )
            })
            .map_err(crate::wait::unwrap_stopped)?;
        Wait::new(format!("{node}: state restored"), timeout)
            .pause(Pause::Backoff {
                first: Duration::from_millis(20),
                max: Duration::from_millis(500),
            })
            .stop_when(&stop)
            .run(|| {
                let m = q.execute("query-migrate")?;
                match m["status"].as_str().unwrap_or("") {
                    "completed" => Ok(Probe::Done(())),
                    "failed" | "cancelled" => bail!("{node}: restoring the state: {m}"),
                    s => Ok(Probe::Pending(s.to_string())),
                }
            })
            .map_err(crate::wait::unwrap_stopped)?;
        qmps.push(q);
    }
    for q in &mut qmps {
        q.execute("cont")?;
    }
    Ok(())
}

/// Saves every node's state inside its own disk (QEMU's `savevm`: memory
/// and devices into the qcow2 overlay), the guests paused together for one
/// instant of the whole cluster. Unlike [`save`], the cluster can only go
/// back to it in place ([`load_in_place`]): same QEMU processes, ports and
/// record, which is what a test script needs. Returns the seconds paused.
pub fn save_in_place(record: &RunningCluster, name: &str) -> Result<f64> {
    check_name(name)?;
    paused_together(record, &format!("savevm {name}"))
}

/// Puts every node back to the state `save_in_place` saved as `name`, the
/// guests paused together; their clocks are then the save's until they are
/// set again ([`crate::guest::Guest::set_clock`]). Returns the seconds paused.
pub fn load_in_place(record: &RunningCluster, name: &str) -> Result<f64> {
    check_name(name)?;
    paused_together(record, &format!("loadvm {name}"))
}

/// Pauses every node, runs the monitor command `hmp` on each (at once),
/// and resumes them all, also when one failed.
fn paused_together(record: &RunningCluster, hmp: &str) -> Result<f64> {
    // The monitor answers once its node's state is written or read.
    let wait = Duration::from_secs(600);
    let mut qmps = Vec::new();
    for (node, n) in &record.nodes {
        let q =
            Qmp::connect(&n.dir.join("qmp.sock"), wait).with_context(|| format!("{node}: QMP"))?;
        qmps.push((node, q));
    }
    let t = Instant::now();
    let paused: Result<Vec<()>> = qmps
        .iter_mut()
        .map(|(node, q)| {
            q.execute("stop")
                .map(drop)
                .with_context(|| format!("{node}: pausing"))
        })
        .collect();
    // Only once every node is paused: one instant of the whole cluster.
    let done: Vec<Result<()>> = match &paused {
        Ok(_) => std::thread::scope(|s| {
            let handles: Vec<_> = qmps
                .iter_mut()
                .map(|(node, q)| s.spawn(move || monitor(q, node, hmp)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("monitor thread"))
                .collect()
        }),
        Err(_) => Vec::new(),
    };
    // Every node resumes, also after a failed pause or monitor command.
    let mut resumed = Ok(());
    for (node, q) in &mut qmps {
        if let Err(e) = q.execute("cont")
            && resumed.is_ok()
        {
            resumed = Err(e.context(format!("{node}: resuming")));
        }
    }
    resumed?;
    paused?;
    done.into_iter().collect::<Result<Vec<()>>>()?;
    Ok(t.elapsed().as_secs_f64())
}

/// One human monitor command; it says nothing when it succeeded.
fn monitor(q: &mut Qmp, node: &str, hmp: &str) -> Result<()> {
    let said = q.call("human-monitor-command", json!({ "command-line": hmp }))?;
    match said.as_str().map(str::trim).unwrap_or("") {
        "" => Ok(()),
        err => bail!("{node}: {hmp}: {err}"),
    }
}

/// Copies a file, leaving the copy writable by its owner only.
fn copy(from: &Path, to: &Path) -> Result<u64> {
    use std::os::unix::fs::PermissionsExt;
    let _ = fs::remove_file(to);
    let n = fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(0o600))?;
    Ok(n)
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for e in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let e = e?;
        if e.file_type()?.is_file() {
            copy(&e.path(), &to.join(e.file_name()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        Key {
            image: "img1".into(),
            cluster: "c1".into(),
            driver: "0.1.0".into(),
            qemu: "QEMU emulator version 7.2.0".into(),
        }
    }

    fn manifest(name: &str) -> Manifest {
        let record: RunningCluster = serde_json::from_value(json!({
            "name": "t", "source": "t.toml", "started_unix": 0,
            "accel": { "used": "tcg", "requested": "tcg", "fallback_reason": null },
            "ssh_key": "/k", "known_hosts": "/h",
            "image": { "provider": "debian", "kernel": "k", "initrd": "i", "rootfs": "r", "id": "img1" },
            "nodes": {}
        }))
        .unwrap();
        Manifest {
            name: name.into(),
            created: "now".into(),
            key: key(),
            machines: BTreeMap::from([("node01".to_string(), machine_hash(&["-m".into()], "/s"))]),
            record,
            paused_s: 1.0,
            bytes: 1,
            location: PathBuf::new(),
        }
    }

    #[test]
    fn a_snapshot_whose_key_differs_is_refused_with_what_changed() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path().to_path_buf()).unwrap();
        let m = manifest("warm");
        fs::create_dir_all(dir(&state, "warm")).unwrap();
        fs::write(
            dir(&state, "warm").join("manifest.json"),
            serde_json::to_vec(&m).unwrap(),
        )
        .unwrap();
        assert_eq!(open(&state, "warm", &key()).unwrap().name, "warm");
        let mut other = key();
        other.image = "img2".into();
        let e = open(&state, "warm", &other).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), crate::error::EXIT_BAD_INPUT);
        assert!(
            e.to_string()
                .contains("image: saved \"img1\", now \"img2\""),
            "{e}"
        );
        let e = open(&state, "cold", &key()).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), crate::error::EXIT_BAD_INPUT);
        assert!(e.to_string().contains("saved: warm"), "{e}");
        assert!(m.check_machine("node01", &["-m".into()], "/s").is_ok());
        assert!(m.check_machine("node01", &["-smp".into()], "/s").is_err());
        assert_eq!(list(&state).unwrap().len(), 1);
        remove(&state, "warm").unwrap();
        assert!(list(&state).unwrap().is_empty());
        assert!(check_name("../x").is_err());
    }

    #[test]
    fn the_machine_hash_ignores_what_a_restore_chooses_afresh() {
        let args = |root: &str, port: u16, fabric: u16, id: &str| -> Vec<String> {
            [
                "-m".to_string(),
                "512".into(),
                "-append".into(),
                format!("root=/dev/vda systemd.machine_id={id} quiet"),
                "-drive".into(),
                format!("file={root}/solo/overlay.qcow2,format=qcow2"),
                "-netdev".into(),
                format!("user,id=host,net=10.0.2.0/24,hostfwd=tcp:127.0.0.1:{port}-:22"),
                "-netdev".into(),
                format!("socket,id=fabric,udp=127.0.0.1:{fabric},localaddr=127.0.0.1:1"),
            ]
            .to_vec()
        };
        let saved = machine_hash(&args("/a", 40122, 5000, "aa"), "/a");
        let mut restored = args("/b", 41000, 6000, "bb");
        restored.extend([
            "-incoming".into(),
            "exec:cat /nix/store/x/memory.bin".into(),
        ]);
        assert_eq!(saved, machine_hash(&restored, "/b"));
        // What the guest does see still counts: its memory, a guest port.
        let mut more = args("/a", 40122, 5000, "aa");
        more[1] = "1024".into();
        assert_ne!(saved, machine_hash(&more, "/a"));
        let other_guest_port = args("/a", 40122, 5000, "aa")
            .into_iter()
            .map(|a| a.replace("-:22", "-:2222"))
            .collect::<Vec<_>>();
        assert_ne!(saved, machine_hash(&other_guest_port, "/a"));
    }
}
