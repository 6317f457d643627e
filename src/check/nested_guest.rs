//! Worker virtualization: boot an inner guest (the image's kernel and a
//! busybox initramfs that prints a marker) with qemu inside the node.
//!
//! `pass` needs an inner guest that booted with `-accel kvm` on a cluster
//! that itself runs on KVM. Anything less is reported as what it is: the
//! inner guest booted under TCG is `degraded: no nested KVM`, never `pass`.
//!
//! Two payloads. `linux` is the image's own kernel with a busybox
//! initramfs. `multiboot` is a 100-byte multiboot kernel that writes the
//! marker to the serial port and exits QEMU through isa-debug-exit: a TCG
//! guest inside a TCG guest takes minutes to boot Linux here (past 280 s,
//! measured, with two workers at once), but about 4 s for this one.
//! `auto` picks linux when the cluster runs on KVM, multiboot otherwise.

use super::{Check, Ctx, Verdict};
use crate::guest::Guest;
use crate::machine::cmdline::Accel;
use crate::text::tail;
use anyhow::Result;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::time::{Duration, Instant};

/// `nested_guest`: boot an inner guest with qemu inside the target; KVM
/// first, else TCG (degraded).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NestedGuest {
    /// `auto` (linux on a KVM cluster, multiboot otherwise), `linux`, `multiboot`.
    #[serde(default)]
    payload: Payload,
    #[serde(default = "crate::spec::default::u32::<192>")]
    memory_mib: u32,
}

impl Check for NestedGuest {
    fn attempt(&self, ctx: &Ctx, target: Option<&str>, budget: Duration) -> Result<Verdict> {
        boot(
            ctx,
            &*ctx.guest(target)?,
            self.payload,
            self.memory_mib,
            budget,
        )
    }
}

pub const MARKER: &str = "PHOTON-NESTED-GUEST-OK";
const KIT: &str = "/usr/local/share/photon/nested";
const PROBE_PATH: &str = "/run/photon-nested-probe.bin";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Payload {
    #[default]
    Auto,
    Linux,
    Multiboot,
}

impl Payload {
    pub fn name(self) -> &'static str {
        match self {
            Payload::Auto => "auto",
            Payload::Linux => "linux",
            Payload::Multiboot => "multiboot probe",
        }
    }
}

pub fn boot(
    ctx: &Ctx,
    guest: &Guest,
    payload: Payload,
    memory_mib: u32,
    budget: Duration,
) -> Result<Verdict> {
    let started = Instant::now();
    let outer_kvm = ctx.record.accel.used == Accel::Kvm;
    let payload = match payload {
        Payload::Auto if outer_kvm => Payload::Linux,
        Payload::Auto => Payload::Multiboot,
        p => p,
    };
    if payload == Payload::Multiboot {
        let b64 = base64::engine::general_purpose::STANDARD.encode(multiboot_probe());
        guest.succeed(
            &format!("echo {b64} | base64 -d > {PROBE_PATH}"),
            Duration::from_secs(10),
        )?;
    }
    let has_kvm = guest
        .exec(
            "test -c /dev/kvm && test -w /dev/kvm",
            Duration::from_secs(10),
        )?
        .ok();
    let mut evidence = json!({
        "node": guest.endpoint.node,
        "outer_accel": ctx.record.accel.used,
        "payload": payload,
        "guest_has_dev_kvm": has_kvm,
    });
    let mut why_not_kvm = if has_kvm {
        None
    } else {
        Some("/dev/kvm is absent in the guest".to_string())
    };
    if has_kvm {
        let run = inner(guest, payload, "kvm", memory_mib, budget / 2)?;
        evidence["kvm_attempt"] = run.evidence();
        match (run.booted, outer_kvm) {
            (true, true) => {
                return Ok(Verdict::pass(
                    format!(
                        "inner guest ({}) booted with -accel kvm in {:.1} s",
                        payload.name(),
                        run.seconds
                    ),
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
    let run = inner(guest, payload, "tcg", memory_mib, left)?;
    evidence["tcg_attempt"] = run.evidence();
    evidence["no_kvm_reason"] = json!(why);
    if run.booted {
        Ok(Verdict::degraded(
            format!(
                "no nested KVM ({why}); the inner guest ({}) booted under TCG in {:.1} s",
                payload.name(),
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
    payload: Payload,
    accel: &'static str,
    memory_mib: u32,
    budget: Duration,
) -> Result<InnerRun> {
    let secs = budget.as_secs().max(5);
    let boot = match payload {
        Payload::Multiboot => {
            format!("-kernel {PROBE_PATH} -device isa-debug-exit,iobase=0xf4,iosize=4")
        }
        _ => format!(
            "-kernel {KIT}/vmlinuz -initrd {KIT}/initramfs.gz \
             -append 'console=ttyS0 panic=-1 quiet mitigations=off'"
        ),
    };
    let command = format!(
        "timeout -s KILL {secs} qemu-system-x86_64 -accel {accel} -m {memory_mib} \
         -nodefaults -no-user-config -display none -serial stdio -no-reboot {boot} 2>&1"
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

/// A flat multiboot (v1) kernel: the header, then `code` at the entry
/// point, then `msg`. `code` gets the address `msg` will be loaded at.
pub fn multiboot(code: impl Fn(u32) -> Vec<u8>, msg: &[u8]) -> Vec<u8> {
    const BASE: u32 = 0x0010_0000;
    const MAGIC: u32 = 0x1BAD_B002;
    const FLAGS: u32 = 1 << 16; // the address fields below are valid
    const ENTRY: u32 = 0x20; // right after the 8-word header
    let msg_addr = BASE + ENTRY + code(0).len() as u32;
    let mut img = Vec::new();
    for word in [
        MAGIC,
        FLAGS,
        0u32.wrapping_sub(MAGIC.wrapping_add(FLAGS)), // checksum
        BASE,                                         // header_addr
        BASE,                                         // load_addr: the file starts at BASE
        0,                                            // load_end_addr: load the whole file
        0,                                            // bss_end_addr: none
        BASE + ENTRY,                                 // entry_addr
    ] {
        img.extend_from_slice(&word.to_le_bytes());
    }
    img.extend_from_slice(&code(msg_addr));
    img.extend_from_slice(msg);
    img
}

/// `mov esi, msg; mov dx, 0x3f8; print the NUL-terminated string at esi`
/// (14 bytes); falls through when done.
pub fn print_to_com1(msg_addr: u32) -> Vec<u8> {
    let mut code = vec![0xBE]; // mov esi, msg
    code.extend_from_slice(&msg_addr.to_le_bytes());
    code.extend_from_slice(&[
        0x66, 0xBA, 0xF8, 0x03, // mov dx, 0x3f8 (COM1)
        0xAC, //                   next: lodsb
        0x84, 0xC0, //             test al, al
        0x74, 0x03, //             jz done
        0xEE, //                   out dx, al
        0xEB, 0xF8, //             jmp next
    ]);
    code
}

/// In 32-bit protected mode it writes the marker to COM1 and exits QEMU
/// through isa-debug-exit (exit status 33).
pub fn multiboot_probe() -> Vec<u8> {
    let code = |msg| {
        let mut c = print_to_com1(msg);
        c.extend_from_slice(&[
            0x66, 0xBA, 0xF4, 0x00, // done: mov dx, 0xf4 (isa-debug-exit)
            0xB0, 0x10, //             mov al, 0x10
            0xEE, //                   out dx, al
            0xFA, 0xF4, 0xEB, 0xFC, // cli; hlt; jmp hlt
        ]);
        c
    };
    multiboot(code, format!("{MARKER} multiboot probe\n\0").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_has_a_valid_multiboot_header() {
        let img = multiboot_probe();
        let word = |i: usize| u32::from_le_bytes(img[i * 4..i * 4 + 4].try_into().unwrap());
        assert_eq!(word(0), 0x1BAD_B002);
        assert_eq!(word(0).wrapping_add(word(1)).wrapping_add(word(2)), 0);
        assert_eq!(word(7), 0x0010_0020);
        let msg = &img[0x3C..];
        assert!(msg.starts_with(MARKER.as_bytes()));
        assert_eq!(*msg.last().unwrap(), 0);
    }
}
