//! The runtime state directory: where images, keys, per-node files and the
//! record of the running cluster live, and the lock that keeps two commands
//! from changing it at once.
//!
//! Layout (see docs/architecture.md):
//! ```text
//! <state>/lock                 held by every command that changes the state
//! <state>/cluster.json         the running cluster (pids, ports, accel, keys)
//! <state>/accel-probe.json     cached KVM probe verdict for this host boot
//! <state>/images/<hash>/       built images, keyed by recipe hash
//! <state>/ssh/                 the per-cluster client key and known_hosts
//! <state>/<node>/              vm.log (where the seed says), overlay.qcow2,
//!                              config.img, qmp.sock, qemu.pid, .photon-node
//! <state>/snapshots/<name>/    saved clusters (snapshot.rs)
//! ```
//! A node may not take the name of one of the other entries: the list is
//! `spec::RESERVED`, kept in the definition (which refuses such node names)
//! because state builds on spec and not the other way round.

use crate::error::BadInput;
use crate::fabric::PortForward;
use crate::files::write_atomic;
use crate::machine::accel::AccelChoice;
use anyhow::{Context, Result};
use camino::Utf8PathBuf;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The file that marks a directory of the state directory as a node's.
const NODE_MARK: &str = ".photon-node";

/// The state directory for a profile: `${PHOTON_VM_DIR:-$HOME/.photoncloud-test-cluster}`
/// with `-<suffix>` appended for non-default profiles.
pub fn state_dir(base_override: Option<&Path>, suffix: &str) -> Result<PathBuf> {
    let base = match base_override {
        Some(p) => p.to_path_buf(),
        None => match std::env::var_os("PHOTON_VM_DIR") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => {
                let home = std::env::var_os("HOME")
                    .filter(|h| !h.is_empty())
                    .context("neither PHOTON_VM_DIR nor HOME is set; pass --state-dir")?;
                PathBuf::from(home).join(".photoncloud-test-cluster")
            }
        },
    };
    Ok(if suffix.is_empty() {
        base
    } else {
        let mut s = base.into_os_string();
        s.push(format!("-{suffix}"));
        PathBuf::from(s)
    })
}

/// Paths inside one state directory. They are UTF-8 (camino): they go
/// into QEMU command lines, JSON records and messages as text.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub root: Utf8PathBuf,
}

impl StateDir {
    /// Refuses a state directory whose path is not UTF-8 (exit 2). A
    /// relative path is made absolute: overlays name their backing image
    /// by path, and QEMU resolves a relative one against the overlay's
    /// own directory, not ours.
    pub fn new(root: PathBuf) -> Result<Self> {
        let root = std::path::absolute(&root)
            .with_context(|| format!("state directory {}", root.display()))?;
        let root = Utf8PathBuf::from_path_buf(root).map_err(|p| {
            crate::error::bad_input(format!(
                "state directory {}: the path must be UTF-8",
                p.display()
            ))
        })?;
        Ok(StateDir { root })
    }
    pub fn cluster_file(&self) -> Utf8PathBuf {
        self.root.join("cluster.json")
    }
    pub fn images(&self) -> Utf8PathBuf {
        self.root.join("images")
    }
    pub fn ssh(&self) -> Utf8PathBuf {
        self.root.join("ssh")
    }
    /// A node's runtime files; `vm.log` there is its console.
    pub fn node(&self, name: &str) -> Utf8PathBuf {
        self.root.join(name)
    }
    /// Creates a node's directory, marked as one so that `clean` and the
    /// secrets scan find it without knowing the cluster.
    pub fn create_node(&self, name: &str) -> Result<Utf8PathBuf> {
        let dir = self.node(name);
        fs::create_dir_all(&dir).with_context(|| format!("creating {dir}"))?;
        fs::write(dir.join(NODE_MARK), name).with_context(|| format!("writing into {dir}"))?;
        Ok(dir)
    }
    /// Every node directory in the state directory, and the `nodes/` ones an
    /// older driver left.
    pub fn node_dirs(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for base in [
            self.root.as_std_path().to_path_buf(),
            self.root.join("nodes").into(),
        ] {
            for e in fs::read_dir(&base).into_iter().flatten().flatten() {
                let legacy = base.ends_with("nodes");
                if e.path().is_dir() && (legacy || e.path().join(NODE_MARK).is_file()) {
                    out.push(e.path());
                }
            }
        }
        out
    }
    pub fn snapshots(&self) -> Utf8PathBuf {
        self.root.join("snapshots")
    }
    pub fn accel_probe(&self) -> Utf8PathBuf {
        self.root.join("accel-probe.json")
    }

    /// Takes the exclusive lock, refusing at once if another command holds it.
    pub fn lock(&self, command: &str) -> Result<StateLock> {
        fs::create_dir_all(&self.root)
            .with_context(|| format!("creating state directory {}", self.root))?;
        // Private: it holds the cluster's keys and secrets. A shared
        // directory given by mistake (sticky like /tmp, or someone else's)
        // is left as it is.
        let meta = fs::metadata(&self.root)?;
        let sticky = meta.permissions().mode() & 0o1000 != 0;
        if !sticky
            && std::os::unix::fs::MetadataExt::uid(&meta) == nix::unistd::geteuid().as_raw()
            && meta.permissions().mode() & 0o077 != 0
        {
            fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))
                .with_context(|| format!("making {} private (0700)", self.root))?;
        }
        let path = self.root.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path))?;
        match file.try_lock() {
            Ok(()) => {
                let _ = fs::write(
                    self.root.join("lock.owner"),
                    format!("{command} (pid {})\n", std::process::id()),
                );
                Ok(StateLock { _file: file })
            }
            Err(fs::TryLockError::WouldBlock) => {
                let owner = fs::read_to_string(self.root.join("lock.owner")).unwrap_or_default();
                Err(crate::error::named(
                    crate::error::ErrorKind::StateBusy,
                    BadInput::wrap(StateError::Busy {
                        dir: self.root.clone().into(),
                        owner: owner.trim().to_string(),
                    }),
                ))
            }
            Err(fs::TryLockError::Error(e)) => Err(e).context("locking the state directory"),
        }
    }

    pub fn load_running(&self) -> Result<Option<RunningCluster>> {
        let path = self.cluster_file();
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(
                serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path)),
        }
    }

    pub fn save_running(&self, c: &RunningCluster) -> Result<()> {
        write_atomic(
            self.cluster_file().as_std_path(),
            &serde_json::to_vec_pretty(c)?,
        )
    }
}

/// What can go wrong with the state directory itself.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Another command holds the lock (exit 2: nothing was started).
    #[error(
        "state directory {} is in use by another photon-cluster command{}; \
         wait for it to finish or use another --state-dir",
        dir.display(),
        if owner.is_empty() { String::new() } else { format!(" ({owner})") }
    )]
    Busy { dir: PathBuf, owner: String },
}

/// Held for the life of a command; the OS drops the lock when the process exits.
pub struct StateLock {
    _file: File,
}

/// What `start` persists so `status`, `ssh`, `stop` and the lanes can attach.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunningCluster {
    pub name: String,
    /// The cluster file (or embedded profile) the cluster was started from.
    pub source: String,
    pub accel: AccelChoice,
    pub started_unix: i64,
    pub ssh_key: PathBuf,
    pub known_hosts: PathBuf,
    pub image: ImageRecord,
    pub nodes: BTreeMap<String, RunningNode>,
    /// The snapshot the cluster was restored from, if it did not boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<String>,
    /// The command that owns the guests while it runs: `start` until every
    /// node is ready, a `fresh-*` run until it stops them. If that process
    /// is gone (SIGKILL), its guests are abandoned and the next command
    /// reaps them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
    /// The L2 segment the guests share (absent in records of older drivers:
    /// a multicast hub).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fabric: Option<crate::fabric::Segment>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Owner {
    pub pid: i32,
    pub command: String,
    /// Whether the owner is still bringing the cluster up.
    pub starting: bool,
}

impl Owner {
    /// This process, as the owner of what it is starting.
    pub fn me(command: &str, starting: bool) -> Owner {
        Owner {
            pid: std::process::id() as i32,
            command: command.into(),
            starting,
        }
    }

    /// Whether the owning process still runs (and is not this one's ghost).
    pub fn alive(&self) -> bool {
        self.pid > 0 && std::path::Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRecord {
    pub provider: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub rootfs: PathBuf,
    /// Recipe hash (debian) or other provenance.
    pub id: String,
    /// Per-node images (the nix provider): they replace the paths above.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub nodes: BTreeMap<String, NodeImage>,
}

/// One node's image from a Nix build.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeImage {
    pub store_path: String,
    pub drv_path: String,
    pub system: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The root file system image; empty for a node booted from the store.
    pub rootfs: PathBuf,
    /// Extra kernel command line from the image (`cmdline`), e.g. NixOS' `init=`.
    pub cmdline: Option<String>,
    /// A NixOS system booted from the host's store instead of a disk image
    /// (`<node>/toplevel` with no `rootfs.img`, nix/images.nix): the store
    /// holding it is shared read-only, and the node gets a blank state disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub toplevel: Option<PathBuf>,
}

impl NodeImage {
    /// The store directory a store-booted node shares (`/nix/store`).
    pub fn store(&self) -> Option<PathBuf> {
        self.toplevel.as_ref()?.parent().map(Path::to_path_buf)
    }
}

impl ImageRecord {
    /// The store directory `node` boots from, when it boots from a store.
    pub fn store_for(&self, node: &str) -> Option<PathBuf> {
        self.nodes.get(node)?.store()
    }

    /// kernel, initrd, rootfs and extra kernel arguments for `node`.
    pub fn for_node(&self, node: &str) -> (PathBuf, PathBuf, PathBuf, Option<String>) {
        match self.nodes.get(node) {
            Some(n) => (
                n.kernel.clone(),
                n.initrd.clone(),
                n.rootfs.clone(),
                n.cmdline.clone(),
            ),
            None => (
                self.kernel.clone(),
                self.initrd.clone(),
                self.rootfs.clone(),
                None,
            ),
        }
    }
}

/// Which way the driver reaches a node (status, result.json).
pub use crate::spec::ChannelKind;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunningNode {
    pub role: crate::spec::Role,
    pub address: String,
    pub pid: i32,
    pub ssh_port: u16,
    /// Forward name -> ports.
    pub forwards: BTreeMap<String, PortForward>,
    pub units: Vec<String>,
    pub dir: PathBuf,
    pub booted_unix: i64,
    /// Seconds from launch to ready, once the node was ready.
    pub ready_after_s: Option<f64>,
    /// When each boot phase was seen (the report's timeline draws them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phases: Option<BootPhases>,
    /// How the driver reaches the node once it is ready: `agent` (its
    /// virtio-serial channel answered) or `ssh`; absent before ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<ChannelKind>,
    /// QEMU's arguments as launched, so `restart` boots the same machine.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub qemu_args: Vec<String>,
}

/// When each phase of a node's boot was first seen, in seconds from the
/// cluster's first QEMU launch. A phase never reached stays `None`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BootPhases {
    /// QEMU launched.
    pub launched_s: f64,
    /// The kernel's banner (`Linux version`) on the console; a restored
    /// guest has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_s: Option<f64>,
    /// sshd answered with its banner and the driver logged in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sshd_s: Option<f64>,
    /// The node's dependencies were ready; its units were waited on from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub units_s: Option<f64>,
    /// Every expected unit active: the node is ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_s: Option<f64>,
    /// Its last expected unit active, by the guest's own clock placed on
    /// this timeline (known over the agent only: its units watch and hello).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_s: Option<f64>,
    /// How long after its readiness became true the driver knew: `ready_s`
    /// minus the later of `units_s` and `active_s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noticed_s: Option<f64>,
}

impl RunningNode {
    /// The node's QEMU pid now: the pidfile QEMU wrote, which a `restart`
    /// renews, else the pid recorded at start.
    pub fn pid_now(&self) -> i32 {
        fs::read_to_string(self.dir.join("qemu.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(self.pid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_state_dir_is_made_absolute() {
        let s = StateDir::new(PathBuf::from("some/state")).unwrap();
        assert!(s.root.is_absolute(), "{}", s.root);
        assert!(s.root.ends_with("some/state"));
    }

    #[test]
    fn suffix_makes_a_sibling_directory() {
        let base = Path::new("/tmp/pc");
        assert_eq!(state_dir(Some(base), "").unwrap(), PathBuf::from("/tmp/pc"));
        assert_eq!(
            state_dir(Some(base), "storage").unwrap(),
            PathBuf::from("/tmp/pc-storage")
        );
    }

    #[test]
    fn second_lock_is_refused_while_first_is_held() {
        let tmp = tempfile::tempdir().unwrap();
        let s = StateDir::new(tmp.path().to_path_buf()).unwrap();
        let held = s.lock("start").unwrap();
        let err = s.lock("stop").err().expect("second lock must fail");
        assert!(err.to_string().contains("in use by another"), "{err}");
        assert!(err.to_string().contains("start"), "{err}");
        assert_eq!(crate::error::exit_code(&err), crate::error::EXIT_BAD_INPUT);
        drop(held);
        s.lock("stop").expect("lock is free again");
    }
}
