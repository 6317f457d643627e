//! The OVN pieces the provider checks share (`tenant_network`, and the
//! migrating VM's port in `vm_port`): which node is the central one, which
//! nodes are chassis, and the MAC a logical port gets for its address.
//!
//! The OVN databases and ovn-northd run on the central node (a control
//! node, images/debian/roles/control.sh); every worker running
//! ovn-controller is a chassis (Geneve over the fabric).

use crate::spec::{Cluster, Role};

/// The unit that makes a node an OVN chassis.
pub const CHASSIS_UNIT: &str = "ovn-controller.service";
/// The unit that serves the OVN databases.
pub const CENTRAL_UNIT: &str = "ovn-northd.service";

/// The central node: `explicit` when a lane names one (it must run
/// ovn-northd), else the first control node that runs it.
pub fn central(cluster: &Cluster, explicit: Option<&str>) -> Result<String, String> {
    if let Some(name) = explicit {
        return cluster
            .node_running(name, CENTRAL_UNIT, "OVN central")
            .map(|n| n.name.clone());
    }
    cluster
        .with_role(Role::Control)
        .find(|n| n.runs(CENTRAL_UNIT))
        .map(|n| n.name.clone())
        .ok_or_else(|| {
            format!("the cluster has no control node running {CENTRAL_UNIT} (OVN central)")
        })
}

/// `node` must be an OVN chassis.
pub fn chassis(cluster: &Cluster, node: &str) -> Result<(), String> {
    cluster
        .node_running(node, CHASSIS_UNIT, "OVN chassis")
        .map(|_| ())
}

/// A stable, locally administered MAC for `address`: `0a:<kind>` and the
/// address's four octets; `kind` keeps tenant ports and VM NICs apart.
pub fn mac(kind: u8, address: &str) -> String {
    let o: Vec<u8> = address.split('.').filter_map(|x| x.parse().ok()).collect();
    let octet = |i: usize| o.get(i).copied().unwrap_or(0);
    format!(
        "0a:{kind:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        octet(0),
        octet(1),
        octet(2),
        octet(3)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rule_for_the_central_node_and_the_chassis() {
        let cluster = Cluster::profile("reference").unwrap();
        assert_eq!(central(&cluster, None).unwrap(), "node01");
        assert_eq!(central(&cluster, Some("node01")).unwrap(), "node01");
        let e = central(&cluster, Some("node04")).unwrap_err();
        assert!(e.contains("node04 does not run ovn-northd.service"), "{e}");
        chassis(&cluster, "node04").unwrap();
        let e = chassis(&cluster, "node06").unwrap_err();
        assert!(
            e.contains("OVN chassis node06 does not run ovn-controller.service"),
            "{e}"
        );
        let e = chassis(&cluster, "node09").unwrap_err();
        assert!(e.contains("\"node09\" is no node of the cluster"), "{e}");
    }

    #[test]
    fn macs_follow_the_address() {
        assert_eq!(mac(0x88, "10.88.0.11"), "0a:88:0a:58:00:0b");
        assert_eq!(mac(0x89, "10.88.1.20"), "0a:89:0a:58:01:14");
    }
}
