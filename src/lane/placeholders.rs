//! Placeholders in lane files: `{node}` (the target), `{address}` (its
//! cluster address), `{address:<node>}` and `{domain}`. They are filled in
//! every string of a check's table, once per target, before the kind reads
//! it. Anything else in braces (JSON in a command) is left as it is.

use crate::spec::Cluster;

/// Fills every string inside `v`.
pub fn fill(v: &mut toml::Value, target: Option<&str>, cluster: &Cluster) -> Result<(), String> {
    match v {
        toml::Value::String(s) => *s = placeholders(s, target, cluster)?,
        toml::Value::Array(items) => {
            for i in items {
                fill(i, target, cluster)?;
            }
        }
        toml::Value::Table(map) => {
            for (_, i) in map.iter_mut() {
                fill(i, target, cluster)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// `s` with its placeholders filled for `target`.
pub fn placeholders(s: &str, target: Option<&str>, cluster: &Cluster) -> Result<String, String> {
    let address = |n: &str| {
        cluster
            .node(n)
            .map(|n| n.address.to_string())
            .ok_or_else(|| format!("`{{address:{n}}}`: no node {n:?}"))
    };
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let Some(len) = rest[start..].find('}') else {
            break;
        };
        let key = &rest[start + 1..start + len];
        let needs = |what: &str| format!("`{{{what}}}` needs a target node");
        let value = match key.split_once(':') {
            Some(("address", n)) => address(n)?,
            _ => match key {
                "node" => target.ok_or_else(|| needs("node"))?.to_string(),
                "address" => address(target.ok_or_else(|| needs("address"))?)?,
                "domain" => cluster.network.domain.clone(),
                // Not ours (JSON in a command, for example): keep it.
                _ => rest[start..=start + len].to_string(),
            },
        };
        out.push_str(&value);
        rest = &rest[start + len + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_fill_node_address_and_domain() {
        let c = Cluster::profile("reference").unwrap();
        let s = placeholders(
            "{node}.{domain} {address} {address:node06} {x}",
            Some("node02"),
            &c,
        );
        assert_eq!(s.unwrap(), "node02.photon.test 10.77.0.12 10.77.0.16 {x}");
        assert!(placeholders("{node}", None, &c).is_err());
        assert!(placeholders("{address:nope}", None, &c).is_err());
    }
}
