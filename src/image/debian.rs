//! The Debian image provider: one shared base image with every role's
//! servers installed, built with mmdebstrap and `mkfs.ext4 -d` (no loop
//! devices), cached under `<state>/images/<recipe hash>/`.

use crate::state::ImageRecord;
use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PACKAGES: &str = include_str!("../../images/debian/packages.txt");
const CUSTOMIZE: &str = include_str!("../../images/debian/customize.sh");
/// The nested-guest kit's init, shared with the NixOS worker role.
const NESTED_INIT: &str = include_str!("../../images/nested/init");
/// Bump when the build steps in this file change in a way the hash must see.
const BUILDER_VERSION: &str = "debian-provider/1";

pub struct Recipe {
    pub suite: String,
    pub mirror: String,
    pub packages: Vec<String>,
}

impl Recipe {
    pub fn new(suite: &str) -> Recipe {
        Recipe {
            suite: suite.to_string(),
            mirror: std::env::var("PHOTON_DEBIAN_MIRROR")
                .unwrap_or_else(|_| "http://deb.debian.org/debian".into()),
            packages: PACKAGES
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string)
                .collect(),
        }
    }

    /// The cache key: everything that decides the image's content. The
    /// mirror is left out: any mirror of the same suite serves the same recipe.
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        for part in [
            BUILDER_VERSION,
            &self.suite,
            &self.packages.join(","),
            CUSTOMIZE,
            NESTED_INIT,
        ] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        hex::encode(&h.finalize()[..8])
    }

    fn record(&self, dir: &Path) -> ImageRecord {
        ImageRecord {
            provider: "debian".into(),
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.img"),
            rootfs: dir.join("rootfs.img"),
            id: self.hash(),
            nodes: Default::default(),
        }
    }

    /// The built image, if this recipe's build finished earlier.
    pub fn find(&self, images: &Path) -> Option<ImageRecord> {
        let dir = images.join(self.hash());
        dir.join("recipe.json").is_file().then(|| self.record(&dir))
    }

    /// Builds the image unless this recipe's build is cached.
    pub fn build(&self, images: &Path) -> Result<ImageRecord> {
        if let Some(found) = self.find(images) {
            tracing::info!(
                "image: debian {} recipe {} is cached in {}",
                self.suite,
                self.hash(),
                images.join(self.hash()).display()
            );
            return Ok(found);
        }
        require_tools()?;
        let final_dir = images.join(self.hash());
        let work = images.join(format!("{}.building", self.hash()));
        let _ = fs::remove_dir_all(&work);
        fs::create_dir_all(&work)?;
        let started = Instant::now();
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed:>4}] image: {msg}")
                .expect("valid template"),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        let result = self.build_into(&work, &bar);
        bar.finish_and_clear();
        if let Err(e) = result {
            let _ = fs::remove_dir_all(work.join("root"));
            return Err(e).with_context(|| {
                format!(
                    "building the debian image (log: {})",
                    work.join("build.log").display()
                )
            });
        }
        let _ = fs::remove_dir_all(&final_dir);
        fs::rename(&work, &final_dir)?;
        tracing::info!(
            "image: built debian {} recipe {} in {:.0} s -> {}",
            self.suite,
            self.hash(),
            started.elapsed().as_secs_f64(),
            final_dir.display()
        );
        Ok(self.record(&final_dir))
    }

    fn build_into(&self, work: &Path, bar: &ProgressBar) -> Result<()> {
        let root = work.join("root");
        let customize = work.join("customize.sh");
        fs::write(&customize, CUSTOMIZE)?;
        let nested_init = work.join("nested-init");
        fs::write(&nested_init, NESTED_INIT)?;
        let log = work.join("build.log");
        bar.set_message(format!(
            "mmdebstrap {} with {} packages",
            self.suite,
            self.packages.len()
        ));
        let mut cmd = Command::new("mmdebstrap");
        cmd.args(["--variant=apt", "--mode=root", "--verbose"])
            .arg(format!("--include={}", self.packages.join(",")))
            .arg("--aptopt=APT::Install-Recommends \"false\"")
            // Packages must not start their servers inside the build chroot.
            .arg(
                "--essential-hook=printf '#!/bin/sh\\nexit 101\\n' > \"$1/usr/sbin/policy-rc.d\"; \
                 chmod +x \"$1/usr/sbin/policy-rc.d\"",
            )
            .arg(format!(
                "--customize-hook=sh {} \"$1\" {}",
                customize.display(),
                nested_init.display()
            ))
            .arg(&self.suite)
            .arg(&root)
            .arg(&self.mirror);
        run_logged(cmd, &log, bar)?;

        bar.set_message("extracting kernel and initrd");
        let boot = root.join("boot");
        copy_first(&boot, "vmlinuz-", &work.join("vmlinuz"))?;
        copy_first(&boot, "initrd.img-", &work.join("initrd.img"))?;

        // Room for what the guests write (etcd, prometheus, logs) on top of
        // the installed tree; the file is sparse, so it costs nothing unused.
        bar.set_message("mkfs.ext4 -d (root image)");
        let used = dir_size(&root)?;
        let size_mib = used / (1 << 20) + 2048;
        let mut mkfs = Command::new("mkfs.ext4");
        mkfs.args(["-q", "-F", "-L", "photon-root", "-d"])
            .arg(&root)
            .arg(work.join("rootfs.img"))
            .arg(format!("{size_mib}M"));
        run_logged(mkfs, &log, bar)?;
        fs::remove_dir_all(&root)?;
        let meta = serde_json::json!({
            "provider": "debian",
            "suite": self.suite,
            "mirror": self.mirror,
            "hash": self.hash(),
            "packages": self.packages,
            "built": chrono::Utc::now().to_rfc3339(),
        });
        fs::write(work.join("recipe.json"), serde_json::to_vec_pretty(&meta)?)?;
        Ok(())
    }
}

fn require_tools() -> Result<()> {
    crate::host::require_program("mmdebstrap", "mmdebstrap")?;
    crate::host::require_program("mkfs.ext4", "e2fsprogs")?;
    if !nix::unistd::geteuid().is_root() {
        return Err(crate::error::bad_input(
            "building the debian image needs root (mmdebstrap --mode=root)",
        ));
    }
    Ok(())
}

/// Runs a build step, appending its output to the log and showing its last
/// line as progress.
fn run_logged(mut cmd: Command, log: &Path, bar: &ProgressBar) -> Result<()> {
    use std::io::Write;
    let mut logf = fs::OpenOptions::new().create(true).append(true).open(log)?;
    writeln!(logf, "$ {cmd:?}")?;
    let prefix = bar.message();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let stderr = child.stderr.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    let out_log = logf.try_clone()?;
    let out_thread = std::thread::spawn(move || {
        let mut out_log = out_log;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = writeln!(out_log, "{line}");
        }
    });
    let mut tail: Vec<String> = Vec::new();
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        writeln!(logf, "{line}")?;
        let short: String = line.chars().take(70).collect();
        bar.set_message(format!("{prefix}: {short}"));
        tail.push(line);
        if tail.len() > 15 {
            tail.remove(0);
        }
    }
    let _ = out_thread.join();
    let status = child.wait()?;
    bar.set_message(prefix);
    if !status.success() {
        bail!(
            "{cmd:?} failed ({status}); last output:\n{}",
            tail.join("\n")
        );
    }
    Ok(())
}

fn copy_first(dir: &Path, prefix: &str, to: &Path) -> Result<()> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect();
    found.sort();
    let src = found
        .last()
        .with_context(|| format!("no {prefix}* in {}", dir.display()))?;
    fs::copy(src, to).with_context(|| format!("copying {}", src.display()))?;
    Ok(())
}

fn dir_size(dir: &Path) -> Result<u64> {
    let out = Command::new("du").args(["-sb"]).arg(dir).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .context("du -sb gave no size")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipe_hash_is_stable_and_sees_the_suite() {
        let a = Recipe::new("bookworm");
        assert_eq!(a.hash(), Recipe::new("bookworm").hash());
        assert_ne!(a.hash(), Recipe::new("trixie").hash());
        assert_eq!(a.hash().len(), 16);
        assert!(a.packages.contains(&"etcd-server".to_string()));
        assert!(!a.packages.iter().any(|p| p.starts_with('#')));
    }

    #[test]
    fn find_needs_a_finished_build() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let r = Recipe::new("bookworm");
        assert!(r.find(&dir).is_none());
        fs::create_dir_all(dir.join(r.hash())).unwrap();
        assert!(
            r.find(&dir).is_none(),
            "a directory without recipe.json is unfinished"
        );
        fs::write(dir.join(r.hash()).join("recipe.json"), "{}").unwrap();
        assert_eq!(
            r.find(&dir).unwrap().rootfs,
            dir.join(r.hash()).join("rootfs.img")
        );
    }
}
