//! Choosing KVM or TCG. `auto` prefers KVM and falls back to TCG when
//! /dev/kvm is missing, or when a KVM guest shows no console progress within
//! a watchdog (on some hosts /dev/kvm exists but guests hang right after the
//! firmware). The fallback is always recorded and shown, never silent.

use super::{Accel, QEMU};
use crate::error::bad_input;
use crate::wait::{self, Pause, Wait};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::fs::{self, OpenOptions};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AccelRequest {
    Auto,
    Kvm,
    Tcg,
}

impl AccelRequest {
    pub fn name(self) -> &'static str {
        match self {
            AccelRequest::Auto => "auto",
            AccelRequest::Kvm => "kvm",
            AccelRequest::Tcg => "tcg",
        }
    }
}

/// What `start` chose, recorded in cluster.json and result.json.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AccelChoice {
    /// What the guests really run under.
    pub used: Accel,
    /// What was asked for.
    pub requested: AccelRequest,
    /// Why `auto` did not use KVM, when it did not.
    pub fallback_reason: Option<String>,
}

impl AccelChoice {
    pub fn summary(&self) -> String {
        match &self.fallback_reason {
            Some(r) => format!("{} (fallback from KVM: {r})", self.used.name()),
            None => self.used.name().to_string(),
        }
    }
}

/// How long a KVM guest may stay silent on its console before we call it hung.
pub const WATCHDOG: Duration = Duration::from_secs(8);

/// The verdict of one KVM probe, cached per host boot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Probe {
    pub boot_id: String,
    pub kvm_usable: bool,
    pub reason: Option<String>,
    pub probed_at: String,
}

pub fn choose(
    request: AccelRequest,
    kernel: &Path,
    cache: &Path,
    work: &Path,
) -> Result<AccelChoice> {
    let choice = |used: Accel, reason: Option<String>| AccelChoice {
        used,
        requested: request,
        fallback_reason: reason,
    };
    if request == AccelRequest::Tcg {
        return Ok(choice(Accel::Tcg, None));
    }
    let probe = probe_cached(kernel, cache, work)?;
    match (request, probe.kvm_usable) {
        (_, true) => Ok(choice(Accel::Kvm, None)),
        (AccelRequest::Kvm, false) => Err(crate::error::named(
            crate::error::ErrorKind::KvmUnavailable,
            bad_input(format!(
                "--accel kvm: KVM is not usable here: {}; use --accel auto or tcg",
                probe.reason.unwrap_or_default()
            )),
        )),
        _ => Ok(choice(Accel::Tcg, probe.reason)),
    }
}

fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The verdict cached earlier in this host boot, if any (probes nothing).
pub fn cached(cache: &Path) -> Option<Probe> {
    let p: Probe = serde_json::from_slice(&fs::read(cache).ok()?).ok()?;
    (p.boot_id == boot_id()).then_some(p)
}

/// Reuses the verdict from earlier in this host boot, else probes.
pub fn probe_cached(kernel: &Path, cache: &Path, work: &Path) -> Result<Probe> {
    let id = boot_id();
    if let Ok(bytes) = fs::read(cache)
        && let Ok(p) = serde_json::from_slice::<Probe>(&bytes)
        && p.boot_id == id
        && !id.is_empty()
    {
        return Ok(p);
    }
    let (kvm_usable, reason) = probe(kernel, work)?;
    let p = Probe {
        boot_id: id,
        kvm_usable,
        reason,
        probed_at: chrono::Utc::now().to_rfc3339(),
    };
    crate::files::write_atomic(cache, &serde_json::to_vec_pretty(&p)?)?;
    Ok(p)
}

/// Boots the image's kernel under KVM with no root disk and watches the
/// console: a working KVM prints the kernel banner within a second or two.
fn probe(kernel: &Path, work: &Path) -> Result<(bool, Option<String>)> {
    let kvm = Path::new("/dev/kvm");
    if !kvm.exists() {
        return Ok((false, Some("/dev/kvm is missing".into())));
    }
    if let Err(e) = OpenOptions::new().read(true).write(true).open(kvm) {
        return Ok((false, Some(format!("/dev/kvm cannot be opened: {e}"))));
    }
    fs::create_dir_all(work)?;
    let log = work.join("kvm-probe.log");
    let _ = fs::remove_file(&log);
    let mut child = Command::new(QEMU)
        .args(["-accel", "kvm", "-cpu", "host", "-m", "256", "-nodefaults"])
        .args(["-display", "none", "-no-reboot", "-kernel"])
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {QEMU} for the KVM probe"))?;
    let watched = Wait::new("KVM guest console output", WATCHDOG)
        .pause(Pause::Every(Duration::from_millis(100)))
        .run(|| {
            if fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("Linux version")
            {
                return Ok(wait::Probe::Done((true, None)));
            }
            if let Some(status) = child.try_wait()? {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                let why = format!(
                    "KVM guest exited ({status}) before any console output: {}",
                    err.lines().next().unwrap_or("").trim()
                );
                return Ok(wait::Probe::Done((false, Some(why))));
            }
            Ok(wait::Probe::Pending("no console output yet".into()))
        });
    let verdict = watched.unwrap_or_else(|_| {
        let why = format!(
            "KVM guest showed no console progress within {} s",
            WATCHDOG.as_secs()
        );
        (false, Some(why))
    });
    let _ = child.kill();
    let _ = child.wait();
    Ok(verdict)
}
