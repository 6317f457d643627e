//! `photon-cluster run`: one lane inside a Nix builder (or anywhere that
//! wants the same contract). No HOME: state goes under $TMPDIR. Every image
//! and tool the run uses must be a Nix store path, unless the caller lists
//! it (or a prefix of it) with `--allow-impure`; exemptions are recorded in
//! result.json. Artifacts go straight into `--out`, with
//! `nix-support/hydra-build-products` and, for a failed lane kept on
//! purpose, `nix-support/failed`.

use crate::error::bad_input;
use crate::spec::{Cluster, ImageSource};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The tools a run executes, resolved on PATH.
pub const TOOLS: &[&str] = &["qemu-system-x86_64", "qemu-img", "ssh-keygen", "mkfs.ext4"];

/// What result.json records about a hermetic run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Hermetic {
    pub store_dir: String,
    /// Paths checked and found in the store.
    pub store_paths: Vec<String>,
    /// Paths outside the store that the caller allowed with --allow-impure.
    pub impure: Vec<String>,
}

pub fn store_dir() -> PathBuf {
    std::env::var_os("NIX_STORE_DIR")
        .or_else(|| std::env::var_os("NIX_STORE"))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/nix/store"))
}

/// Checks every path: in the store, or allowed. Refuses (exit 2) otherwise.
pub fn check_paths(
    paths: &[(String, PathBuf)],
    store: &Path,
    allowed: &[PathBuf],
) -> Result<Hermetic> {
    let mut h = Hermetic {
        store_dir: store.display().to_string(),
        store_paths: Vec::new(),
        impure: Vec::new(),
    };
    let mut refused = Vec::new();
    for (what, p) in paths {
        // Resolve symlinks: /run/current-system/sw/bin/x is a store path in disguise.
        let real = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
        let shown = format!("{what}: {}", real.display());
        if real.starts_with(store) {
            h.store_paths.push(shown);
        } else if allowed
            .iter()
            .any(|a| real.starts_with(a) || p.starts_with(a))
        {
            h.impure.push(shown);
        } else {
            refused.push(shown);
        }
    }
    if !refused.is_empty() {
        return Err(bad_input(format!(
            "hermetic run: not in {}: {}; build them with Nix, or pass --allow-impure PATH \
             for each (recorded in result.json)",
            store.display(),
            refused.join(", ")
        )));
    }
    Ok(h)
}

/// The tools' paths as found on PATH; a missing tool is bad input.
pub fn tool_paths() -> Result<Vec<(String, PathBuf)>> {
    TOOLS.iter().map(|t| tool_path(t)).collect()
}

/// One tool's path as found on PATH (`python3` for a lane with script
/// checks); a missing tool is bad input.
pub fn tool_path(tool: &str) -> Result<(String, PathBuf)> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .map(|p| (tool.to_string(), p))
        .ok_or_else(|| bad_input(format!("hermetic run: `{tool}` is not on PATH")))
}

/// Points the cluster at the image directory `dir` (see image::dir: per-node
/// `<node>/` subdirectories, or one shared image) and returns every file it
/// will boot, for the store check.
pub fn use_image_dir(cluster: &mut Cluster, dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let record = crate::image::dir::scan(dir, cluster.node_names())
        .with_context(|| format!("--image-dir {}", dir.display()))?;
    cluster.image = ImageSource::PrebuiltDir {
        dir: dir.to_path_buf(),
    };
    Ok(record.files())
}

/// Hydra's build products, its metrics (`name value unit` lines; the check's
/// builder appends its own wall time), and the marker of a failed build
/// kept on purpose.
pub fn write_nix_support(out: &Path, failed: bool, metrics: &[(String, f64, &str)]) -> Result<()> {
    let dir = out.join("nix-support");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let products = format!(
        "report html {o}/report.html\nreport markdown {o}/report.md\n\
         file result-json {o}/result.json\nfile junit {o}/junit.xml\nfile driver-log {o}/driver.log\n",
        o = out.display()
    );
    std::fs::write(dir.join("hydra-build-products"), products)?;
    std::fs::write(dir.join("hydra-metrics"), hydra_metrics(metrics))?;
    if failed {
        std::fs::write(dir.join("failed"), "")?;
    }
    Ok(())
}

/// Hydra's metrics format: one `name value [unit]` line each; names and
/// units must not contain spaces.
fn hydra_metrics(metrics: &[(String, f64, &str)]) -> String {
    let mut s = String::new();
    for (name, value, unit) in metrics.iter().filter(|m| m.1.is_finite()) {
        let name = name.replace(char::is_whitespace, "_");
        s.push_str(&format!("{name} {value}"));
        if !unit.is_empty() {
            s.push(' ');
            s.push_str(unit);
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hydra_metrics_are_one_line_each_without_spaces_in_names() {
        let m = vec![
            ("boot-to-ready".to_string(), 61.5, "s"),
            ("checks-pass".to_string(), 12.0, ""),
            ("bench volume.read.ratio".to_string(), 0.63, "x"),
            ("nan".to_string(), f64::NAN, "s"),
        ];
        assert_eq!(
            hydra_metrics(&m),
            "boot-to-ready 61.5 s\nchecks-pass 12\nbench_volume.read.ratio 0.63 x\n"
        );
    }

    #[test]
    fn paths_outside_the_store_are_refused_unless_allowed() {
        let store = Path::new("/nix/store");
        let paths = vec![
            (
                "kernel".to_string(),
                PathBuf::from("/nix/store/abc-img/vmlinuz"),
            ),
            (
                "qemu".to_string(),
                PathBuf::from("/usr/bin/qemu-nonexistent"),
            ),
        ];
        let e = check_paths(&paths, store, &[]).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), crate::error::EXIT_BAD_INPUT);
        assert!(
            e.to_string().contains("qemu: /usr/bin/qemu-nonexistent"),
            "{e}"
        );
        let h = check_paths(&paths, store, &[PathBuf::from("/usr/bin")]).unwrap();
        assert_eq!(h.store_paths, ["kernel: /nix/store/abc-img/vmlinuz"]);
        assert_eq!(h.impure, ["qemu: /usr/bin/qemu-nonexistent"]);
    }
}
