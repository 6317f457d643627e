//! The virtual network: one L2 segment shared by every guest of a cluster
//! (segment.rs: the driver's switch, or QEMU's multicast hub), and the
//! host's 127.0.0.1 forwards into each guest.
//!
//! Neither needs root. A switch binds its own UDP ports per cluster; a hub
//! gets a group and port derived from the state directory. Either way two
//! clusters on one host never see each other's frames.

pub mod segment;
pub mod switch;

pub use segment::{Kind, Link, Segment};

use crate::error::bad_input;
use crate::spec::{Cluster, Node, Proto};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::path::Path;

/// The multicast group and UDP port of a cluster's L2 segment.
pub fn mcast_for(state_root: &Path) -> (String, u16) {
    let h = Sha256::digest(state_root.as_os_str().as_encoded_bytes());
    let group = format!("230.{}.{}.{}", h[0], h[1], h[2].max(1));
    let port = 20000 + (u16::from_be_bytes([h[3], h[4]]) % 20000);
    (group, port)
}

/// MAC addresses: one for the host-forward NIC, one for the fabric NIC.
/// Index-based, so they are stable and unique within the segment.
pub fn macs(index: usize) -> (String, String) {
    let i = index as u8 + 1;
    (
        format!("52:54:00:00:00:{i:02x}"),
        format!("52:54:00:4d:00:{i:02x}"),
    )
}

/// One host port on 127.0.0.1 forwarded into a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortForward {
    pub proto: Proto,
    pub guest: u16,
    pub host: u16,
}

impl std::fmt::Display for PortForward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.proto {
            Proto::Tcp => write!(f, "{}->{}", self.host, self.guest),
            Proto::Udp => write!(f, "udp {}->{}", self.host, self.guest),
        }
    }
}

/// Host ports for one node: SSH first, then the declared forwards.
#[derive(Debug, Clone, PartialEq)]
pub struct NodePorts {
    pub ssh: u16,
    pub forwards: BTreeMap<String, PortForward>,
}

impl NodePorts {
    /// Every forward for the QEMU command line, SSH first.
    pub fn all(&self) -> Vec<PortForward> {
        let ssh = PortForward {
            proto: Proto::Tcp,
            guest: 22,
            host: self.ssh,
        };
        std::iter::once(ssh)
            .chain(self.forwards.values().copied())
            .collect()
    }
}

/// A bound host port, kept open until allocation is over.
enum Held {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

/// Allocates every host port of the cluster at once. Pinned ports must be
/// free now; the others are picked by the kernel. All listeners stay open
/// until every port is chosen, so no two forwards get the same port.
pub fn allocate_ports(cluster: &Cluster) -> Result<BTreeMap<String, NodePorts>> {
    let mut held: Vec<Held> = Vec::new();
    let mut take = |proto: Proto, pinned: Option<u16>, what: &str| -> Result<u16> {
        let addr = (Ipv4Addr::LOCALHOST, pinned.unwrap_or(0));
        let bound = match proto {
            Proto::Tcp => TcpListener::bind(addr).map(Held::Tcp),
            Proto::Udp => UdpSocket::bind(addr).map(Held::Udp),
        };
        let h = bound.map_err(|e| {
            crate::error::named(
                crate::error::ErrorKind::PortTaken,
                bad_input(format!(
                    "port clash: host port 127.0.0.1:{}/{} for {what} is not free ({e}); \
                 change or drop `host` in {}",
                    pinned.unwrap_or(0),
                    proto.name(),
                    cluster.source.display()
                )),
            )
        })?;
        let port = match &h {
            Held::Tcp(l) => l.local_addr()?.port(),
            Held::Udp(s) => s.local_addr()?.port(),
        };
        held.push(h);
        Ok(port)
    };
    let mut out = BTreeMap::new();
    for node in &cluster.nodes {
        let name = &node.name;
        let ssh = take(Proto::Tcp, None, &format!("{name}/ssh"))?;
        let mut forwards = BTreeMap::new();
        for f in &node.forwards {
            let host = take(f.proto, f.host, &format!("{name}/{}", f.name))?;
            let fwd = PortForward {
                proto: f.proto,
                guest: f.guest,
                host,
            };
            forwards.insert(f.name.clone(), fwd);
        }
        out.insert(name.clone(), NodePorts { ssh, forwards });
    }
    Ok(out)
}

/// /etc/hosts for every guest: every node by short and qualified name.
pub fn hosts_file(cluster: &Cluster) -> String {
    let domain = &cluster.network.domain;
    let mut s = String::from("127.0.0.1 localhost\n");
    for n in &cluster.nodes {
        let name = &n.name;
        s.push_str(&format!("{} {name}.{domain} {name}\n", n.address));
    }
    s
}

/// systemd-networkd files for a node: the slirp NIC with a static address
/// (no DHCP wait) and the fabric NIC with the node's cluster address.
///
/// The slirp NIC has no gateway: the host reaches the guest through port
/// forwards (whose packets come from 10.0.2.2, on the link), and nothing
/// in a test cluster may reach the outside. With a default route, any
/// lookup of a public name went out through slirp, which opened a UDP
/// socket on 0.0.0.0 of the host for it (s03's guard caught one); without
/// it such a packet fails in the guest at once (no route).
pub fn network_files(cluster: &Cluster, index: usize, node: &Node) -> Vec<(String, String)> {
    let (host_mac, fabric_mac) = macs(index);
    let prefix = cluster.network.subnet.prefix;
    vec![
        (
            "10-host.network".into(),
            format!(
                "[Match]\nMACAddress={host_mac}\n\n[Network]\nAddress=10.0.2.15/24\n\
                 LinkLocalAddressing=no\nIPv6AcceptRA=no\n"
            ),
        ),
        (
            "20-fabric.network".into(),
            format!(
                "[Match]\nMACAddress={fabric_mac}\n\n[Network]\nAddress={}/{prefix}\n\
                 LinkLocalAddressing=no\nIPv6AcceptRA=no\n",
                node.address
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clusters_in_different_state_dirs_get_different_segments() {
        let a = mcast_for(Path::new("/root/.photoncloud-test-cluster"));
        let b = mcast_for(Path::new("/root/.photoncloud-test-cluster-storage"));
        assert_ne!(a, b);
        assert!(a.0.starts_with("230."));
        assert!((20000..40000).contains(&a.1));
    }

    #[test]
    fn ports_are_unique_across_the_cluster() {
        let c = Cluster::profile("reference").unwrap();
        let ports = allocate_ports(&c).unwrap();
        let mut all: Vec<(Proto, u16)> = ports
            .values()
            .flat_map(|p| p.all())
            .map(|f| (f.proto, f.host))
            .collect();
        let n = all.len();
        all.sort_by_key(|(p, h)| (p.name(), *h));
        all.dedup();
        assert_eq!(all.len(), n);
        assert_eq!(ports["node01"].all()[0].guest, 22);
    }

    #[test]
    fn a_pinned_port_in_use_is_refused() {
        let busy = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = busy.local_addr().unwrap().port();
        let text = crate::spec::PROFILES[0].1.replace(
            "{ name = \"haproxy\", guest = 80 }",
            &format!("{{ name = \"haproxy\", guest = 80, host = {port} }}"),
        );
        let c = crate::spec::parse(Path::new("r.toml"), &text).unwrap();
        let err = allocate_ports(&c).unwrap_err();
        assert_eq!(crate::error::exit_code(&err), crate::error::EXIT_BAD_INPUT);
        assert!(
            err.to_string().contains(&format!("127.0.0.1:{port}")),
            "{err}"
        );
    }

    #[test]
    fn hosts_file_names_every_node() {
        let c = Cluster::profile("reference").unwrap();
        let h = hosts_file(&c);
        assert!(h.contains("10.77.0.14 node04.photon.test node04\n"));
        assert_eq!(h.lines().count(), 7);
    }

    /// No route leaves the host NIC: a guest's packet to the outside fails
    /// in the guest instead of opening a socket on the host.
    #[test]
    fn the_host_nic_has_an_address_and_no_gateway() {
        let c = Cluster::profile("reference").unwrap();
        let files = network_files(&c, 3, &c.nodes[3]);
        let host = &files
            .iter()
            .find(|(n, _)| n == "10-host.network")
            .unwrap()
            .1;
        assert!(host.contains("Address=10.0.2.15/24\n"), "{host}");
        assert!(!host.contains("Gateway"), "{host}");
    }
}
