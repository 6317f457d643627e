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
use super::procedure::Procedure;
use crate::spec::Cluster;
use anyhow::{Result, bail};
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::Duration;

/// `nic = { network = "tenant-vm", address = "10.88.1.20" }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmPort {
    /// The logical switch the port is on (made if missing, removed after).
    pub network: String,
    pub address: String,
}

/// A port's southbound state, with chassis by name.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Binding {
    pub chassis: Vec<String>,
    #[serde(rename = "additional_chassis")]
    pub additional: Vec<String>,
    pub options: String,
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

    /// Creates the logical port on `central`, bound to both chassis for
    /// the migration (`port.create`).
    pub fn create(&self, run: &mut Procedure, central: &str, src: &str, dst: &str) -> Result<()> {
        let (ls, p) = (&self.network, self.name());
        let out = run.must_stdout(
            "port-create",
            "create the VM's logical port, bound to both chassis",
            Some(central),
            &format!(
                "ovn-nbctl --may-exist ls-add {ls} -- --may-exist lsp-add {ls} {p} \
                 -- lsp-set-addresses {p} '{m} {a}' \
                 -- lsp-set-options {p} requested-chassis={src},{dst} activation-strategy=rarp \
                 && ovn-nbctl list logical_switch_port {p}",
                m = self.mac(),
                a = self.address
            ),
        )?;
        run.note_in("port", json!({ "create": out }));
        Ok(())
    }

    /// The VM's tap on each of `nodes`, plugged into br-int with the port's
    /// iface-id (`port.plug.<node>`).
    pub fn plug(&self, run: &mut Procedure, nodes: &[&str]) -> Result<()> {
        let p = self.name();
        let mut plugged = json!({});
        for node in nodes {
            plugged[*node] = json!(run.must_stdout(
                "port-plug",
                "plug the VM's tap into br-int",
                Some(node),
                &format!(
                    "ip link del {p} 2>/dev/null; ip tuntap add dev {p} mode tap && ip link set {p} up && \
                     ovs-vsctl --may-exist add-port br-int {p} -- set interface {p} external_ids:iface-id={p} && \
                     ovs-vsctl --columns=name,ofport,external_ids list interface {p}"
                ),
            )?);
        }
        run.note_in("port", json!({ "plug": plugged }));
        Ok(())
    }

    /// Prints the southbound binding's chassis by name and its options.
    fn binding_command(&self) -> String {
        let p = self.name();
        format!(
            "for col in chassis additional_chassis; do printf '%s:' $col; \
             for u in $(ovn-sbctl --bare --columns=$col find port_binding logical_port={p}); do \
             printf ' %s' $(ovn-sbctl --bare --columns=name list chassis $u); done; echo; done; \
             printf 'options: '; ovn-sbctl --bare --columns=options find port_binding logical_port={p}"
        )
    }

    /// Watches the binding on `central` until `ok` holds (every state seen
    /// is a step); `{seconds, binding}` and the seconds.
    pub fn until(
        &self,
        run: &mut Procedure,
        central: &str,
        id: &str,
        what: &str,
        ok: impl Fn(&Binding) -> bool,
    ) -> Result<(Value, f64)> {
        let label = format!("port {}: {what}", self.name());
        let limit = Duration::from_secs(60);
        let (b, secs) = run.watch(
            id,
            &label,
            Some(central),
            &self.binding_command(),
            limit,
            Duration::from_millis(500),
            |out| Ok(Some(Binding::parse(out)).filter(|b| ok(b))),
        )?;
        Ok((json!({ "seconds": secs, "binding": b }), secs))
    }

    /// The move is complete: only the destination is requested.
    pub fn finalize(&self, run: &mut Procedure, central: &str, dst: &str) -> Result<()> {
        let label = "request the destination chassis alone";
        let command = format!(
            "ovn-nbctl lsp-set-options {} requested-chassis={dst}",
            self.name()
        );
        run.must("port-finalize", label, Some(central), &command)?;
        Ok(())
    }

    /// Deletes the VM's taps on `nodes`, then the port and its switch
    /// (`port.deleted`); fails if the port stays bound, an OVS interface
    /// stays, or the port stays in either database.
    pub fn delete(&self, run: &mut Procedure, central: &str, nodes: &[&str]) -> Result<()> {
        let p = self.name();
        let mut ev = json!({});
        self.unplug(run, nodes)?;
        let (unbound, _) = self.until(run, central, "port-unbound", "unbinding", |b| {
            b.chassis.is_empty() && b.additional.is_empty()
        })?;
        ev["after_tap_deleted"] = unbound;
        for node in nodes {
            let list = "ovs-vsctl list-ports br-int";
            let ports =
                run.must_stdout("port-ovs-ports", "list br-int's ports", Some(node), list)?;
            ev["ovs_ports"][*node] = json!(ports);
            if ports.lines().any(|l| l.trim() == p) {
                bail!("{node}: OVS interface {p} left behind after deletion");
            }
        }
        let drop = format!("ovn-nbctl lsp-del {p} -- ls-del {}", self.network);
        run.must(
            "port-delete",
            "delete the port and its switch",
            Some(central),
            &drop,
        )?;
        let left = run.must_stdout(
            "port-left",
            "find the port in either database",
            Some(central),
            &format!(
                "ovn-nbctl --bare --columns=name find logical_switch_port name={p}; \
                 ovn-sbctl --bare --columns=logical_port find port_binding logical_port={p}"
            ),
        )?;
        ev["left_in_databases"] = json!(left.trim());
        run.note_in("port", json!({ "deleted": ev }));
        if !left.trim().is_empty() {
            bail!("port {p} left behind in the OVN databases after deletion");
        }
        Ok(())
    }

    /// Removes the VM's tap from br-int and the node on each of `nodes`.
    pub fn unplug(&self, run: &mut Procedure, nodes: &[&str]) -> Result<()> {
        let p = self.name();
        let command =
            format!("ovs-vsctl --if-exists del-port br-int {p}; ip link del {p} 2>/dev/null; true");
        for node in nodes {
            run.must("port-unplug", "delete the VM's tap", Some(node), &command)?;
        }
        Ok(())
    }

    /// Best effort after a failure: the taps, the port and its switch go.
    pub fn remove(&self, run: &mut Procedure, central: &str, nodes: &[&str]) -> Result<()> {
        self.unplug(run, nodes)?;
        let drop = format!(
            "ovn-nbctl --if-exists lsp-del {} -- --if-exists ls-del {}",
            self.name(),
            self.network
        );
        run.step(
            "teardown-port",
            "delete the port and its switch",
            Some(central),
            &drop,
        )?;
        Ok(())
    }
}

impl Binding {
    /// `chassis: a b`, `additional_chassis: c` and `options: ...` lines.
    fn parse(out: &str) -> Binding {
        let field = |name: &str| -> Vec<String> {
            out.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}:")))
                .map(|v| v.split_whitespace().map(str::to_string).collect())
                .unwrap_or_default()
        };
        let options = out.lines().find_map(|l| l.strip_prefix("options: "));
        Binding {
            chassis: field("chassis"),
            additional: field("additional_chassis"),
            options: options.unwrap_or("").trim().to_string(),
        }
    }
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

    #[test]
    fn a_binding_is_read_from_its_listing() {
        let b = Binding::parse(
            "chassis: node04\nadditional_chassis: node05\noptions: activation-strategy=rarp requested-chassis=\"node04,node05\"\n",
        );
        assert_eq!(b.chassis, ["node04"]);
        assert_eq!(b.additional, ["node05"]);
        assert!(b.options.starts_with("activation-strategy=rarp"));
        let none = Binding::parse("chassis:\nadditional_chassis:\noptions: \n");
        assert!(none.chassis.is_empty() && none.additional.is_empty());
        assert_eq!(none.options, "");
    }
}
