//! The `nix` image provider: one image per node, `<flake>#<attribute>.<node>`,
//! all built by a single `nix build --json`. Each output is a directory with
//! `vmlinuz`, `initrd.img`, `rootfs.img` and optionally `cmdline` (extra
//! kernel arguments, such as NixOS' `init=`). The store paths and .drv files
//! are parsed with the nix-derivation crate, and the record, with every
//! node's store and .drv path, is kept in `<state>/images/nix-<cluster>.json`
//! so `start` and `status` use the same build.

use crate::error::bad_input;
use crate::files::write_atomic;
use crate::spec::Cluster;
use crate::state::{ImageRecord, NodeImage, StateDir};
use anyhow::{Context, Result, anyhow, bail};
use nix_derivation::{Derivation, StorePath};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One entry of `nix build --json`.
#[derive(Debug, Deserialize)]
struct Built {
    #[serde(rename = "drvPath")]
    drv_path: String,
    outputs: BTreeMap<String, String>,
}

fn record_file(cluster: &Cluster, state: &StateDir) -> PathBuf {
    state
        .images()
        .join(format!("nix-{}.json", cluster.name))
        .into()
}

fn nodes(cluster: &Cluster) -> Vec<String> {
    cluster.nodes.iter().map(|n| n.name.clone()).collect()
}

/// Builds every node's image in one `nix build` and records the result.
pub fn build(
    cluster: &Cluster,
    state: &StateDir,
    flake: &str,
    attribute: &str,
) -> Result<ImageRecord> {
    crate::host::require_program("nix", "nix-bin")?;
    let nodes = nodes(cluster);
    let flake = flake_ref(cluster, flake);
    let installables: Vec<String> = nodes
        .iter()
        .map(|n| format!("{flake}#{attribute}.{n}"))
        .collect();
    tracing::info!("image: nix build --json {}", installables.join(" "));
    let out = Command::new("nix")
        .args(["--extra-experimental-features", "nix-command flakes"])
        .args(["build", "--json", "--no-link"])
        .args(&installables)
        .output()
        .context("running nix build")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!(
            "nix build failed ({}): {}",
            out.status,
            crate::text::tail(&err, 20)
        );
    }
    let built: Vec<Built> =
        serde_json::from_slice(&out.stdout).context("parsing the output of nix build --json")?;
    if built.len() != nodes.len() {
        bail!(
            "nix build returned {} results for {} nodes",
            built.len(),
            nodes.len()
        );
    }
    let mut images = BTreeMap::new();
    for (node, b) in nodes.iter().zip(&built) {
        let out = b
            .outputs
            .get("out")
            .ok_or_else(|| anyhow!("{node}: the derivation has no `out` output"))?;
        images.insert(node.clone(), node_image(node, &b.drv_path, out)?);
    }
    let record = record(images)?;
    std::fs::create_dir_all(state.images())?;
    write_atomic(
        &record_file(cluster, state),
        serde_json::to_string_pretty(&record)?.as_bytes(),
    )?;
    Ok(record)
}

/// A relative flake path (`.`, `./x`, `../x`) is relative to the cluster
/// file, so a cluster file next to its flake works from any directory.
fn flake_ref(cluster: &Cluster, flake: &str) -> String {
    let relative = flake == "." || flake.starts_with("./") || flake.starts_with("../");
    match cluster.source.parent() {
        Some(dir) if relative && dir.is_dir() => {
            let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
            format!("path:{}", dir.join(flake).display())
        }
        _ => flake.to_string(),
    }
}

/// The recorded build, if its store paths are all still there.
pub fn find(
    cluster: &Cluster,
    state: &StateDir,
    flake: &str,
    attribute: &str,
) -> Result<ImageRecord> {
    let missing = || {
        crate::error::named(
            crate::error::ErrorKind::ImageMissing,
            bad_input(format!(
                "missing image: no nix build of {flake}#{attribute} is recorded in {}; \
             run `photon-cluster build` first",
                state.images()
            )),
        )
    };
    let bytes = std::fs::read(record_file(cluster, state)).map_err(|_| missing())?;
    let record: ImageRecord = serde_json::from_slice(&bytes).map_err(|_| missing())?;
    let complete = nodes(cluster).iter().all(|n| {
        record.nodes.get(n).is_some_and(|i| {
            i.kernel.is_file()
                && i.initrd.is_file()
                && (i.rootfs.is_file() || i.toplevel.as_ref().is_some_and(|t| t.exists()))
        })
    });
    if !complete {
        return Err(missing());
    }
    Ok(record)
}

/// Parses and checks one node's build: the .drv (its system, and that it
/// produces the output nix reported), the store path, and the image files.
fn node_image(node: &str, drv_path: &str, out: &str) -> Result<NodeImage> {
    let drv_store = StorePath::from_absolute_path(drv_path.as_bytes())
        .map_err(|e| anyhow!("{node}: {drv_path} is not a store path: {e}"))?;
    let out_store = StorePath::from_absolute_path(out.as_bytes())
        .map_err(|e| anyhow!("{node}: {out} is not a store path: {e}"))?;
    let name = drv_store
        .name()
        .strip_suffix(".drv")
        .ok_or_else(|| anyhow!("{node}: {drv_path} is not a .drv"))?;
    let aterm = std::fs::read(drv_path).with_context(|| format!("{node}: reading {drv_path}"))?;
    let drv = Derivation::from_aterm_bytes(&aterm, name)
        .map_err(|e| anyhow!("{node}: parsing {drv_path}: {e}"))?;
    let outputs = drv
        .resolved_outputs()
        .map_err(|e| anyhow!("{node}: outputs of {drv_path}: {e}"))?;
    if let Some(path) = outputs.get("out").and_then(|o| o.path.as_ref())
        && *path != out_store
    {
        bail!("{node}: nix reported {out}, but {drv_path} produces {path}");
    }
    let dir = Path::new(out);
    let file = |f: &str| -> Result<PathBuf> {
        let p = dir.join(f);
        if p.is_file() {
            Ok(p)
        } else {
            bail!(
                "{node}: {out} has no {f} (an image output needs vmlinuz, initrd.img, and \
                 rootfs.img or toplevel)"
            )
        }
    };
    // nix/images.nix boots NixOS from the store: a toplevel, no rootfs.img.
    let toplevel = std::fs::read_to_string(dir.join("toplevel"))
        .ok()
        .map(|t| PathBuf::from(t.trim()))
        .filter(|_| !dir.join("rootfs.img").exists());
    Ok(NodeImage {
        store_path: out.to_string(),
        drv_path: drv_path.to_string(),
        system: drv.system().to_string(),
        kernel: file("vmlinuz")?,
        initrd: file("initrd.img")?,
        rootfs: match toplevel {
            Some(_) => PathBuf::new(),
            None => file("rootfs.img")?,
        },
        cmdline: std::fs::read_to_string(dir.join("cmdline"))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty()),
        toplevel,
    })
}

/// The cluster-wide record: the first node's files stand for the cluster
/// (the KVM probe boots that kernel), the id hashes every store path.
fn record(images: BTreeMap<String, NodeImage>) -> Result<ImageRecord> {
    let first = images
        .values()
        .next()
        .ok_or_else(|| anyhow!("no nodes"))?
        .clone();
    let mut h = Sha256::new();
    for i in images.values() {
        h.update(i.store_path.as_bytes());
        h.update(b"\n");
    }
    Ok(ImageRecord {
        provider: "nix".into(),
        kernel: first.kernel,
        initrd: first.initrd,
        rootfs: first.rootfs,
        id: hex::encode(&h.finalize()[..8]),
        nodes: images,
    })
}
