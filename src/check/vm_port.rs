//! The migrating VM's NIC on an OVN logical port (PrismNet port binding for
//! PlasmaVMC guests), used by `vm_migration` when a lane gives it a `nic`.
//!
//! The port is bound on two chassis for the migration (OVN's multi-chassis
//! binding: `requested-chassis=<source>,<destination>` with
//! `activation-strategy=rarp`). The destination's binding only becomes
//! active when the VM announces itself there: QEMU sends a RARP from the
//! NIC's MAC when an incoming migration completes, and ovn-controller on
//! the destination sees it. The check records the southbound Port_Binding
//! before the migration, after it (activation by that announcement), after
//! the move is finalized (`requested-chassis=<destination>`), and after the
//! VM and its tap are deleted, when nothing may be left behind.

use super::ovn;
use crate::guest::Guest;
use crate::spec::Cluster;
use crate::wait::{Pause, Probe, Wait};
use anyhow::{Result, bail};
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// `nic = { network = "tenant-vm", address = "10.88.1.20" }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmPort {
    /// The logical switch the port is on (made if missing, removed after).
    pub network: String,
    pub address: String,
}

/// A port's southbound state, with chassis by name.
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    pub chassis: Vec<String>,
    pub additional: Vec<String>,
    pub options: String,
}

impl Binding {
    fn json(&self) -> Value {
        json!({ "chassis": self.chassis, "additional_chassis": self.additional, "options": self.options })
    }
}

impl VmPort {
    /// The port and the tap device share this name (15 characters at most).
    pub fn name(&self) -> String {
        let mut n = format!("{}-vm", self.network);
        n.truncate(15);
        n
    }

    fn mac(&self) -> String {
        ovn::mac(0x89, &self.address)
    }

    /// The node with the OVN databases, checked when the lane is read.
    pub fn central(cluster: &Cluster) -> Result<String, String> {
        ovn::central(cluster, None).map_err(|e| format!("`nic`: {e}"))
    }

    pub fn check(&self, cluster: &Cluster, nodes: &[&str]) -> Result<(), String> {
        Self::central(cluster)?;
        for n in nodes {
            ovn::chassis(cluster, n).map_err(|e| format!("`nic`: {e}"))?;
        }
        let ok = self.address.parse::<std::net::Ipv4Addr>().is_ok()
            && !self.network.is_empty()
            && self
                .network
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !ok {
            return Err(format!(
                "`nic`: {:?} on {:?} is no IPv4 address on a switch name",
                self.address, self.network
            ));
        }
        Ok(())
    }

    /// QEMU's arguments for the NIC (the same on both sides).
    pub fn qemu_args(&self) -> String {
        format!(
            "-netdev tap,id=n0,ifname={p},script=no,downscript=no -device virtio-net-pci,netdev=n0,mac={m}",
            p = self.name(),
            m = self.mac()
        )
    }

    /// Creates the logical port, bound to both chassis for the migration.
    pub fn create(&self, central: &Guest, src: &str, dst: &str) -> Result<Value> {
        let (ls, p) = (&self.network, self.name());
        let out = sh(
            central,
            &format!(
                "ovn-nbctl --may-exist ls-add {ls} -- --may-exist lsp-add {ls} {p} \
                 -- lsp-set-addresses {p} '{m} {a}' \
                 -- lsp-set-options {p} requested-chassis={src},{dst} activation-strategy=rarp \
                 && ovn-nbctl list logical_switch_port {p}",
                m = self.mac(),
                a = self.address
            ),
        )?;
        Ok(json!(out))
    }

    /// The VM's tap on `guest`, plugged into br-int with the port's iface-id.
    pub fn plug(&self, guest: &Guest) -> Result<Value> {
        let p = self.name();
        Ok(json!(sh(
            guest,
            &format!(
                "ip link del {p} 2>/dev/null; ip tuntap add dev {p} mode tap && ip link set {p} up && \
                 ovs-vsctl --may-exist add-port br-int {p} -- set interface {p} external_ids:iface-id={p} && \
                 ovs-vsctl --columns=name,ofport,external_ids list interface {p}"
            ),
        )?))
    }

    pub fn binding(&self, central: &Guest) -> Result<Binding> {
        let p = self.name();
        let out = sh(
            central,
            &format!(
                "for col in chassis additional_chassis; do printf '%s:' $col; \
                 for u in $(ovn-sbctl --bare --columns=$col find port_binding logical_port={p}); do \
                 printf ' %s' $(ovn-sbctl --bare --columns=name list chassis $u); done; echo; done; \
                 printf 'options: '; ovn-sbctl --bare --columns=options find port_binding logical_port={p}"
            ),
        )?;
        let field = |name: &str| -> Vec<String> {
            out.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}:")))
                .map(|v| v.split_whitespace().map(str::to_string).collect())
                .unwrap_or_default()
        };
        Ok(Binding {
            chassis: field("chassis"),
            additional: field("additional_chassis"),
            options: out
                .lines()
                .find_map(|l| l.strip_prefix("options: "))
                .unwrap_or("")
                .trim()
                .to_string(),
        })
    }

    /// Polls the binding until `ok` holds; every state seen is returned.
    pub fn until(
        &self,
        central: &Guest,
        limit: Duration,
        what: &str,
        ok: impl Fn(&Binding) -> bool,
    ) -> Result<(Value, f64)> {
        let started = Instant::now();
        let mut seen: Vec<Binding> = Vec::new();
        let got = Wait::new(format!("port {}: {what}", self.name()), limit)
            .pause(Pause::Every(Duration::from_millis(500)))
            .run_or_none(|| {
                let b = self.binding(central)?;
                let done = ok(&b);
                if seen.last() != Some(&b) {
                    seen.push(b.clone());
                }
                Ok(if done {
                    Probe::Done(b)
                } else {
                    Probe::Pending("not yet".into())
                })
            })?;
        let secs = started.elapsed().as_secs_f64();
        match got {
            Some(b) => Ok((json!({ "seconds": secs, "binding": b.json() }), secs)),
            None => {
                let states: Vec<Value> = seen.iter().map(Binding::json).collect();
                bail!(
                    "port {}: {what} not seen after {secs:.0} s (states: {})",
                    self.name(),
                    json!(states)
                )
            }
        }
    }

    /// The move is complete: only the destination is requested.
    pub fn finalize(&self, central: &Guest, dst: &str) -> Result<()> {
        sh(
            central,
            &format!(
                "ovn-nbctl lsp-set-options {} requested-chassis={dst}",
                self.name()
            ),
        )?;
        Ok(())
    }

    /// Deletes the VM's taps, then the port and its switch; fails if the
    /// port stays bound, an OVS interface stays, or the port stays in
    /// either database.
    pub fn delete(&self, central: &Guest, nodes: &[&Guest]) -> Result<Value> {
        let p = self.name();
        let mut ev = json!({});
        for g in nodes {
            sh(
                g,
                &format!(
                    "ovs-vsctl --if-exists del-port br-int {p}; ip link del {p} 2>/dev/null; true"
                ),
            )?;
        }
        let (unbound, _) = self.until(central, Duration::from_secs(60), "unbinding", |b| {
            b.chassis.is_empty() && b.additional.is_empty()
        })?;
        ev["after_tap_deleted"] = unbound;
        for g in nodes {
            let ports = sh(g, "ovs-vsctl list-ports br-int")?;
            ev["ovs_ports"][&g.endpoint.node] = json!(ports);
            if ports.lines().any(|l| l.trim() == p) {
                bail!(
                    "{}: OVS interface {p} left behind after deletion",
                    g.endpoint.node
                );
            }
        }
        sh(
            central,
            &format!("ovn-nbctl lsp-del {p} -- ls-del {}", self.network),
        )?;
        let left = sh(
            central,
            &format!(
                "ovn-nbctl --bare --columns=name find logical_switch_port name={p}; \
                 ovn-sbctl --bare --columns=logical_port find port_binding logical_port={p}"
            ),
        )?;
        ev["left_in_databases"] = json!(left.trim());
        if !left.trim().is_empty() {
            bail!("port {p} left behind in the OVN databases after deletion");
        }
        Ok(ev)
    }
}

fn sh(g: &Guest, command: &str) -> Result<String> {
    g.succeed(command, Duration::from_secs(120))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_macs_and_refusals() {
        let p = VmPort {
            network: "tenant-vm".into(),
            address: "10.88.1.20".into(),
        };
        assert_eq!(p.name(), "tenant-vm-vm");
        assert!(p.qemu_args().contains("mac=0a:89:0a:58:01:14"));
        let cluster = Cluster::profile("reference").unwrap();
        p.check(&cluster, &["node04", "node05"]).unwrap();
        assert!(
            p.check(&cluster, &["node04", "node06"])
                .unwrap_err()
                .contains("OVN chassis node06 does not run ovn-controller.service")
        );
        let bad = VmPort {
            network: "x".into(),
            address: "10.88.1".into(),
        };
        assert!(bad.check(&cluster, &["node04"]).is_err());
    }
}
