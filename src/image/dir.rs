//! An image directory: what `nix build` of nix/images.nix produces and what
//! `run --image-dir` (or `[image] provider = "prebuilt"`, `dir = ...`) boots.
//!
//!   <dir>/<node>/{vmlinuz,initrd.img,rootfs.img}[,cmdline]   one node's image
//!   <dir>/<node>/{vmlinuz,initrd.img,toplevel,cmdline}       a NixOS system booted
//!                                                            from the host's store
//!   <dir>/{vmlinuz,initrd.img,rootfs.img}                    every other node
//!
//! A node's own subdirectory wins; its `cmdline` (NixOS' `init=...`) is
//! appended to the kernel command line at start. A node directory with a
//! `toplevel` (the system's store path) and no `rootfs.img` boots as
//! nixpkgs' qemu-vm.nix boots: the store shared read-only, a blank disk.

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

/// A store-booted node's kernel, initrd and system (`toplevel`), if `dir`
/// is one: no rootfs.img, and a toplevel naming an existing directory.
fn store_boot_in(dir: &Path) -> Option<(PathBuf, PathBuf, PathBuf)> {
    let [kernel, initrd] = ["vmlinuz", "initrd.img"].map(|f| dir.join(f));
    if dir.join("rootfs.img").exists() || !kernel.is_file() || !initrd.is_file() {
        return None;
    }
    let toplevel = PathBuf::from(std::fs::read_to_string(dir.join("toplevel")).ok()?.trim());
    toplevel.is_absolute().then_some((kernel, initrd, toplevel))
}

fn cmdline_in(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join("cmdline"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Reads `dir` for `nodes`; a node with no image is bad input (exit 2).
pub fn scan<'a>(dir: &Path, nodes: impl IntoIterator<Item = &'a str>) -> Result<ImageRecord> {
    let shared = files_in(dir);
    let mut per_node = BTreeMap::new();
    let mut missing = Vec::new();
    for node in nodes {
        let sub = dir.join(node);
        let (kernel, initrd, rootfs, toplevel) = match (files_in(&sub), store_boot_in(&sub)) {
            (Some([k, i, r]), _) => (k, i, r, None),
            (None, Some((k, i, t))) => (k, i, PathBuf::new(), Some(t)),
            (None, None) => {
                if shared.is_none() {
                    missing.push(node.to_string());
                }
                continue;
            }
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
                cmdline: cmdline_in(&sub),
                toplevel,
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
             holds {} (or, for a store-booted NixOS node, <node>/ vmlinuz, initrd.img \
             and toplevel); the top level lacks {}",
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
            match &i.toplevel {
                Some(t) => out.push((format!("{node} system"), t.clone())),
                None => out.push((format!("{node} rootfs"), i.rootfs.clone())),
            }
        }
        // A cluster of store-booted nodes has no shared root image.
        out.retain(|(_, p)| !p.as_os_str().is_empty());
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

        // A NixOS node booted from the store: kernel, initrd and toplevel.
        let nixos = dir.join("node03");
        std::fs::create_dir_all(&nixos).unwrap();
        for f in ["vmlinuz", "initrd.img"] {
            std::fs::write(nixos.join(f), f).unwrap();
        }
        std::fs::write(
            nixos.join("toplevel"),
            "/nix/store/abc-nixos-system-node03\n",
        )
        .unwrap();
        let rec = scan(&dir, ["node01", "node02", "node03"]).unwrap();
        assert_eq!(rec.store_for("node03"), Some("/nix/store".into()));
        assert_eq!(
            rec.store_for("node02"),
            None,
            "a disk image is not store-booted"
        );
        let files = rec.files();
        assert!(files.contains(&(
            "node03 system".to_string(),
            "/nix/store/abc-nixos-system-node03".into()
        )));
        assert!(!files.iter().any(|f| f.0 == "node03 rootfs"));
        // A rootfs.img beside the toplevel wins: the node boots its disk.
        std::fs::write(nixos.join("rootfs.img"), "r").unwrap();
        let rec = scan(&dir, ["node03"]).unwrap();
        assert_eq!(rec.store_for("node03"), None);
        std::fs::remove_dir_all(&nixos).unwrap();

        // Without the shared image, node01 has nothing to boot.
        std::fs::remove_file(dir.join("rootfs.img")).unwrap();
        let e = scan(&dir, ["node01", "node02"]).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), crate::error::EXIT_BAD_INPUT);
        assert!(e.to_string().contains("no image for node01"), "{e}");
    }
}
