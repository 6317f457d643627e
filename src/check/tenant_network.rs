//! Tenant networks (the PrismNet part) on OVN: a VPC's lifecycle through the
//! northbound API, workloads bound to its ports on two workers, the traffic
//! between them before, during and after a security-group ACL change, and
//! the cleanup of every binding and object afterwards.
//!
//! The OVN databases and ovn-northd run on the `central` node (the first
//! control node, images/debian/roles/control.sh); every worker is a chassis
//! (ovn-controller, Geneve over the fabric). The check drives `ovn-nbctl`
//! and `ovn-sbctl` on the central node and `ovs-vsctl`/`ip` on the workers
//! over SSH, and keeps every create and get response as evidence.
//!
//! A workload is a network namespace holding an OVS internal port whose
//! `iface-id` names the logical port: what an inner VM's tap device would
//! be, without a guest that takes minutes to boot under TCG. The verdict
//! says so. The traffic itself (ping between the namespaces) is the
//! evidence of every phase, never the presence of a rule.

use super::ovn::{self, mac};
use super::procedure::Procedure;
use super::{Check, Ctx, Verdict};
use crate::spec::Cluster;
use anyhow::{Result, bail};
use serde::Deserialize;
use serde_json::json;
use std::time::Duration;

/// `tenant_network`: create a VPC (router, switch with subnet, ports, a
/// port group with ACLs), bind a workload to each port, prove traffic,
/// block it with an ACL and restore it, then delete everything and prove
/// nothing is left behind.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantNetwork {
    /// The node running the OVN databases; default: the first control node.
    #[serde(default)]
    central: Option<String>,
    /// The logical switch; the router is `<network>-vpc`, the security
    /// group `<network>_sg` (port group names allow no dashes).
    #[serde(default = "default_network")]
    network: String,
    /// IPv4 /24 of the switch; the router takes `.1`.
    #[serde(default = "default_subnet")]
    subnet: String,
    ports: Vec<Port>,
}

/// One logical port and the worker its workload runs on.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Port {
    name: String,
    node: String,
    address: String,
}

fn default_network() -> String {
    "tenant-a".into()
}
fn default_subnet() -> String {
    "10.88.0.0/24".into()
}

/// The MAC kind of tenant ports (`0a:88:...`).
const MAC_KIND: u8 = 0x88;

impl Check for TenantNetwork {
    fn bind(&mut self, _target: Option<&str>, cluster: &Cluster) -> Result<(), String> {
        let central = ovn::central(cluster, self.central.as_deref())?;
        self.central = Some(central);
        let prefix = subnet_prefix(&self.subnet)?;
        if self.ports.len() < 2 {
            return Err("a tenant network needs at least two ports to carry traffic".into());
        }
        if !valid_name(&self.network) {
            return Err(format!(
                "network {:?}: use letters, digits and '-'",
                self.network
            ));
        }
        let mut seen = Vec::new();
        for p in &self.ports {
            if !valid_name(&p.name) || seen.contains(&p.name) {
                return Err(format!("port name {:?} is invalid or repeated", p.name));
            }
            seen.push(p.name.clone());
            ovn::chassis(cluster, &p.node)?;
            let host = p
                .address
                .strip_prefix(&prefix)
                .and_then(|h| h.parse::<u8>().ok())
                .filter(|h| (2..255).contains(h));
            if host.is_none() {
                return Err(format!(
                    "port {}: address {:?} is not a host of {} (.2-.254)",
                    p.name, p.address, self.subnet
                ));
            }
        }
        Ok(())
    }

    fn attempt(&self, ctx: &Ctx, _target: Option<&str>, budget: Duration) -> Result<Verdict> {
        let central = self.central.as_deref().unwrap_or("node01");
        let evidence = json!({
            "central": central,
            "network": self.network,
            "router": format!("{}-vpc", self.network),
            "security_group": sg(&self.network),
            "workloads": "network namespaces on OVS internal ports (stand-ins for VM NICs)",
        });
        // Whatever fails (Ctrl-C and --timeout included), the teardown
        // leaves the cluster as it was; its steps are kept too.
        let verdict = Procedure::new(ctx, central, budget)?.conclude(
            |run| lifecycle(self, run),
            |run| teardown(self, run),
            evidence,
        );
        Ok(match verdict.outcome {
            super::Outcome::Pass => Verdict::pass(
                format!(
                    "{}; workloads are network namespaces standing in for VM NICs",
                    verdict.message
                ),
                verdict.evidence,
            ),
            _ => verdict,
        })
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 15 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// `10.88.0.0/24` -> `10.88.0.`; only /24 subnets (addresses are `.N`).
fn subnet_prefix(subnet: &str) -> Result<String, String> {
    let net = subnet
        .strip_suffix(".0/24")
        .filter(|n| n.split('.').count() == 3 && n.split('.').all(|o| o.parse::<u8>().is_ok()))
        .ok_or_else(|| format!("subnet {subnet:?} must be an IPv4 /24 like 10.88.0.0/24"))?;
    Ok(format!("{net}."))
}

fn sg(network: &str) -> String {
    format!("{}_sg", network.replace('-', "_"))
}

fn lifecycle(t: &TenantNetwork, run: &mut Procedure) -> Result<String> {
    let (ls, lr, sg) = (
        t.network.as_str(),
        format!("{}-vpc", t.network),
        sg(&t.network),
    );
    let prefix = subnet_prefix(&t.subnet).map_err(anyhow::Error::msg)?;
    let gw = format!("{prefix}1");
    let (a, b) = (&t.ports[0], &t.ports[1]);

    // Create, through the northbound API; each create is followed by a get.
    run.must(
        "create-router",
        "create router (VPC)",
        None,
        &format!("ovn-nbctl --may-exist lr-add {lr}"),
    )?;
    run.must(
        "get-router",
        "get router",
        None,
        &format!("ovn-nbctl list logical_router {lr}"),
    )?;
    run.must(
        "create-switch",
        "create switch with subnet",
        None,
        &format!(
            "ovn-nbctl --may-exist ls-add {ls} -- set logical_switch {ls} other_config:subnet={}",
            t.subnet
        ),
    )?;
    run.must(
        "attach-switch",
        "attach switch to router",
        None,
        &format!(
            "ovn-nbctl --may-exist lrp-add {lr} {lr}-{ls} {} {gw}/24 -- --may-exist lsp-add {ls} {ls}-{lr} \
             -- lsp-set-type {ls}-{lr} router -- lsp-set-addresses {ls}-{lr} router \
             -- lsp-set-options {ls}-{lr} router-port={lr}-{ls}",
            mac(MAC_KIND, &gw)
        ),
    )?;
    run.must(
        "get-switch",
        "get switch",
        None,
        &format!("ovn-nbctl list logical_switch {ls}"),
    )?;
    for p in &t.ports {
        let addr = format!("{} {}", mac(MAC_KIND, &p.address), p.address);
        run.must(
            "create-port",
            "create port",
            None,
            &format!(
                "ovn-nbctl --may-exist lsp-add {ls} {n} -- lsp-set-addresses {n} '{addr}' \
                 -- lsp-set-port-security {n} '{addr}'",
                n = p.name
            ),
        )?;
        run.must(
            "get-port",
            "get port",
            None,
            &format!("ovn-nbctl list logical_switch_port {}", p.name),
        )?;
    }
    let members: Vec<&str> = t.ports.iter().map(|p| p.name.as_str()).collect();
    run.must(
        "create-security-group",
        "create security group (port group + ACLs)",
        None,
        &format!(
            "if [ -z \"$(ovn-nbctl --bare --columns=_uuid find port_group name={sg})\" ]; \
             then ovn-nbctl pg-add {sg} {m}; else ovn-nbctl pg-set-ports {sg} {m}; fi && \
             ovn-nbctl --may-exist acl-add {sg} to-lport 1000 'outport == @{sg} && ip4' allow-related \
             -- --may-exist acl-add {sg} from-lport 1000 'inport == @{sg} && ip4' allow-related",
            m = members.join(" ")
        ),
    )?;
    run.must(
        "get-security-group",
        "get security group",
        None,
        &format!("ovn-nbctl list port_group {sg}; ovn-nbctl acl-list {sg}"),
    )?;

    // Bind one workload per port on its worker.
    for p in &t.ports {
        run.must(
            "bind-workload",
            "bind workload",
            Some(&p.node),
            &bind_workload(p, &gw),
        )?;
    }
    for p in &t.ports {
        run.until(
            "port-bound",
            "port bound to its chassis",
            None,
            &format!(
                "ovn-sbctl --bare --columns=chassis find port_binding logical_port={} | grep .",
                p.name
            ),
            true,
            Duration::from_secs(90),
        )?;
        run.must(
            "get-port-binding",
            "get port binding",
            None,
            &format!("ovn-sbctl find port_binding logical_port={}", p.name),
        )?;
    }
    run.must("southbound-view", "southbound view", None, "ovn-sbctl show")?;
    run.must(
        "tunnels",
        "tunnels on the first worker",
        Some(&a.node),
        "ovs-vsctl show",
    )?;

    // Traffic before, during and after the ACL change.
    let ping = format!("ip netns exec {} ping -c 2 -W 2 {}", a.name, b.address);
    let before = run.until(
        "traffic-before",
        "traffic before the ACL change",
        Some(&a.node),
        &ping,
        true,
        Duration::from_secs(30),
    )?;
    let block = format!("'outport == @{sg} && icmp4'");
    run.must(
        "acl-block",
        "ACL change: drop ICMP into the group",
        None,
        &format!("ovn-nbctl acl-add {sg} to-lport 1001 {block} drop"),
    )?;
    run.must(
        "get-acls-blocking",
        "get ACLs while blocking",
        None,
        &format!("ovn-nbctl acl-list {sg}"),
    )?;
    let blocked = run.until(
        "traffic-blocked",
        "traffic during the ACL change",
        Some(&a.node),
        &ping,
        false,
        Duration::from_secs(60),
    )?;
    run.must(
        "acl-unblock",
        "ACL change undone",
        None,
        &format!("ovn-nbctl acl-del {sg} to-lport 1001 {block}"),
    )?;
    run.must(
        "get-acls-after",
        "get ACLs after",
        None,
        &format!("ovn-nbctl acl-list {sg}"),
    )?;
    let restored = run.until(
        "traffic-restored",
        "traffic after the ACL change is undone",
        Some(&a.node),
        &ping,
        true,
        Duration::from_secs(60),
    )?;

    // Delete: workloads first (as a VM's deletion would), then the VPC.
    for p in &t.ports {
        run.must(
            "delete-workload",
            "delete workload",
            Some(&p.node),
            &unbind_workload(p),
        )?;
    }
    for p in &t.ports {
        run.until(
            "port-unbound",
            "port unbound after deletion",
            None,
            &format!(
                "ovn-sbctl --bare --columns=chassis find port_binding logical_port={} | grep -q .",
                p.name
            ),
            false,
            Duration::from_secs(60),
        )?;
        run.until(
            "ovs-interface-gone",
            "OVS interface gone",
            Some(&p.node),
            &format!("ovs-vsctl list-ports br-int | grep -qx {}", p.name),
            false,
            Duration::from_secs(10),
        )?;
    }
    let ports: Vec<String> = t
        .ports
        .iter()
        .map(|p| format!("-- lsp-del {}", p.name))
        .collect();
    run.must(
        "delete-vpc",
        "delete security group, ports, switch and router",
        None,
        &format!(
            "ovn-nbctl pg-del {sg} {} -- lsp-del {ls}-{lr} -- ls-del {ls} -- lr-del {lr}",
            ports.join(" ")
        ),
    )?;
    let (_, left) = run.step(
        "nothing-left",
        "nothing left behind",
        None,
        &format!(
            "ovn-nbctl --bare --columns=name find port_group name={sg}; \
             ovn-nbctl --bare --columns=name find logical_switch name={ls}; \
             ovn-nbctl --bare --columns=name find logical_router name={lr}; \
             ovn-nbctl --bare --columns=match find acl | grep -F '@{sg}'; \
             ovn-sbctl --bare --columns=logical_port find port_binding | grep -xF -e {}",
            members.join(" -e ")
        ),
    )?;
    if !left.trim().is_empty() {
        bail!(
            "left behind after deletion: {}",
            left.split_whitespace().collect::<Vec<_>>().join(" ")
        );
    }
    Ok(format!(
        "{} <-> {} across {} and {}: traffic in {before:.0} s, blocked by the ACL in {blocked:.0} s, \
         restored in {restored:.0} s; deletion unbound every port and left nothing",
        a.name, b.name, a.node, b.node
    ))
}

/// Best-effort removal of everything the lifecycle may have created, after
/// a failure (the evidence keeps what the failure left as it was).
fn teardown(t: &TenantNetwork, run: &mut Procedure) -> Result<()> {
    for p in &t.ports {
        run.step(
            "teardown-workload",
            "teardown workload",
            Some(&p.node),
            &format!(
                "ovs-vsctl --if-exists del-port br-int {n}; ip netns del {n} 2>/dev/null; true",
                n = p.name
            ),
        )?;
    }
    let ports: Vec<String> = t
        .ports
        .iter()
        .map(|p| format!("-- --if-exists lsp-del {}", p.name))
        .collect();
    run.step(
        "teardown-vpc",
        "teardown security group, ports, switch and router",
        None,
        &format!(
            "ovn-nbctl pg-del {sg} 2>/dev/null; ovn-nbctl --if-exists lsp-del {ls}-{ls}-vpc {} \
             -- --if-exists ls-del {ls} -- --if-exists lr-del {ls}-vpc",
            ports.join(" "),
            sg = sg(&t.network),
            ls = t.network
        ),
    )?;
    Ok(())
}

/// The workload: a namespace named like the port, holding the OVS internal
/// port whose iface-id binds it to the logical port.
fn bind_workload(p: &Port, gw: &str) -> String {
    let n = &p.name;
    format!(
        "set -e; ip netns del {n} 2>/dev/null || true; ovs-vsctl --if-exists del-port br-int {n}; \
         ip netns add {n}; \
         ovs-vsctl add-port br-int {n} -- set interface {n} type=internal external_ids:iface-id={n}; \
         ip link set {n} netns {n}; ip -n {n} link set {n} address {mac}; \
         ip -n {n} addr add {addr}/24 dev {n}; ip -n {n} link set {n} mtu 1400 up; \
         ip -n {n} link set lo up; ip -n {n} route add default via {gw}; \
         ovs-vsctl --columns=name,external_ids list interface {n}",
        mac = mac(MAC_KIND, &p.address),
        addr = p.address
    )
}

fn unbind_workload(p: &Port) -> String {
    format!(
        "ovs-vsctl del-port br-int {n} && ip netns del {n}",
        n = p.name
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> TenantNetwork {
        toml::from_str(&format!(
            "ports = [{{ name = \"web\", node = \"node04\", address = \"10.88.0.11\" }}, \
             {{ name = \"db\", node = \"node05\", address = \"10.88.0.12\" }}]\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn binds_against_the_reference_cluster() {
        let cluster = crate::spec::Cluster::profile("reference").unwrap();
        let mut t = parse("");
        t.bind(None, &cluster).unwrap();
        assert_eq!(t.central.as_deref(), Some("node01"));
    }

    #[test]
    fn refuses_ports_on_nodes_that_are_no_chassis_and_foreign_addresses() {
        let cluster = crate::spec::Cluster::profile("reference").unwrap();
        let mut t = parse("");
        t.ports[1].node = "node06".into();
        assert!(
            t.bind(None, &cluster)
                .unwrap_err()
                .contains("node06 does not run ovn-controller")
        );
        let mut t = parse("");
        t.ports[1].node = "node99".into();
        assert!(
            t.bind(None, &cluster)
                .unwrap_err()
                .contains("\"node99\" is no node of the cluster")
        );
        let mut t = parse("");
        t.ports[0].address = "10.99.0.11".into();
        assert!(
            t.bind(None, &cluster)
                .unwrap_err()
                .contains("not a host of 10.88.0.0/24")
        );
        let mut t = parse("central = \"node02\"");
        assert!(
            t.bind(None, &cluster)
                .unwrap_err()
                .contains("node02 does not run ovn-northd.service")
        );
    }

    #[test]
    fn names_and_macs() {
        assert_eq!(mac(MAC_KIND, "10.88.0.11"), "0a:88:0a:58:00:0b");
        assert_eq!(sg("tenant-a"), "tenant_a_sg");
        assert_eq!(subnet_prefix("10.88.0.0/24").unwrap(), "10.88.0.");
        assert!(subnet_prefix("10.88.0.0/16").is_err());
    }
}
