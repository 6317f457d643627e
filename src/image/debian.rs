//! The Debian image provider: one shared base image with every role's
//! servers installed, built with mmdebstrap and `mkfs.ext4 -d` (no loop
//! devices), cached under `<state>/images/<recipe hash>/`.
//!
//! One server is not a Debian package: the S3 server (s3s-fs, see
//! docs/architecture.md), built from crates.io by `scripts/host-deps.sh`
//! and copied into the image; its bytes are part of the recipe hash.

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
/// The guest agent's source (src/agent/): its binary, built with the
/// driver, goes into the image, so its source is part of the recipe hash.
const AGENT_SOURCE: [&str; 2] = [
    include_str!("../agent/mod.rs"),
    include_str!("../agent/units.rs"),
];
/// Bump when the build steps in this file change in a way the hash must see.
const BUILDER_VERSION: &str = "debian-provider/1";
/// The s3s-fs release `scripts/host-deps.sh` builds (0.17 needs a newer
/// rustc than this project's).
pub const S3_SERVER_VERSION: &str = "0.14.1";

/// Where the image's S3 server binary is taken from: `$PHOTON_S3_SERVER`,
/// else where `scripts/host-deps.sh` builds it,
/// `${PHOTON_TOOLS_DIR:-$HOME/.cache/photon-cluster}/s3s-fs-<version>/bin/s3s-fs`.
pub fn s3_server_path() -> PathBuf {
    s3_server_path_in(|k| std::env::var_os(k))
}

/// [`s3_server_path`] with the environment read through `env`.
fn s3_server_path_in(env: impl Fn(&str) -> Option<std::ffi::OsString>) -> PathBuf {
    let set = |k: &str| env(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(p) = set("PHOTON_S3_SERVER") {
        return p;
    }
    set("PHOTON_TOOLS_DIR")
        .unwrap_or_else(|| {
            set("HOME")
                .unwrap_or_else(|| "/root".into())
                .join(".cache/photon-cluster")
        })
        .join(format!("s3s-fs-{S3_SERVER_VERSION}"))
        .join("bin/s3s-fs")
}

pub struct Recipe {
    pub suite: String,
    pub mirror: String,
    pub packages: Vec<String>,
    /// The S3 server binary copied into the image (/usr/local/bin/s3s-fs).
    pub s3_server: PathBuf,
    /// Its sha256, part of the hash; None when the file is missing (the
    /// hash then differs from any built image, and `build` refuses).
    s3_server_sha256: Option<String>,
}

impl Recipe {
    pub fn new(suite: &str) -> Recipe {
        Recipe::with_s3_server(suite, s3_server_path())
    }

    /// The recipe with the S3 server binary taken from `s3_server`.
    pub fn with_s3_server(suite: &str, s3_server: PathBuf) -> Recipe {
        let s3_server_sha256 = fs::read(&s3_server)
            .ok()
            .map(|bytes| hex::encode(Sha256::digest(&bytes)));
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
            s3_server,
            s3_server_sha256,
        }
    }

    /// Refuses (exit 2, before anything is built) when the S3 server binary
    /// is missing, naming the path and how to get it.
    fn require_s3_server(&self) -> Result<()> {
        if self.s3_server_sha256.is_some() {
            return Ok(());
        }
        Err(crate::error::named(
            crate::error::ErrorKind::BadInput,
            crate::error::bad_input(format!(
                "the debian image needs the S3 server s3s-fs {S3_SERVER_VERSION}, and {} is \
                 missing; run `bash scripts/host-deps.sh` to build it there (or set \
                 PHOTON_S3_SERVER to an s3s-fs binary)",
                self.s3_server.display()
            )),
        ))
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
            AGENT_SOURCE[0],
            AGENT_SOURCE[1],
            self.s3_server_sha256.as_deref().unwrap_or("s3s-fs missing"),
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
        self.require_s3_server()?;
        require_tools()?;
        agent_binary()?;
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
        let agent = work.join("photon-agent");
        install_agent(&agent_binary()?, &agent)?;
        let s3_server = work.join("s3s-fs");
        fs::copy(&self.s3_server, &s3_server)
            .with_context(|| format!("copying {}", self.s3_server.display()))?;
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
                "--customize-hook=sh {} \"$1\" {} {} {}",
                customize.display(),
                nested_init.display(),
                s3_server.display(),
                agent.display()
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
            "s3_server": { "path": self.s3_server, "sha256": self.s3_server_sha256 },
            "built": chrono::Utc::now().to_rfc3339(),
        });
        fs::write(work.join("recipe.json"), serde_json::to_vec_pretty(&meta)?)?;
        Ok(())
    }
}

/// The guest agent binary: `photon-agent`, built beside this program (one
/// package, two binaries: `cargo build` and `cargo install` make both).
fn agent_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this program")?;
    let agent = exe.with_file_name("photon-agent");
    if agent.is_file() {
        return Ok(agent);
    }
    Err(crate::error::named(
        crate::error::ErrorKind::BadInput,
        crate::error::bad_input(format!(
            "the debian image needs the guest agent binary, and {} is missing; it is a \
             binary of this package: build both with `cargo build` (or `cargo install --path .`)",
            agent.display()
        )),
    ))
}

/// Copies the agent into the build, stripped when `strip` is there: a
/// debug build carries ~130 MB of debug information the guest never reads.
fn install_agent(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    if crate::host::has_program("strip") {
        let status = Command::new("strip").arg(to).status()?;
        if !status.success() {
            bail!("strip {} failed: {status}", to.display());
        }
    }
    Ok(())
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

    /// A recipe whose S3 server is a small file with `bytes` in `dir`.
    fn recipe(suite: &str, dir: &Path, bytes: &[u8]) -> Recipe {
        let bin = dir.join(format!("s3s-fs-{}", hex::encode(Sha256::digest(bytes))));
        fs::write(&bin, bytes).unwrap();
        Recipe::with_s3_server(suite, bin)
    }

    #[test]
    fn recipe_hash_is_stable_and_sees_the_suite() {
        let tmp = tempfile::tempdir().unwrap();
        let a = recipe("bookworm", tmp.path(), b"server");
        assert_eq!(a.hash(), recipe("bookworm", tmp.path(), b"server").hash());
        assert_ne!(a.hash(), recipe("trixie", tmp.path(), b"server").hash());
        assert_eq!(a.hash().len(), 16);
        assert!(a.packages.contains(&"etcd-server".to_string()));
        assert!(a.packages.contains(&"python3-boto3".to_string()));
        assert!(!a.packages.iter().any(|p| p.starts_with('#')));
    }

    #[test]
    fn recipe_hash_sees_the_s3_server_bytes_not_its_path() {
        let tmp = tempfile::tempdir().unwrap();
        let a = recipe("bookworm", tmp.path(), b"server v1");
        assert_ne!(
            a.hash(),
            recipe("bookworm", tmp.path(), b"server v2").hash()
        );
        let copy = tmp.path().join("elsewhere");
        fs::copy(&a.s3_server, &copy).unwrap();
        assert_eq!(a.hash(), Recipe::with_s3_server("bookworm", copy).hash());
        let missing = Recipe::with_s3_server("bookworm", tmp.path().join("nope"));
        assert_ne!(a.hash(), missing.hash());
        assert!(a.require_s3_server().is_ok());
    }

    #[test]
    fn building_without_the_s3_server_is_refused_with_the_path_and_the_fix() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("tools/s3s-fs-0.14.1/bin/s3s-fs");
        let r = Recipe::with_s3_server("bookworm", path.clone());
        let e = r.build(&tmp.path().join("images")).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("bash scripts/host-deps.sh"), "{msg}");
        assert_eq!(crate::error::kind_of(&e), crate::error::ErrorKind::BadInput);
        assert!(
            !tmp.path().join("images").exists(),
            "refused before anything was made"
        );
    }

    #[test]
    fn the_s3_server_path_is_where_host_deps_builds_it_unless_overridden() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| std::ffi::OsString::from(v))
            }
        };
        let home = s3_server_path_in(env(&[("HOME", "/home/u")]));
        assert_eq!(
            home,
            PathBuf::from("/home/u/.cache/photon-cluster/s3s-fs-0.14.1/bin/s3s-fs")
        );
        let tools = s3_server_path_in(env(&[("HOME", "/home/u"), ("PHOTON_TOOLS_DIR", "/t")]));
        assert_eq!(tools, PathBuf::from("/t/s3s-fs-0.14.1/bin/s3s-fs"));
        let pinned = s3_server_path_in(env(&[
            ("PHOTON_TOOLS_DIR", "/t"),
            ("PHOTON_S3_SERVER", "/x/s3s-fs"),
        ]));
        assert_eq!(pinned, PathBuf::from("/x/s3s-fs"));
        let script = include_str!("../../scripts/host-deps.sh");
        assert!(script.contains(&format!("S3S_VERSION={S3_SERVER_VERSION}\n")));
        assert!(script.contains("${PHOTON_TOOLS_DIR:-$HOME/.cache/photon-cluster}/s3s-fs-"));
    }

    #[test]
    fn find_needs_a_finished_build() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let r = recipe("bookworm", tmp.path(), b"server");
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
