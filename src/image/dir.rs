//! An image directory: what `nix build` of nix/images.nix produces and what
//! `run --image-dir` (or `[image] provider = "prebuilt"`, `dir = ...`) boots.
//!
//!   <dir>/<node>/{vmlinuz,initrd.img,rootfs.img}[,cmdline]   one node's image
//!   <dir>/{vmlinuz,initrd.img,rootfs.img}                    every other node
//!
//! A node's own subdirectory wins; its `cmdline` (NixOS' `init=...`) is
//! appended to the kernel command line at start.

use crate::error::bad_input;
use crate::state::{ImageRecord, NodeImage};
use anyhow::Result;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const FILES: [&str; 3] = ["vmlinuz", "initrd.img", "rootfs.img"];

/// The three image files in `dir`, if all exist.
fn files_in(dir: &Path) -> Option<[PathBuf; 3]> {
    let files = FILES.map(|f| dir.join(f));
    files.iter().all(|p| p.is_file()).then_some(files)
}

/// Reads `dir` for `nodes`; a node with no image is bad input (exit 2).
pub fn scan<'a>(dir: &Path, nodes: impl IntoIterator<Item = &'a str>) -> Result<ImageRecord> {
    let shared = files_in(dir);
    let mut per_node = BTreeMap::new();
    let mut missing = Vec::new();
    for node in nodes {
        let sub = dir.join(node);
        let Some([kernel, initrd, rootfs]) = files_in(&sub) else {
            if shared.is_none() {
                missing.push(node.to_string());
            }
            continue;
        };
        let real = std::fs::canonicalize(&sub).unwrap_or(sub.clone());
        per_node.insert(
            node.to_string(),
            NodeImage {
                store_path: real.display().to_string(),
                drv_path: String::new(),
                system: String::new(),
                kernel,
                initrd,
                rootfs,
                cmdline: std::fs::read_to_string(sub.join("cmdline"))
                    .ok()
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty()),
            },
        );
    }
    if !missing.is_empty() {
        let lacks: Vec<&str> = FILES
            .iter()
            .copied()
            .filter(|f| !dir.join(f).is_file())
            .collect();
        return Err(bad_input(format!(
            "image directory {}: no image for {}: neither <node>/ nor the top level \
             holds {} (the top level lacks {})",
            dir.display(),
            missing.join(", "),
            FILES.join(", "),
            lacks.join(", ")
        )));
    }
    // The cluster-wide paths (the KVM probe boots them): the shared image,
    // else the first node's.
    let [kernel, initrd, rootfs] = match shared {
        Some(f) => f,
        None => {
            let first = per_node.values().next().expect("at least one node");
            [
                first.kernel.clone(),
                first.initrd.clone(),
                first.rootfs.clone(),
            ]
        }
    };
    Ok(ImageRecord {
        provider: "prebuilt".into(),
        id: dir.display().to_string(),
        kernel,
        initrd,
        rootfs,
        nodes: per_node,
    })
}

impl ImageRecord {
    /// Every file the cluster boots, named for messages: `node04 rootfs`.
    pub fn files(&self) -> Vec<(String, PathBuf)> {
        let mut out = vec![
            ("kernel".to_string(), self.kernel.clone()),
            ("initrd".to_string(), self.initrd.clone()),
            ("rootfs".to_string(), self.rootfs.clone()),
        ];
        for (node, i) in &self.nodes {
            out.push((format!("{node} kernel"), i.kernel.clone()));
            out.push((format!("{node} initrd"), i.initrd.clone()));
            out.push((format!("{node} rootfs"), i.rootfs.clone()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch_image(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        for f in FILES {
            std::fs::write(dir.join(f), f).unwrap();
        }
    }

    #[test]
    fn a_node_directory_wins_over_the_shared_image() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        touch_image(&dir);
        touch_image(&dir.join("node02"));
        std::fs::write(dir.join("node02/cmdline"), "init=/nix/store/x/init  \n").unwrap();
        let rec = scan(&dir, ["node01", "node02"]).unwrap();
        assert_eq!(rec.nodes.len(), 1);
        let (k, _, r, cmdline) = rec.for_node("node02");
        assert_eq!(k, dir.join("node02/vmlinuz"));
        assert_eq!(r, dir.join("node02/rootfs.img"));
        assert_eq!(cmdline.as_deref(), Some("init=/nix/store/x/init"));
        let (k, _, _, cmdline) = rec.for_node("node01");
        assert_eq!(k, dir.join("vmlinuz"));
        assert_eq!(cmdline, None);
        assert_eq!(rec.files().len(), 6);

        // Without the shared image, node01 has nothing to boot.
        std::fs::remove_file(dir.join("rootfs.img")).unwrap();
        let e = scan(&dir, ["node01", "node02"]).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), crate::error::EXIT_BAD_INPUT);
        assert!(e.to_string().contains("no image for node01"), "{e}");
    }
}
