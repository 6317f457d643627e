//! The cluster's L2 segment: which kind it is, how each node's fabric NIC
//! reaches it, and the life of the switch process.
//!
//! The switch (switch.rs) is the default: faults need a segment that can cut
//! a link. QEMU's multicast hub stays available (`--fabric hub`) as the
//! baseline the switch's throughput is measured against.
//!
//! The switch runs as its own process (`photon-cluster fabric-switch`),
//! because the cluster outlives the command that starts it. It dies with the
//! cluster: it exits when cluster.json disappears (stop, clean, a failed
//! start, the reaping of a killed owner), and those paths also kill it.

use super::switch::{self, PortSpec, Request, Status, SwitchConfig};
use crate::error::bad_input;
use anyhow::{Context, Result, anyhow};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Which segment a cluster's guests share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A userspace switch run by the driver: partitions, link faults, capture.
    #[default]
    Switch,
    /// QEMU's multicast socket: every guest sees every frame, nothing can be cut.
    Hub,
}

/// How one node's fabric NIC reaches the segment (its QEMU `-netdev`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Link {
    Hub { group: String, port: u16 },
    Switch { switch_port: u16, qemu_port: u16 },
}

impl Link {
    /// The `-netdev` value for QEMU.
    pub fn netdev(&self) -> String {
        match self {
            Link::Hub { group, port } => {
                format!("socket,id=fabric,mcast={group}:{port},localaddr=127.0.0.1")
            }
            Link::Switch {
                switch_port,
                qemu_port,
            } => format!(
                "socket,id=fabric,udp=127.0.0.1:{switch_port},localaddr=127.0.0.1:{qemu_port}"
            ),
        }
    }
}

/// The running segment, as cluster.json records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Segment {
    pub kind: Kind,
    pub links: BTreeMap<String, Link>,
    /// The switch process and its control socket (switched segments only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch_pid: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<PathBuf>,
}

impl Segment {
    /// Chooses every node's link. A restored cluster gets new links too:
    /// a `-netdev` backend is not part of a guest's saved state. New ports
    /// are never one of `avoid` (the host forwards just chosen, whose
    /// sockets are closed again until QEMU binds them).
    pub fn plan(
        kind: Kind,
        state_root: &Path,
        nodes: &[String],
        avoid: &std::collections::BTreeSet<u16>,
    ) -> Result<Segment> {
        let links = match kind {
            Kind::Hub => {
                let (group, port) = super::mcast_for(state_root);
                nodes
                    .iter()
                    .map(|n| {
                        let link = Link::Hub {
                            group: group.clone(),
                            port,
                        };
                        (n.clone(), link)
                    })
                    .collect()
            }
            Kind::Switch => {
                // Every socket stays bound until all are chosen: no port twice.
                let mut held = Vec::new();
                let mut ports = Vec::new();
                while ports.len() < nodes.len() * 2 {
                    let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
                        .context("choosing the fabric's UDP ports")?;
                    let port = s.local_addr()?.port();
                    if !avoid.contains(&port) {
                        ports.push(port);
                    }
                    held.push(s);
                }
                nodes
                    .iter()
                    .zip(ports.chunks(2))
                    .map(|(n, p)| {
                        let link = Link::Switch {
                            switch_port: p[0],
                            qemu_port: p[1],
                        };
                        (n.clone(), link)
                    })
                    .collect()
            }
        };
        Ok(Segment {
            kind,
            links,
            switch_pid: None,
            control: None,
        })
    }

    /// Starts the switch for a switched segment (a hub needs no process),
    /// and returns once its ports are bound. `dir` holds its config, log and
    /// control socket; `watch` is the cluster record it lives as long as.
    pub fn start(&mut self, dir: &Path, watch: &Path) -> Result<()> {
        if self.kind != Kind::Switch {
            return Ok(());
        }
        fs::create_dir_all(dir)?;
        let control = dir.join("control.sock");
        let _ = fs::remove_file(&control);
        let config = SwitchConfig {
            ports: self
                .links
                .iter()
                .filter_map(|(node, link)| match link {
                    Link::Switch {
                        switch_port,
                        qemu_port,
                    } => Some(PortSpec {
                        node: node.clone(),
                        switch_port: *switch_port,
                        qemu_port: *qemu_port,
                    }),
                    Link::Hub { .. } => None,
                })
                .collect(),
            control: control.clone(),
            watch: watch.to_path_buf(),
        };
        let config_file = dir.join("switch.json");
        fs::write(&config_file, serde_json::to_vec_pretty(&config)?)?;
        let log_file = dir.join("switch.log");
        let log = fs::File::create(&log_file)?;
        let exe = std::env::current_exe().context("locating the driver's own binary")?;
        let mut child = Command::new(exe)
            .arg("fabric-switch")
            .arg("--config")
            .arg(&config_file)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: a Ctrl-C at the terminal is the
            // driver's to handle; the switch goes when the cluster goes.
            .process_group(0)
            .spawn()
            .context("spawning the fabric switch")?;
        let pid = child.id() as i32;
        crate::wait::Wait::new(
            "the fabric switch's control socket",
            Duration::from_secs(10),
        )
        .pause(crate::wait::Pause::Every(Duration::from_millis(20)))
        .run(|| {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(crate::error::named(
                    crate::error::ErrorKind::FabricFailed,
                    anyhow!(
                        "the fabric switch exited at start ({status}): {}",
                        fs::read_to_string(&log_file).unwrap_or_default().trim()
                    ),
                ));
            }
            Ok(if control.exists() {
                crate::wait::Probe::Done(())
            } else {
                crate::wait::Probe::Pending("not listening yet".into())
            })
        })?;
        self.switch_pid = Some(pid);
        self.control = Some(control);
        Ok(())
    }

    /// Whether the switch process is alive (a hub has none and is always up).
    pub fn switch_running(&self) -> bool {
        self.switch_pid.is_none_or(is_switch)
    }

    /// Stops the switch now (stop, teardown, reaping).
    pub fn kill(&self) {
        if let Some(pid) = self.switch_pid
            && is_switch(pid)
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Sends one control request to the switch.
    pub fn request(&self, req: &Request) -> Result<Status> {
        let control = self.control.as_ref().ok_or_else(|| {
            bad_input(
                "this cluster's fabric is QEMU's multicast hub, which cannot cut or capture; \
                 start it with `--fabric switch` (the default)",
            )
        })?;
        if !self.switch_running() {
            return Err(crate::error::named(
                crate::error::ErrorKind::FabricFailed,
                anyhow!(
                    "the fabric switch (pid {}) is not running; see {}",
                    self.switch_pid.unwrap_or_default(),
                    control.with_file_name("switch.log").display()
                ),
            ));
        }
        switch::request(control, req, Duration::from_secs(10))
    }
}

/// Whether `pid` is a live fabric switch (not a reused pid).
fn is_switch(pid: i32) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().next())
        == Some("Z");
    let cmd = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    !zombie && String::from_utf8_lossy(&cmd).contains("fabric-switch")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_switched_segment_gives_every_node_its_own_pair_of_ports() {
        let nodes: Vec<String> = ["node01", "node02", "node03"].map(String::from).to_vec();
        let s = Segment::plan(
            Kind::Switch,
            Path::new("/tmp/x"),
            &nodes,
            &Default::default(),
        )
        .unwrap();
        let mut ports: Vec<u16> = s
            .links
            .values()
            .flat_map(|l| match l {
                Link::Switch {
                    switch_port,
                    qemu_port,
                } => vec![*switch_port, *qemu_port],
                Link::Hub { .. } => panic!("hub link in a switched segment"),
            })
            .collect();
        ports.sort();
        ports.dedup();
        assert_eq!(ports.len(), 6);
        let netdev = s.links["node02"].netdev();
        assert!(
            netdev.starts_with("socket,id=fabric,udp=127.0.0.1:"),
            "{netdev}"
        );
        assert!(netdev.contains(",localaddr=127.0.0.1:"), "{netdev}");
    }

    #[test]
    fn a_hub_segment_shares_one_group() {
        let nodes: Vec<String> = ["a", "b"].map(String::from).to_vec();
        let s = Segment::plan(Kind::Hub, Path::new("/tmp/x"), &nodes, &Default::default()).unwrap();
        assert_eq!(s.links["a"], s.links["b"]);
        assert!(s.links["a"].netdev().contains("mcast=230."));
        let e = s.request(&Request::Heal).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), crate::error::EXIT_BAD_INPUT);
    }
}
