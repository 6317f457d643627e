//! Reading a cluster file: the TOML as written (with serde spans), its
//! validation, and the typed model handed on. Every refusal names the file,
//! the line and the field, so a user can jump straight to the mistake:
//! `cluster.toml:42:8: node[3].role: unknown role ...`.

use super::{ChannelKind, Cluster, Forward, ImageSource, Network, Node, Proto, Role, Subnet};
use crate::error::SpecError;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml::Spanned;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterSpec {
    cluster: ClusterMeta,
    image: ImageSpec,
    network: NetworkSpec,
    #[serde(rename = "node", default)]
    nodes: Vec<NodeSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterMeta {
    name: String,
    /// Appended as `-<suffix>` to the state directory; empty for the default.
    #[serde(default)]
    state_suffix: String,
    /// `agent` (default: the guest agent's channel where it answers) or `ssh`.
    #[serde(default)]
    channel: ChannelKind,
}

/// Where the images come from. `provider = "debian"` builds them here
/// (`suite`, default bookworm); `provider = "prebuilt"` names the files, or
/// an image directory (`dir`) with `<node>/` subdirectories (image::dir).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageSpec {
    provider: Spanned<String>,
    suite: Option<String>,
    kernel: Option<Spanned<PathBuf>>,
    initrd: Option<Spanned<PathBuf>>,
    rootfs: Option<Spanned<PathBuf>>,
    /// `prebuilt`: a directory of images instead of kernel/initrd/rootfs.
    dir: Option<Spanned<PathBuf>>,
    /// `nix`: the flake (default ".") and the attribute set of per-node
    /// images (default "nodeImages"): `<flake>#<attribute>.<node>`.
    flake: Option<String>,
    attribute: Option<String>,
}

impl ImageSpec {
    /// Call only on a validated spec.
    fn source(&self) -> ImageSource {
        let path = |p: &Option<Spanned<PathBuf>>| {
            p.as_ref().map(|p| p.get_ref().clone()).unwrap_or_default()
        };
        match self.provider.get_ref().as_str() {
            "prebuilt" if self.dir.is_some() => ImageSource::PrebuiltDir {
                dir: path(&self.dir),
            },
            "prebuilt" => ImageSource::Prebuilt {
                kernel: path(&self.kernel),
                initrd: path(&self.initrd),
                rootfs: path(&self.rootfs),
            },
            "nix" => ImageSource::Nix {
                flake: self.flake.clone().unwrap_or_else(|| ".".into()),
                attribute: self
                    .attribute
                    .clone()
                    .unwrap_or_else(|| "nodeImages".into()),
            },
            _ => ImageSource::Debian {
                suite: self.suite.clone().unwrap_or_else(|| "bookworm".into()),
            },
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkSpec {
    subnet: Spanned<String>,
    domain: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeSpec {
    name: Spanned<String>,
    role: Spanned<String>,
    address: Spanned<Ipv4Addr>,
    #[serde(default = "crate::spec::default::u32::<1024>")]
    memory_mib: u32,
    #[serde(default = "crate::spec::default::u32::<1>")]
    vcpus: u32,
    #[serde(default)]
    depends_on: Vec<Spanned<String>>,
    /// systemd units that must be active before the node counts as ready.
    #[serde(default)]
    units: Vec<String>,
    #[serde(default)]
    forward: Vec<Spanned<Forward>>,
}

// The type itself is declared in `error` (see there why); how it is built
// from a file's text stays here, with the reading it points into.
impl SpecError {
    /// An error at byte range `span` of `text`, which was read from `file`.
    pub fn at(
        file: &Path,
        text: &str,
        span: Option<Range<usize>>,
        field: &str,
        message: String,
    ) -> SpecError {
        let (line, column) = span.map(|s| line_col(text, s.start)).unwrap_or((1, 1));
        SpecError {
            file: file.to_path_buf(),
            line,
            column,
            field: field.to_string(),
            message,
        }
    }

    /// A toml parse error, with the offending key as the field.
    pub fn from_toml(file: &Path, text: &str, e: &toml::de::Error) -> SpecError {
        let msg = e.message().to_string();
        SpecError::at(file, text, e.span(), &field_of_message(&msg), msg)
    }
}

/// Parses and validates `text`, which was read from `file`.
pub fn parse(file: &Path, text: &str) -> Result<Cluster, SpecError> {
    let at = |span: Option<Range<usize>>, field: &str, message: String| {
        SpecError::at(file, text, span, field, message)
    };
    let spec: ClusterSpec =
        toml::from_str(text).map_err(|e| SpecError::from_toml(file, text, &e))?;
    let subnet = validate(&spec, &at)?;
    Ok(Cluster {
        source: file.to_path_buf(),
        name: spec.cluster.name,
        state_suffix: spec.cluster.state_suffix,
        channel: spec.cluster.channel,
        image: spec.image.source(),
        network: Network {
            subnet,
            domain: spec.network.domain,
        },
        nodes: spec
            .nodes
            .into_iter()
            .map(|n| Node {
                role: Role::parse(n.role.get_ref()).expect("validated"),
                name: n.name.into_inner(),
                address: n.address.into_inner(),
                memory_mib: n.memory_mib,
                vcpus: n.vcpus,
                depends_on: n.depends_on.into_iter().map(Spanned::into_inner).collect(),
                units: n.units,
                forwards: n.forward.into_iter().map(Spanned::into_inner).collect(),
            })
            .collect(),
    })
}

/// The toml crate's messages name the offending key in backticks; surface it
/// as the field so the error always has one.
fn field_of_message(msg: &str) -> String {
    msg.split('`')
        .nth(1)
        .map(str::to_string)
        .unwrap_or_else(|| "document".to_string())
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, column)
}

type At<'a> = dyn Fn(Option<Range<usize>>, &str, String) -> SpecError + 'a;

/// Validates the definition; returns its subnet.
fn validate(spec: &ClusterSpec, at: &At) -> Result<Subnet, SpecError> {
    if spec.nodes.is_empty() {
        return Err(at(None, "node", "the cluster defines no [[node]]".into()));
    }
    let subnet = Subnet::parse(spec.network.subnet.get_ref()).ok_or_else(|| {
        at(
            Some(spec.network.subnet.span()),
            "network.subnet",
            format!(
                "{:?} is not an IPv4 subnet like \"10.77.0.0/24\"",
                spec.network.subnet.get_ref()
            ),
        )
    })?;
    validate_image(&spec.image, at)?;

    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut addresses: HashMap<Ipv4Addr, &str> = HashMap::new();
    let mut host_ports: HashMap<(Proto, u16), String> = HashMap::new();
    for (i, node) in spec.nodes.iter().enumerate() {
        let name = node.name.get_ref().as_str();
        let field = |f: &str| format!("node[{i}].{f}");
        if !valid_hostname(name) {
            return Err(at(
                Some(node.name.span()),
                &field("name"),
                format!("{name:?} is not a valid host name (letters, digits and '-')"),
            ));
        }
        if super::RESERVED.contains(&name) {
            return Err(at(
                Some(node.name.span()),
                &field("name"),
                format!(
                    "{name:?} is a name the state directory uses itself ({}); \
                     choose another node name",
                    super::RESERVED.join(", ")
                ),
            ));
        }
        if let Some(first) = names.insert(name, i) {
            return Err(at(
                Some(node.name.span()),
                &field("name"),
                format!("duplicate node {name:?}: node[{first}] already has that name"),
            ));
        }
        if Role::parse(node.role.get_ref()).is_none() {
            return Err(at(
                Some(node.role.span()),
                &field("role"),
                format!(
                    "unknown role {:?} (expected one of: {})",
                    node.role.get_ref(),
                    Role::ALL.map(Role::name).join(", ")
                ),
            ));
        }
        let addr = *node.address.get_ref();
        if !subnet.contains(addr) {
            return Err(at(
                Some(node.address.span()),
                &field("address"),
                format!("{addr} is outside network.subnet {subnet}"),
            ));
        }
        if let Some(other) = addresses.insert(addr, name) {
            return Err(at(
                Some(node.address.span()),
                &field("address"),
                format!("address {addr} is already used by {other}"),
            ));
        }
        if node.memory_mib < 256 {
            return Err(at(
                Some(node.name.span()),
                &field("memory_mib"),
                format!(
                    "{} MiB is too little for systemd; use 256 or more",
                    node.memory_mib
                ),
            ));
        }
        if node.vcpus == 0 {
            return Err(at(
                Some(node.name.span()),
                &field("vcpus"),
                "must be at least 1".into(),
            ));
        }
        let mut guest_ports: HashMap<(Proto, u16), &str> = HashMap::new();
        for (j, fwd) in node.forward.iter().enumerate() {
            let f = fwd.get_ref();
            if f.guest == 22 && f.proto == Proto::Tcp {
                return Err(at(
                    Some(fwd.span()),
                    &field(&format!("forward[{j}].guest")),
                    "port 22 is always forwarded for SSH; remove this entry".into(),
                ));
            }
            if let Some(other) = guest_ports.insert((f.proto, f.guest), &f.name) {
                return Err(at(
                    Some(fwd.span()),
                    &field(&format!("forward[{j}].guest")),
                    format!(
                        "port clash: guest port {}/{} is already forwarded as {other:?}",
                        f.guest,
                        f.proto.name()
                    ),
                ));
            }
            if let Some(h) = f.host {
                let owner = format!("{name}/{}", f.name);
                if let Some(other) = host_ports.insert((f.proto, h), owner) {
                    return Err(at(
                        Some(fwd.span()),
                        &field(&format!("forward[{j}].host")),
                        format!(
                            "port clash: host port {h}/{} is already taken by {other}",
                            f.proto.name()
                        ),
                    ));
                }
            }
        }
    }
    for (i, node) in spec.nodes.iter().enumerate() {
        for (j, dep) in node.depends_on.iter().enumerate() {
            if !names.contains_key(dep.get_ref().as_str()) {
                return Err(at(
                    Some(dep.span()),
                    &format!("node[{i}].depends_on[{j}]"),
                    format!("unknown node {:?}", dep.get_ref()),
                ));
            }
        }
    }
    if let Some(cycle) = find_cycle(spec) {
        let (i, j) = cycle.1;
        return Err(at(
            Some(spec.nodes[i].depends_on[j].span()),
            &format!("node[{i}].depends_on[{j}]"),
            format!("dependency cycle: {}", cycle.0.join(" -> ")),
        ));
    }
    Ok(subnet)
}

fn validate_image(image: &ImageSpec, at: &At) -> Result<(), SpecError> {
    match image.provider.get_ref().as_str() {
        "debian" | "nix" => Ok(()),
        "prebuilt" if image.dir.is_some() => {
            let dir = image.dir.as_ref().expect("checked");
            if image.kernel.is_some() || image.initrd.is_some() || image.rootfs.is_some() {
                return Err(at(
                    Some(dir.span()),
                    "image.dir",
                    "give either dir or kernel/initrd/rootfs, not both".into(),
                ));
            }
            if !dir.get_ref().is_dir() {
                return Err(at(
                    Some(dir.span()),
                    "image.dir",
                    format!(
                        "missing image: {} is not a directory",
                        dir.get_ref().display()
                    ),
                ));
            }
            Ok(())
        }
        "prebuilt" => {
            for (field, p) in [
                ("image.kernel", &image.kernel),
                ("image.initrd", &image.initrd),
                ("image.rootfs", &image.rootfs),
            ] {
                let Some(p) = p else {
                    return Err(at(
                        Some(image.provider.span()),
                        field,
                        "the prebuilt provider needs kernel, initrd and rootfs paths, or dir"
                            .into(),
                    ));
                };
                if !p.get_ref().is_file() {
                    return Err(at(
                        Some(p.span()),
                        field,
                        format!("missing image: {} does not exist", p.get_ref().display()),
                    ));
                }
            }
            Ok(())
        }
        other => Err(at(
            Some(image.provider.span()),
            "image.provider",
            format!("unknown image provider {other:?} (expected debian, prebuilt or nix)"),
        )),
    }
}

/// Finds a dependency cycle, returning its path and the edge that closes it.
fn find_cycle(spec: &ClusterSpec) -> Option<(Vec<String>, (usize, usize))> {
    let index: BTreeMap<&str, usize> = spec
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.get_ref().as_str(), i))
        .collect();
    // 0 = unvisited, 1 = on the current path, 2 = finished.
    let mut mark = vec![0u8; spec.nodes.len()];
    fn dfs(
        i: usize,
        spec: &ClusterSpec,
        index: &BTreeMap<&str, usize>,
        mark: &mut [u8],
        path: &mut Vec<usize>,
    ) -> Option<(Vec<String>, (usize, usize))> {
        mark[i] = 1;
        path.push(i);
        for (j, dep) in spec.nodes[i].depends_on.iter().enumerate() {
            let d = index[dep.get_ref().as_str()];
            if mark[d] == 1 {
                let start = path.iter().position(|&p| p == d).unwrap_or(0);
                let mut names: Vec<String> = path[start..]
                    .iter()
                    .map(|&p| spec.nodes[p].name.get_ref().clone())
                    .collect();
                names.push(spec.nodes[d].name.get_ref().clone());
                return Some((names, (i, j)));
            }
            if mark[d] == 0
                && let Some(c) = dfs(d, spec, index, mark, path)
            {
                return Some(c);
            }
        }
        path.pop();
        mark[i] = 2;
        None
    }
    for i in 0..spec.nodes.len() {
        if mark[i] == 0
            && let Some(c) = dfs(i, spec, &index, &mut mark, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !name.starts_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refuse(text: &str) -> SpecError {
        parse(Path::new("c.toml"), text).expect_err("definition should be refused")
    }

    const HEAD: &str = r#"[cluster]
name = "t"
[image]
provider = "debian"
suite = "bookworm"
[network]
subnet = "10.9.0.0/24"
domain = "t.test"
"#;

    fn node(name: &str, role: &str, addr: &str, extra: &str) -> String {
        format!("[[node]]\nname = \"{name}\"\nrole = \"{role}\"\naddress = \"{addr}\"\n{extra}\n")
    }

    #[test]
    fn unknown_role_names_line_and_field() {
        let text = format!(
            "{HEAD}{}{}",
            node("a", "control", "10.9.0.1", ""),
            node("b", "gatewy", "10.9.0.2", "")
        );
        let e = refuse(&text);
        assert_eq!(e.field, "node[1].role");
        assert_eq!(e.line, 16);
        assert!(e.message.contains("unknown role \"gatewy\""), "{e}");
        assert!(e.to_string().starts_with("c.toml:16:"), "{e}");
    }

    #[test]
    fn the_channel_is_the_agent_unless_ssh_is_asked_for() {
        let one = node("a", "control", "10.9.0.1", "");
        let c = parse(Path::new("c.toml"), &format!("{HEAD}{one}")).unwrap();
        assert_eq!(c.channel, ChannelKind::Agent);
        let asked = HEAD.replace("name = \"t\"\n", "name = \"t\"\nchannel = \"ssh\"\n");
        let c = parse(Path::new("c.toml"), &format!("{asked}{one}")).unwrap();
        assert_eq!(c.channel, ChannelKind::Ssh);
        let bad = HEAD.replace("name = \"t\"\n", "name = \"t\"\nchannel = \"vsock\"\n");
        let e = refuse(&format!("{bad}{one}"));
        assert!(e.to_string().starts_with("c.toml:3:"), "{e}");
        assert!(e.to_string().contains("vsock"), "{e}");
    }

    #[test]
    fn duplicate_node_is_refused() {
        let text = format!(
            "{HEAD}{}{}",
            node("a", "control", "10.9.0.1", ""),
            node("a", "worker", "10.9.0.2", "")
        );
        let e = refuse(&text);
        assert_eq!(e.field, "node[1].name");
        assert!(e.message.contains("duplicate node"), "{e}");
    }

    #[test]
    fn a_node_named_like_a_state_entry_is_refused() {
        let text = format!("{HEAD}{}", node("snapshots", "control", "10.9.0.1", ""));
        let e = refuse(&text);
        assert_eq!(e.field, "node[0].name");
        assert!(e.message.contains("state directory uses itself"), "{e}");
    }

    #[test]
    fn host_port_clash_is_refused() {
        let text = format!(
            "{HEAD}{}{}",
            node(
                "a",
                "control",
                "10.9.0.1",
                "forward = [{ name = \"x\", guest = 80, host = 18080 }]"
            ),
            node(
                "b",
                "worker",
                "10.9.0.2",
                "forward = [{ name = \"y\", guest = 81, host = 18080 }]"
            )
        );
        let e = refuse(&text);
        assert_eq!(e.field, "node[1].forward[0].host");
        assert!(e.message.contains("port clash"), "{e}");
        assert_eq!(e.line, 18);
    }

    #[test]
    fn dependency_cycle_is_refused_with_its_path() {
        let text = format!(
            "{HEAD}{}{}{}",
            node("a", "control", "10.9.0.1", "depends_on = [\"c\"]"),
            node("b", "worker", "10.9.0.2", "depends_on = [\"a\"]"),
            node("c", "worker", "10.9.0.3", "depends_on = [\"b\"]")
        );
        let e = refuse(&text);
        assert!(
            e.message.contains("dependency cycle: a -> c -> b -> a"),
            "{e}"
        );
    }

    #[test]
    fn unknown_dependency_is_refused() {
        let text = format!(
            "{HEAD}{}",
            node("a", "control", "10.9.0.1", "depends_on = [\"zz\"]")
        );
        assert!(refuse(&text).message.contains("unknown node \"zz\""));
    }

    #[test]
    fn missing_prebuilt_image_is_refused() {
        let text = HEAD.replace(
            "provider = \"debian\"\nsuite = \"bookworm\"",
            "provider = \"prebuilt\"\nkernel = \"/nonexistent/vmlinuz\"\ninitrd = \"/nonexistent/initrd\"\nrootfs = \"/nonexistent/root.img\"",
        ) + &node("a", "control", "10.9.0.1", "");
        let e = refuse(&text);
        assert_eq!(e.field, "image.kernel");
        assert!(e.message.contains("missing image"), "{e}");
        assert_eq!(e.line, 5);
    }

    #[test]
    fn syntax_and_unknown_fields_point_at_the_line() {
        let text = format!(
            "{HEAD}{}",
            node("a", "control", "10.9.0.1", "memroy_mib = 4")
        );
        let e = refuse(&text);
        assert_eq!(e.line, 13, "{e}");
        assert!(e.message.contains("memroy_mib"), "{e}");
    }

    #[test]
    fn address_outside_subnet_is_refused() {
        let text = format!("{HEAD}{}", node("a", "control", "10.8.0.1", ""));
        assert_eq!(refuse(&text).field, "node[0].address");
    }
}
