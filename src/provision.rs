//! Per-node provisioning: the cluster's SSH keys and each node's config disk.
//!
//! The base image is the same for every node and every cluster; everything
//! that makes a node itself travels on a small ext4 disk (made with
//! `mkfs.ext4 -d`, no loop devices) that the guest applies at boot:
//! hostname, /etc/hosts, network files, SSH keys, and its role script.

use crate::fabric;
use crate::spec::{Cluster, Node, Role};
use anyhow::{Context, Result, bail};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Role scripts shipped to guests; `render.sh` and `common.sh` run before each.
const ROLE_SCRIPTS: &[(&str, &str)] = &[
    ("render", include_str!("../images/debian/roles/render.sh")),
    ("common", include_str!("../images/debian/roles/common.sh")),
    ("control", include_str!("../images/debian/roles/control.sh")),
    ("worker", include_str!("../images/debian/roles/worker.sh")),
    ("gateway", include_str!("../images/debian/roles/gateway.sh")),
    ("storage", include_str!("../images/debian/roles/storage.sh")),
];

/// The service configuration templates (`services/`), shipped to guests
/// under `/photon/services` and rendered there by `render.sh`. The NixOS
/// images render the same files (`nix/roles/services.nix`).
macro_rules! service_files {
    ($($name:literal),* $(,)?) => {
        &[$(($name, include_str!(concat!("../services/", $name)))),*]
    };
}
const SERVICE_FILES: &[(&str, &str)] = service_files![
    "bind/db.zone",
    "bind/options.conf",
    "bind/primary.conf",
    "bind/secondary.conf",
    "etcd/etcd.env",
    "haproxy/haproxy.cfg",
    "nginx/backend.conf",
    "nginx/gateway.conf",
    "prometheus/iam-web.yml",
    "prometheus/node-exporter-iam.flags",
    "prometheus/node-exporter.flags",
    "prometheus/prometheus.flags",
    "prometheus/prometheus.yml",
    "redis/redis.conf",
    "redis/replica.conf",
];

fn role_script(name: &str) -> &'static str {
    ROLE_SCRIPTS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
        .unwrap_or("")
}

/// The S3 service of storage nodes (the LightningStor part):
/// `photon-s3.service` runs s3s-fs on [`PORT`](s3::PORT)
/// (images/debian/customize.sh), with what node.env tells it.
pub mod s3 {
    /// The unit that serves S3: a node serves S3 when the cluster file
    /// expects this unit on it.
    pub const UNIT: &str = "photon-s3.service";
    pub const PORT: u16 = 9000;
    /// The access key id, the same in every cluster: it is a name, not a
    /// secret. The secret key is per cluster (`<state>/ssh/s3-secret`,
    /// redacted from the artifacts like the IAM secret).
    pub const ACCESS_KEY: &str = "photon";
    /// The buckets every S3 server of every cluster has. This list is the
    /// one place they are named: node.env carries it to the guests
    /// (`S3_BUCKETS`), where photon-s3.service creates each as a directory
    /// before the server starts, and the `s3_bench` check refuses, when the
    /// lane is read, a bucket that is not in it. A fixed list rather than a
    /// cluster-file field: the benchmark is the only client, and two checks
    /// sharing a bucket stay apart by key prefix (`s3-bench/<node>/`).
    pub const BUCKETS: &[&str] = &["photon-bench"];
}

/// The FlashDNS part's dynamic updates: the primary accepts RFC 2136
/// updates of the cluster's zone signed with this TSIG key
/// (services/bind/primary.conf, images/debian/roles/control.sh).
pub mod dns {
    /// The key's name, as bind knows it.
    pub const TSIG_KEY: &str = "photon-update";
    /// Where the per-cluster secret lives under `<state>/ssh/` (redacted
    /// from the artifacts). The guests take its 32 hex digits as the key's
    /// base64 text as it is, so the key is those digits base64-decoded.
    pub const TSIG_SECRET_FILE: &str = "dns-tsig-secret";
}

/// The volume every node with the export unit serves over NBD (the
/// coronafs part; photon-volume-export.service in images/debian/customize.sh
/// and nix/roles/volume-export.nix).
pub mod volume {
    use crate::spec::Cluster;

    pub const UNIT: &str = "photon-volume-export.service";
    pub const PORT: u16 = 10809;
    /// The export names the unit serves.
    pub const NAMES: &[&str] = &["vol0"];

    /// Refuses, when a lane is read, an `nbd://HOST:PORT/NAME` that names no
    /// volume of the cluster: HOST a node (or 127.0.0.1, the target itself)
    /// whose cluster file expects the export unit, PORT the export's, NAME
    /// one it serves. On a cluster whose nodes export volumes some other way
    /// (no node runs the unit), only the node is checked.
    pub fn check_uri(uri: &str, target: Option<&str>, cluster: &Cluster) -> Result<(), String> {
        let bad = |why: String| format!("volume {uri:?}: {why}");
        let rest = uri
            .strip_prefix("nbd://")
            .ok_or_else(|| bad("write nbd://<host>:<port>/<name>".into()))?;
        let (authority, name) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = authority.rsplit_once(':').unwrap_or((authority, "10809"));
        let node = match host {
            "127.0.0.1" | "localhost" => target.and_then(|t| cluster.node(t)),
            h => cluster
                .nodes
                .iter()
                .find(|n| n.name == h || n.address.to_string() == h),
        }
        .ok_or_else(|| bad(format!("{host} is no node of the cluster")))?;
        let ours = |n: &crate::spec::Node| n.runs(UNIT);
        if !cluster.nodes.iter().any(ours) {
            // Another provider's volumes (PhotonCloud's coronafs): only the
            // node can be checked.
            return Ok(());
        }
        if !ours(node) {
            return Err(bad(format!(
                "{} exports no volume (it does not run {UNIT})",
                node.name
            )));
        }
        if port != PORT.to_string() {
            return Err(bad(format!(
                "the export listens on port {PORT}, not {port}"
            )));
        }
        if !NAMES.contains(&name) {
            return Err(bad(format!(
                "{} has no volume {name:?} (it has: {})",
                node.name,
                NAMES.join(", ")
            )));
        }
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn only_volumes_the_cluster_serves_are_accepted() {
            let c = Cluster::profile("reference-storage").unwrap();
            let t = Some("storage-node02");
            assert!(check_uri("nbd://127.0.0.1:10809/vol0", t, &c).is_ok());
            assert!(check_uri("nbd://10.78.0.21:10809/vol0", t, &c).is_ok());
            let e = check_uri("nbd://10.78.0.21:10809/vol9", t, &c).unwrap_err();
            assert!(e.contains("has no volume \"vol9\""), "{e}");
            assert!(
                check_uri("nbd://10.78.0.99:10809/vol0", t, &c)
                    .unwrap_err()
                    .contains("no node")
            );
            assert!(
                check_uri("nbd://10.78.0.21:10810/vol0", t, &c)
                    .unwrap_err()
                    .contains("port")
            );
            let r = Cluster::profile("reference").unwrap();
            let e = check_uri("nbd://10.77.0.11:10809/vol0", t, &r).unwrap_err();
            assert!(e.contains("exports no volume"), "{e}");
        }
    }
}

/// The cluster's client key pair and shared secrets, made once per cluster.
pub struct ClusterKeys {
    pub private_key: PathBuf,
    pub public_key: String,
    pub iam_secret: String,
    /// The S3 servers' secret key (photon-s3.service, [`s3`]).
    pub s3_secret: String,
    /// The TSIG key that may update the cluster's zone on the primary DNS
    /// server (RFC 2136, [`dns`]).
    pub dns_tsig_secret: String,
}

pub fn cluster_keys(ssh_dir: &Path) -> Result<ClusterKeys> {
    fs::create_dir_all(ssh_dir)?;
    let private_key = ssh_dir.join("id_ed25519");
    if !private_key.exists() {
        keygen(&private_key, "photon-cluster")?;
    }
    Ok(ClusterKeys {
        public_key: fs::read_to_string(private_key.with_extension("pub"))?
            .trim()
            .to_string(),
        private_key,
        iam_secret: secret(&ssh_dir.join("iam-secret"))?,
        s3_secret: secret(&ssh_dir.join("s3-secret"))?,
        dns_tsig_secret: secret(&ssh_dir.join(dns::TSIG_SECRET_FILE))?,
    })
}

/// The random secret kept in `file` (mode 0600), made on first use.
/// [`crate::secrets::Secrets::load`] redacts each from the artifacts.
fn secret(file: &Path) -> Result<String> {
    if !file.exists() {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(file)?;
        std::io::Write::write_all(&mut f, random_hex(16).as_bytes())?;
    }
    // Also for a secret made by an older version with the default mode.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(file, fs::Permissions::from_mode(0o600))?;
    Ok(fs::read_to_string(file)?.trim().to_string())
}

fn random_hex(n: usize) -> String {
    use std::io::Read;
    let mut buf = vec![0u8; n];
    if let Ok(mut f) = fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut buf);
    }
    hex::encode(buf)
}

/// Generates an ed25519 key pair with OpenSSH's own ssh-keygen.
pub fn keygen(path: &Path, comment: &str) -> Result<()> {
    let _ = fs::remove_file(path);
    let _ = fs::remove_file(path.with_extension("pub"));
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .output()
        .context("running ssh-keygen (install openssh-client)")?;
    if !out.status.success() {
        bail!(
            "ssh-keygen failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn names_with_role(cluster: &Cluster, role: Role) -> String {
    cluster
        .with_role(role)
        .map(|n| n.name.as_str())
        .collect::<Vec<_>>()
        .join(" ")
}

/// node.env: the facts the guest-side scripts need, as shell assignments.
pub fn node_env(cluster: &Cluster, node: &Node, keys: &ClusterKeys) -> String {
    let all: Vec<&str> = cluster.nodes.iter().map(|n| n.name.as_str()).collect();
    let vars = [
        ("CLUSTER_NAME", cluster.name.clone()),
        ("NODE_NAME", node.name.clone()),
        ("NODE_ROLE", node.role.name().to_string()),
        ("NODE_ADDR", node.address.to_string()),
        ("DOMAIN", cluster.network.domain.clone()),
        ("ALL_NODES", all.join(" ")),
        ("CONTROL_NODES", names_with_role(cluster, Role::Control)),
        ("WORKER_NODES", names_with_role(cluster, Role::Worker)),
        ("GATEWAY_NODES", names_with_role(cluster, Role::Gateway)),
        ("STORAGE_NODES", names_with_role(cluster, Role::Storage)),
        ("IAM_SECRET", keys.iam_secret.clone()),
        ("S3_ACCESS_KEY", s3::ACCESS_KEY.to_string()),
        ("S3_SECRET", keys.s3_secret.clone()),
        ("S3_BUCKETS", s3::BUCKETS.join(" ")),
        ("DNS_TSIG_SECRET", keys.dns_tsig_secret.clone()),
    ];
    vars.iter()
        .map(|(k, v)| format!("{k}='{}'\n", v.replace('\'', "")))
        .collect()
}

/// Writes the node's config tree under `dir/config` and packs it into
/// `dir/config.img`. Returns the node's SSH host public key line.
pub fn config_disk(
    cluster: &Cluster,
    index: usize,
    node: &Node,
    keys: &ClusterKeys,
    dir: &Path,
) -> Result<String> {
    let tree = dir.join("config");
    let _ = fs::remove_dir_all(&tree);
    fs::create_dir_all(tree.join("network"))?;
    fs::write(tree.join("node.env"), node_env(cluster, node, keys))?;
    fs::write(tree.join("hosts"), fabric::hosts_file(cluster))?;
    fs::write(
        tree.join("authorized_keys"),
        format!("{}\n", keys.public_key),
    )?;
    for (name, text) in fabric::network_files(cluster, index, node) {
        fs::write(tree.join("network").join(name), text)?;
    }
    let role = node.role.name();
    let script = format!(
        "set -eu\n. /photon/node.env\n{}\n{}\n{}\n",
        role_script("render"),
        role_script("common"),
        role_script(role)
    );
    fs::write(tree.join("role.sh"), script)?;
    for (name, text) in SERVICE_FILES {
        let path = tree.join("services").join(name);
        fs::create_dir_all(path.parent().expect("services/<dir>/<file>"))?;
        fs::write(path, text)?;
    }
    let host_key = tree.join("ssh_host_ed25519_key");
    keygen(&host_key, &format!("root@{}", node.name))?;
    let image = dir.join("config.img");
    let _ = fs::remove_file(&image);
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "photon-config", "-d"])
        .arg(&tree)
        .arg(&image)
        .arg("8M")
        .output()
        .context("running mkfs.ext4 (install e2fsprogs)")?;
    if !out.status.success() {
        bail!(
            "mkfs.ext4 for {} failed: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(fs::read_to_string(host_key.with_extension("pub"))?
        .trim()
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_env_lists_peers_by_role() {
        let c = Cluster::profile("reference").unwrap();
        let keys = ClusterKeys {
            private_key: "/k".into(),
            public_key: "ssh-ed25519 AAA".into(),
            iam_secret: "s3cret".into(),
            s3_secret: "0123456789abcdef".into(),
            dns_tsig_secret: "00112233445566778899aabbccddeeff".into(),
        };
        let env = node_env(&c, c.node("node04").unwrap(), &keys);
        assert!(env.contains("NODE_NAME='node04'\n"));
        assert!(env.contains("S3_SECRET='0123456789abcdef'\n"));
        assert!(env.contains("S3_ACCESS_KEY='photon'\n"));
        assert!(env.contains("S3_BUCKETS='photon-bench'\n"));
        assert!(env.contains("DNS_TSIG_SECRET='00112233445566778899aabbccddeeff'\n"));
        assert!(env.contains("NODE_ROLE='worker'\n"));
        assert!(env.contains("CONTROL_NODES='node01 node02 node03'\n"));
        assert!(env.contains("GATEWAY_NODES='node06'\n"));
    }

    #[test]
    fn cluster_secrets_are_made_once_private_and_distinct() {
        let tmp = tempfile::tempdir().unwrap();
        let a = cluster_keys(tmp.path()).unwrap();
        let b = cluster_keys(tmp.path()).unwrap();
        assert_eq!((&a.iam_secret, &a.s3_secret), (&b.iam_secret, &b.s3_secret));
        assert_eq!(a.s3_secret.len(), 32);
        assert_ne!(a.iam_secret, a.s3_secret);
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(tmp.path().join("s3-secret"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    /// A bucket name must be a directory name s3s-fs serves and a word the
    /// unit's shell loop splits on.
    #[test]
    fn s3_buckets_are_valid_bucket_names() {
        for b in s3::BUCKETS {
            assert!((3..=63).contains(&b.len()), "{b}");
            assert!(
                b.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-'),
                "{b}"
            );
        }
        assert!(include_str!("../images/debian/customize.sh").contains(s3::UNIT));
        assert!(include_str!("../images/debian/roles/storage.sh").contains(s3::UNIT));
    }

    #[test]
    fn every_service_file_is_shipped() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("services");
        let mut found = Vec::new();
        for sub in fs::read_dir(&dir).unwrap() {
            let sub = sub.unwrap().path();
            if sub.is_dir() {
                for f in fs::read_dir(&sub).unwrap() {
                    let f = f.unwrap().path();
                    let name = f.strip_prefix(&dir).unwrap().to_str().unwrap().to_string();
                    found.push((name, fs::read_to_string(&f).unwrap()));
                }
            }
        }
        found.sort();
        let shipped: Vec<(String, String)> = SERVICE_FILES
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect();
        assert_eq!(
            found, shipped,
            "SERVICE_FILES must list every file under services/<dir>/"
        );
    }

    #[test]
    fn every_role_has_a_script() {
        for role in crate::spec::Role::ALL {
            assert!(
                !role_script(role.name()).is_empty(),
                "no script for role {role}"
            );
        }
    }
}
