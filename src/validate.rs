//! `validate`: a preflight that boots nothing. Each item passes, fails, or
//! is degraded (works, but not at full strength), and every item that is
//! not a pass says how to fix it.

use crate::check::Outcome;
use crate::host::has_program;
use crate::lane::Lane;
use crate::spec::Cluster;
use crate::state::StateDir;
use crate::{fabric, image};
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Clone, Serialize)]
pub struct Item {
    pub item: String,
    pub outcome: Outcome,
    pub detail: String,
    pub hint: Option<String>,
}

fn item(name: &str, outcome: Outcome, detail: impl Into<String>, hint: Option<&str>) -> Item {
    Item {
        item: name.into(),
        outcome,
        detail: detail.into(),
        hint: hint.map(str::to_string),
    }
}

const DEPS_HINT: &str = "run `bash scripts/host-deps.sh` (installs the Debian packages)";

pub fn run(cluster: &Cluster, state: &StateDir, lane: &Lane) -> Vec<Item> {
    let mut items = Vec::new();
    for (program, package) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("qemu-img", "qemu-utils"),
        ("ssh-keygen", "openssh-client"),
    ] {
        items.push(if has_program(program) {
            item(program, Outcome::Pass, "installed", None)
        } else {
            item(
                program,
                Outcome::Fail,
                format!("missing (Debian package {package})"),
                Some(DEPS_HINT),
            )
        });
    }
    let img = image::resolve(cluster, state);
    items.push(kvm(state, img.as_ref().ok().map(|i| i.kernel.as_path())));
    items.push(nested());
    items.push(memory(cluster));
    items.push(disk(cluster, state, img.is_ok()));
    items.push(match fabric::allocate_ports(cluster) {
        Ok(p) => item(
            "ports",
            Outcome::Pass,
            format!(
                "{} host ports free",
                p.values().map(|n| n.all().len()).sum::<usize>()
            ),
            None,
        ),
        Err(e) => item(
            "ports",
            Outcome::Fail,
            format!("{e:#}"),
            Some("free the port or change `host` in the cluster file"),
        ),
    });
    items.push(item(
        "cluster",
        Outcome::Pass,
        format!(
            "{}: {} nodes",
            cluster.source.display(),
            cluster.nodes.len()
        ),
        None,
    ));
    items.push(item(
        "lane",
        Outcome::Pass,
        format!(
            "{} ({}): {} checks in {} layers",
            lane.name,
            lane.source.display(),
            lane.check_count(),
            lane.layers.len()
        ),
        None,
    ));
    items.push(match img {
        Ok(i) => item(
            "image",
            Outcome::Pass,
            format!("{} image {} built", i.provider, i.id),
            None,
        ),
        Err(e)
            if matches!(cluster.image, crate::spec::ImageSource::Debian { .. })
                && has_program("mmdebstrap") =>
        {
            item(
                "image",
                Outcome::Degraded,
                format!("{e:#}"),
                Some("`photon-cluster build` builds it; `fresh-smoke` builds it for you"),
            )
        }
        Err(e) => item("image", Outcome::Fail, format!("{e:#}"), Some(DEPS_HINT)),
    });
    items.push(match state.load_running() {
        Ok(Some(r)) => item(
            "state",
            Outcome::Degraded,
            format!("cluster {} is running in {}", r.name, state.root),
            Some("`start` will refuse; `smoke` runs against it; `fresh-smoke` stops and cleans it first"),
        ),
        Ok(None) => item("state", Outcome::Pass, format!("{} is free", state.root), None),
        Err(e) => item("state", Outcome::Fail, format!("{e:#}"), Some("remove the damaged state with `photon-cluster clean`")),
    });
    items
}

/// Whether guests will really run under KVM. An openable /dev/kvm is not
/// enough (on some hosts every KVM guest hangs after the firmware), so this
/// runs the same probe `start` runs, cached per host boot, and says pass
/// only when a KVM guest printed its kernel banner.
fn kvm(state: &StateDir, kernel: Option<&Path>) -> Item {
    let hint = Some(
        "guests will run under TCG (slow but real); to use KVM, enable virtualization for this host",
    );
    let dev = Path::new("/dev/kvm");
    if !dev.exists() {
        return item("kvm", Outcome::Degraded, "/dev/kvm is absent", hint);
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .is_err()
    {
        return item(
            "kvm",
            Outcome::Degraded,
            "/dev/kvm is not writable by this user",
            Some("add the user to the kvm group"),
        );
    }
    let cache = state.accel_probe();
    let probe = match (crate::machine::accel::cached(cache.as_std_path()), kernel) {
        (Some(p), _) => Ok(p),
        (None, Some(kernel)) => crate::machine::accel::probe_cached(
            kernel,
            cache.as_std_path(),
            state.root.join("probe").as_std_path(),
        ),
        (None, None) => {
            return item(
                "kvm",
                Outcome::Degraded,
                "/dev/kvm opens, but no KVM guest has been tried: the probe needs the image's kernel",
                Some(
                    "run `photon-cluster build`, then `validate` again; `start` probes before relying on KVM",
                ),
            );
        }
    };
    match probe {
        Ok(p) if !p.kvm_usable => item(
            "kvm",
            Outcome::Degraded,
            format!(
                "/dev/kvm exists but a KVM guest failed in this host boot: {}",
                p.reason.unwrap_or_default()
            ),
            hint,
        ),
        Ok(_) => item(
            "kvm",
            Outcome::Pass,
            "a KVM guest booted in this host boot",
            None,
        ),
        Err(e) => item(
            "kvm",
            Outcome::Degraded,
            format!("the KVM probe could not run: {e:#}"),
            hint,
        ),
    }
}

fn nested() -> Item {
    for module in ["kvm_intel", "kvm_amd"] {
        if let Ok(v) = std::fs::read_to_string(format!("/sys/module/{module}/parameters/nested")) {
            let on = matches!(v.trim(), "Y" | "y" | "1");
            return if on {
                item(
                    "nested-virt",
                    Outcome::Pass,
                    format!("{module} nested={}", v.trim()),
                    None,
                )
            } else {
                item(
                    "nested-virt",
                    Outcome::Degraded,
                    format!("{module} nested={}", v.trim()),
                    Some(
                        "`modprobe -r {module}; modprobe {module} nested=1`; until then the nested layer reports degraded",
                    ),
                )
            };
        }
    }
    item(
        "nested-virt",
        Outcome::Degraded,
        "no kvm_intel or kvm_amd module: no nested virtualization",
        Some("the nested layer will boot its inner guests under TCG and report degraded"),
    )
}

fn memory(cluster: &Cluster) -> Item {
    let need: u64 = cluster
        .nodes
        .iter()
        .map(|n| n.memory_mib as u64 + 128)
        .sum();
    let avail = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(0);
    let detail = format!("{avail} MiB available, the cluster needs about {need} MiB");
    if avail >= need {
        item("memory", Outcome::Pass, detail, None)
    } else {
        item(
            "memory",
            Outcome::Fail,
            detail,
            Some("lower memory_mib in the cluster file or free memory"),
        )
    }
}

fn disk(cluster: &Cluster, state: &StateDir, image_built: bool) -> Item {
    let mut probe = state.root.as_std_path();
    while !probe.exists() {
        probe = probe.parent().unwrap_or(Path::new("/"));
    }
    let free_mib = nix::sys::statvfs::statvfs(probe)
        .map(|s| s.blocks_available() * s.fragment_size() / (1024 * 1024))
        .unwrap_or(0);
    // Overlays grow to a few hundred MiB per node; a Debian image build needs a few GiB.
    let need = cluster.nodes.len() as u64 * 512 + if image_built { 0 } else { 6144 };
    let detail = format!(
        "{free_mib} MiB free under {}, about {need} MiB needed",
        probe.display()
    );
    if free_mib >= need {
        item("disk", Outcome::Pass, detail, None)
    } else {
        item(
            "disk",
            Outcome::Fail,
            detail,
            Some("free space or point --state-dir / PHOTON_VM_DIR elsewhere"),
        )
    }
}

pub fn print(items: &[Item]) {
    println!("{:<20} {:<9} detail", "item", "outcome");
    for i in items {
        println!("{:<20} {:<9} {}", i.item, i.outcome.name(), i.detail);
        if let Some(h) = &i.hint {
            println!("{:<20} {:<9} hint: {h}", "", "");
        }
    }
}
