//! The cluster definition as the rest of the driver sees it: a typed model
//! (roles, image source, subnet, forwards) that passed validation.
//!
//! `load` reads the TOML, keeps serde spans while it validates, and hands
//! on this model without them: diagnostics are made there, and nowhere
//! later needs to know where in the file a value came from.

pub mod default;
mod load;

pub use crate::error::SpecError;
pub use load::parse;

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// Profiles embedded in the binary, selectable with `--profile NAME`.
pub const PROFILES: &[(&str, &str)] = &[
    ("reference", include_str!("../../profiles/reference.toml")),
    (
        "reference-storage",
        include_str!("../../profiles/reference-storage.toml"),
    ),
];

/// Names the state directory (`state`) uses itself, so no node may have
/// them. They live here, not in `state`, so that validating a definition
/// does not depend on the state directory: state builds on spec.
pub const RESERVED: [&str; 8] = [
    "images",
    "ssh",
    "snapshots",
    "fabric",
    "probe",
    "nodes",
    "lock",
    "cluster",
];

/// Which way the driver runs commands on a node (status, result.json).
/// The agent is the default: a node reached over it is ready sooner and a
/// restore needs no SSH handshake (docs/performance.md); a guest whose
/// agent does not answer is driven over SSH all the same. A cluster file
/// keeps SSH with `[cluster] channel = "ssh"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelKind {
    /// The guest agent on its virtio-serial port (src/guest/channel.rs):
    /// the default.
    #[default]
    Agent,
    /// SSH: asked for, or a guest whose agent does not answer.
    Ssh,
}

/// A definition that passed validation.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// The file it was read from (`<embedded>/profiles/<name>.toml` for profiles).
    pub source: PathBuf,
    pub name: String,
    /// Appended as `-<suffix>` to the state directory; empty for the default.
    pub state_suffix: String,
    /// The channel the cluster file asks for (`[cluster] channel`).
    pub channel: ChannelKind,
    pub image: ImageSource,
    pub network: Network,
    pub nodes: Vec<Node>,
}

/// The roles a node can play. The image providers know how to configure each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Control,
    Worker,
    Gateway,
    Storage,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Control, Role::Worker, Role::Gateway, Role::Storage];

    pub fn name(self) -> &'static str {
        match self {
            Role::Control => "control",
            Role::Worker => "worker",
            Role::Gateway => "gateway",
            Role::Storage => "storage",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the images come from.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageSource {
    /// Built here from Debian packages (`image::debian`).
    Debian { suite: String },
    /// Files given by path.
    Prebuilt {
        kernel: PathBuf,
        initrd: PathBuf,
        rootfs: PathBuf,
    },
    /// A directory of images with `<node>/` subdirectories (`image::dir`).
    PrebuiltDir { dir: PathBuf },
    /// `<flake>#<attribute>.<node>` for every node (`image::nix`).
    Nix { flake: String, attribute: String },
}

impl ImageSource {
    pub fn provider(&self) -> &'static str {
        match self {
            ImageSource::Debian { .. } => "debian",
            ImageSource::Prebuilt { .. } | ImageSource::PrebuiltDir { .. } => "prebuilt",
            ImageSource::Nix { .. } => "nix",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Network {
    pub subnet: Subnet,
    pub domain: String,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub role: Role,
    pub address: Ipv4Addr,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub depends_on: Vec<String>,
    /// systemd units that must be active before the node counts as ready.
    pub units: Vec<String>,
    pub forwards: Vec<Forward>,
}

impl Node {
    /// Whether the cluster file expects `unit` on this node: what makes it a
    /// balancer, an OVN chassis, an S3 server, ...
    pub fn runs(&self, unit: &str) -> bool {
        self.units.iter().any(|u| u == unit)
    }
}

/// A guest port reachable from the host on 127.0.0.1. `host` pins the
/// host port; without it the driver allocates a free one at start.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Forward {
    pub name: String,
    pub guest: u16,
    pub host: Option<u16>,
    #[serde(default)]
    pub proto: Proto,
}

/// The transport of a forward: TCP (the default) or UDP (DNS, for example).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    #[default]
    Tcp,
    Udp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// An IPv4 subnet in CIDR form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    pub fn parse(s: &str) -> Option<Subnet> {
        let (a, p) = s.split_once('/')?;
        let prefix: u8 = p.parse().ok()?;
        (8..=30).contains(&prefix).then_some(())?;
        Some(Subnet {
            base: a.parse().ok()?,
            prefix,
        })
    }

    pub fn contains(&self, a: Ipv4Addr) -> bool {
        let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
        u32::from(a) & mask == u32::from(self.base) & mask
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

impl Cluster {
    /// Loads an embedded profile by name.
    pub fn profile(name: &str) -> Result<Cluster, SpecError> {
        let text = PROFILES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| *t)
            .ok_or_else(|| SpecError {
                file: PathBuf::from("--profile"),
                line: 0,
                column: 0,
                field: "profile".into(),
                message: format!(
                    "unknown profile {name:?} (embedded profiles: {})",
                    PROFILES.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")
                ),
            })?;
        parse(Path::new(&format!("<embedded>/profiles/{name}.toml")), text)
    }

    /// Loads and validates a cluster file from disk.
    pub fn load(path: &Path) -> Result<Cluster, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|e| SpecError {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            field: "file".into(),
            message: format!("cannot read: {e}"),
        })?;
        parse(path, &text)
    }

    pub fn node_names(&self) -> impl Iterator<Item = &str> {
        self.nodes.iter().map(|n| n.name.as_str())
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The node `name`, which must run `unit` to be a `what` (a balancer,
    /// an OVN chassis): the one validation, with the one message, of every
    /// check that needs "a node that runs this unit".
    pub fn node_running(&self, name: &str, unit: &str, what: &str) -> Result<&Node, String> {
        match self.node(name) {
            None => Err(format!("{what} {name:?} is no node of the cluster")),
            Some(n) if !n.runs(unit) => Err(format!(
                "{what} {name} does not run {unit} (per the cluster file)"
            )),
            Some(n) => Ok(n),
        }
    }

    /// The nodes of `role`, in definition order.
    pub fn with_role(&self, role: Role) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(move |n| n.role == role)
    }

    /// Node names for `all`, `role:<role>` and plain names, in cluster order
    /// (each at most once). Lanes use it for `targets`, checks for lists of
    /// members.
    pub fn select(&self, items: &[String]) -> Result<Vec<String>, String> {
        let mut out: Vec<String> = Vec::new();
        for item in items {
            let matched: Vec<&str> = match item.strip_prefix("role:") {
                Some(role) => {
                    let role = Role::parse(role).ok_or_else(|| {
                        format!(
                            "{item:?}: unknown role (expected one of: {})",
                            Role::ALL.map(Role::name).join(", ")
                        )
                    })?;
                    self.with_role(role).map(|n| n.name.as_str()).collect()
                }
                None if item == "all" => self.node_names().collect(),
                None => self.node_names().filter(|n| n == item).collect(),
            };
            if matched.is_empty() {
                return Err(format!("{item:?} matches no node of the cluster"));
            }
            for n in matched {
                if !out.iter().any(|o| o == n) {
                    out.push(n.to_string());
                }
            }
        }
        Ok(out)
    }

    /// Nodes in an order where every node comes after its dependencies.
    pub fn boot_order(&self) -> Vec<&Node> {
        let index: HashMap<&str, &Node> = self.nodes.iter().map(|n| (n.name.as_str(), n)).collect();
        let mut done: Vec<&Node> = Vec::new();
        fn visit<'a>(n: &'a Node, index: &HashMap<&str, &'a Node>, done: &mut Vec<&'a Node>) {
            if done.iter().any(|d| d.name == n.name) {
                return;
            }
            for dep in &n.depends_on {
                visit(index[dep.as_str()], index, done);
            }
            done.push(n);
        }
        for n in &self.nodes {
            visit(n, &index, &mut done);
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_profiles_are_valid() {
        for (name, _) in PROFILES {
            let c = Cluster::profile(name).unwrap();
            assert!(!c.nodes.is_empty());
        }
        assert_eq!(Cluster::profile("reference").unwrap().nodes.len(), 6);
        assert_eq!(
            Cluster::profile("reference-storage").unwrap().nodes.len(),
            5
        );
    }

    #[test]
    fn boot_order_puts_dependencies_first() {
        let c = Cluster::profile("reference").unwrap();
        let order: Vec<&str> = c.boot_order().iter().map(|n| n.name.as_str()).collect();
        let pos = |n| order.iter().position(|o| *o == n).unwrap();
        assert!(pos("node01") < pos("node04"));
        assert!(pos("node04") < pos("node06"));
        assert_eq!(order.len(), 6);
    }

    #[test]
    fn select_expands_all_roles_and_names_in_cluster_order() {
        let c = Cluster::profile("reference").unwrap();
        let s = |items: &[&str]| c.select(&items.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(s(&["role:worker"]).unwrap(), ["node04", "node05"]);
        assert_eq!(
            s(&["node06", "role:gateway", "node01"]).unwrap(),
            ["node06", "node01"]
        );
        assert_eq!(s(&["all"]).unwrap().len(), 6);
        assert!(s(&["node99"]).unwrap_err().contains("node99"));
        assert!(s(&["role:wizard"]).unwrap_err().contains("unknown role"));
    }

    #[test]
    fn subnets_parse_and_contain() {
        let s = Subnet::parse("10.77.0.0/24").unwrap();
        assert!(s.contains("10.77.0.9".parse().unwrap()));
        assert!(!s.contains("10.78.0.9".parse().unwrap()));
        assert_eq!(s.to_string(), "10.77.0.0/24");
        assert!(Subnet::parse("10.77.0.0").is_none());
    }
}
