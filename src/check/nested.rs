//! Worker virtualization: boot an inner guest (the image's kernel and a
//! busybox initramfs that prints a marker) with qemu inside the node.
//!
//! `pass` needs an inner guest that booted with `-accel kvm` on a cluster
//! that itself runs on KVM. Anything less is reported as what it is: the
//! inner guest booted under TCG is `degraded: no nested KVM`, never `pass`.

use super::{Ctx, Verdict, tail};
use crate::guest::Guest;
use crate::machine::cmdline::Accel;
use anyhow::Result;
use serde_json::json;
use std::time::{Duration, Instant};

pub const MARKER: &str = "PHOTON-NESTED-GUEST-OK";
const KIT: &str = "/usr/local/share/photon/nested";

pub fn boot(ctx: &Ctx, guest: &Guest, memory_mib: u32, budget: Duration) -> Result<Verdict> {
    let started = Instant::now();
    let outer_kvm = ctx.record.accel.used == Accel::Kvm.name();
    let has_kvm = guest
        .exec(
            "test -c /dev/kvm && test -w /dev/kvm",
            Duration::from_secs(10),
        )?
        .ok();
    let mut evidence = json!({
        "node": guest.endpoint.node,
        "outer_accel": ctx.record.accel.used,
        "guest_has_dev_kvm": has_kvm,
    });
    let mut why_not_kvm = if has_kvm {
        None
    } else {
        Some("/dev/kvm is absent in the guest".to_string())
    };
    if has_kvm {
        let run = inner(guest, "kvm", memory_mib, budget / 2)?;
        evidence["kvm_attempt"] = run.evidence();
        match (run.booted, outer_kvm) {
            (true, true) => {
                return Ok(Verdict::pass(
                    format!("inner guest booted with -accel kvm in {:.1} s", run.seconds),
                    evidence,
                ));
            }
            (true, false) => {
                return Ok(Verdict::degraded(
                    format!(
                        "no nested KVM: the inner -accel kvm guest booted in {:.1} s, but on \
                         virtualization emulated by the outer TCG guest",
                        run.seconds
                    ),
                    evidence,
                ));
            }
            (false, _) => why_not_kvm = Some(format!("-accel kvm failed: {}", run.reason())),
        }
    }
    let why = why_not_kvm.unwrap_or_default();
    let left = budget.saturating_sub(started.elapsed());
    let run = inner(guest, "tcg", memory_mib, left)?;
    evidence["tcg_attempt"] = run.evidence();
    evidence["no_kvm_reason"] = json!(why);
    if run.booted {
        Ok(Verdict::degraded(
            format!(
                "no nested KVM ({why}); the inner guest booted under TCG in {:.1} s",
                run.seconds
            ),
            evidence,
        ))
    } else {
        Ok(Verdict::fail(
            format!(
                "the inner guest did not boot under TCG either: {}",
                run.reason()
            ),
            evidence,
        ))
    }
}

struct InnerRun {
    accel: &'static str,
    booted: bool,
    code: i32,
    seconds: f64,
    console: String,
}

impl InnerRun {
    fn reason(&self) -> String {
        let last = self.console.lines().rev().find(|l| !l.trim().is_empty());
        format!(
            "exit {} after {:.1} s: {}",
            self.code,
            self.seconds,
            last.unwrap_or("no console output")
        )
    }

    fn evidence(&self) -> serde_json::Value {
        json!({
            "accel": self.accel,
            "booted": self.booted,
            "exit": self.code,
            "seconds": self.seconds,
            "console_tail": tail(&self.console, 12),
        })
    }
}

fn inner(
    guest: &Guest,
    accel: &'static str,
    memory_mib: u32,
    budget: Duration,
) -> Result<InnerRun> {
    let secs = budget.as_secs().max(5);
    let command = format!(
        "timeout -s KILL {secs} qemu-system-x86_64 -accel {accel} -m {memory_mib} \
         -nodefaults -no-user-config -display none -serial stdio -no-reboot \
         -kernel {KIT}/vmlinuz -initrd {KIT}/initramfs.gz \
         -append 'console=ttyS0 panic=-1 quiet' 2>&1"
    );
    let started = Instant::now();
    let out = guest.exec(&command, budget + Duration::from_secs(15))?;
    Ok(InnerRun {
        accel,
        booted: out.stdout.contains(MARKER),
        code: out.code,
        seconds: started.elapsed().as_secs_f64(),
        console: out.stdout,
    })
}
