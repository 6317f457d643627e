//! VM hosting (the plasmavmc + coronafs part): a VM with its disk on a
//! shared NBD volume is live-migrated from one worker to another, with
//! QEMU's own migration, and must keep running there.
//!
//! The VM is a small multiboot kernel (`ticker`) that prints `BOOT` once and
//! then the letters A..Z in a loop. That makes the proof readable on the two
//! consoles: the destination's console must continue with the letter after
//! the source's last one (live CPU and memory state, not a reboot), and it
//! must print `BOOT` again after a `system_reset` there (restart after
//! migration). The disk is the same NBD export on both sides (shared
//! storage): a pattern written through the source VM's block device before
//! the migration is read back through the destination VM's after it, with
//! QEMU's `qemu-io` monitor command.
//!
//! Under TCG (no nested KVM) the migration is still real, but it is not a
//! KVM migration, so the outcome is `degraded`, never `pass`.

use super::vm_port::VmPort;
use super::{Check, Ctx, Verdict, nested_guest as nested};
use crate::guest::Guest;
use crate::machine::cmdline::Accel;
use crate::spec::Cluster;
use crate::text::shell_quote;
use crate::wait::{Pause, Probe, Wait};
use anyhow::{Result, anyhow, bail};
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// `vm_migration`: live-migrate a VM whose disk is the shared NBD `volume`
/// from the target node to `to`; it must continue there and restart there.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmMigration {
    to: String,
    volume: String,
    #[serde(default = "crate::spec::default::u32::<32>")]
    memory_mib: u32,
    #[serde(default = "crate::spec::default::u16::<4444>")]
    port: u16,
    /// The VM's NIC on an OVN logical port, moved with the VM.
    #[serde(default)]
    nic: Option<VmPort>,
}

impl Check for VmMigration {
    fn bind(&mut self, target: Option<&str>, cluster: &Cluster) -> Result<(), String> {
        if cluster.node(&self.to).is_none() || Some(self.to.as_str()) == target {
            return Err(format!(
                "`to` must name another node of the cluster, not {:?}",
                self.to
            ));
        }
        if let Some(nic) = &self.nic {
            nic.check(cluster, &[target.unwrap_or("-"), &self.to])?;
        }
        Ok(())
    }

    fn attempt(&self, ctx: &Ctx, target: Option<&str>, budget: Duration) -> Result<Verdict> {
        let req = Request {
            to: &self.to,
            volume: &self.volume,
            memory_mib: self.memory_mib,
            port: self.port,
            nic: self.nic.as_ref(),
        };
        migrate(ctx, ctx.node(target)?, &req, budget)
    }
}

const DIR: &str = "/run/photon-vm";
const BANNER: &str = "BOOT";
/// Iterations of the delay loop between two letters: a few letters per
/// second in a TCG guest inside a TCG guest.
const DELAY: u32 = 0x0008_0000;

/// The migrated VM: `BOOT`, then A..Z forever on COM1.
pub fn ticker() -> Vec<u8> {
    let code = |msg| {
        let mut c = nested::print_to_com1(msg);
        c.extend_from_slice(&[
            0xB0, 0x41, //             ticks: mov al, 'A'
            0xEE, //                   tick: out dx, al
            0xFE, 0xC0, //             inc al
            0x3C, 0x5B, //             cmp al, 'Z' + 1
            0x75, 0x02, //             jne skip
            0xB0, 0x41, //             mov al, 'A'
            0xB9, //                   skip: mov ecx, DELAY
        ]);
        c.extend_from_slice(&DELAY.to_le_bytes());
        c.extend_from_slice(&[
            0xE2, 0xFE, //             delay: loop delay
            0xEB, 0xEE, //             jmp tick
        ]);
        c
    };
    nested::multiboot(code, format!("{BANNER}\n\0").as_bytes())
}

/// One side of the migration: a node, its SSH session, its VM's files.
struct Side<'a> {
    node: String,
    guest: &'a Guest,
}

impl Side<'_> {
    fn sh(&self, command: &str, secs: u64) -> Result<String> {
        self.guest.succeed(command, Duration::from_secs(secs))
    }

    /// QMP commands through the VM's socket; their `return` values. The
    /// connection stays open until every command has answered (up to 60 s):
    /// a loaded TCG guest can take seconds to answer, so a fixed wait is
    /// either slow or too short.
    fn qmp(&self, commands: &[Value]) -> Result<Vec<Value>> {
        let mut lines = vec![json!({"execute": "qmp_capabilities"}).to_string()];
        lines.extend(commands.iter().map(|c| c.to_string()));
        let script: Vec<String> = lines.iter().map(|l| shell_quote(l)).collect();
        let out = self.sh(
            &format!(
                "d=$(mktemp -d) && mkfifo $d/in && \
                 {{ socat UNIX-CONNECT:{DIR}/qmp.sock STDIO <$d/in >$d/out 2>&1 & }} && \
                 exec 3>$d/in && printf '%s\\n' {} >&3; i=0; \
                 while n=$(grep -c -e '\"return\"' -e '\"error\"' $d/out 2>/dev/null); \
                   [ \"${{n:-0}}\" -lt {} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; \
                 exec 3>&-; wait; cat $d/out; rm -rf $d",
                script.join(" "),
                lines.len()
            ),
            90,
        )?;
        let replies: Vec<Value> = out
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v.get("return").is_some() || v.get("error").is_some())
            .skip(1) // qmp_capabilities
            .collect();
        if replies.len() != commands.len() {
            bail!(
                "{}: QMP answered {} of {} commands: {out}",
                self.node,
                replies.len(),
                commands.len()
            );
        }
        replies
            .into_iter()
            .map(|r| match r.get("error") {
                Some(e) => Err(anyhow!("{}: QMP error: {e}", self.node)),
                None => Ok(r["return"].clone()),
            })
            .collect()
    }

    fn one(&self, command: Value) -> Result<Value> {
        Ok(self.qmp(&[command])?.remove(0))
    }

    /// A monitor command whose report QEMU prints to its stdout (qemu-io
    /// does): returns what the command added to the VM's output file.
    fn hmp(&self, line: &str) -> Result<String> {
        let out = format!("{DIR}/qemu.out");
        let before: usize = self.sh(&format!("wc -c < {out}"), 10)?.trim().parse()?;
        self.one(json!({
            "execute": "human-monitor-command",
            "arguments": {"command-line": line},
        }))?;
        // QEMU may flush its stdout a moment after the reply; after 5 s,
        // what it printed (possibly nothing) is the answer.
        let mut added = String::new();
        let _ = Wait::new("monitor output", Duration::from_secs(5))
            .pause(Pause::Every(Duration::from_millis(200)))
            .run(|| {
                added = self.sh(&format!("tail -c +{} {out}", before + 1), 10)?;
                Ok(if added.trim().is_empty() {
                    Probe::Pending("no output yet".into())
                } else {
                    Probe::Done(())
                })
            });
        Ok(added)
    }

    fn status(&self) -> Result<String> {
        let r = self.one(json!({"execute": "query-status"}))?;
        Ok(r["status"].as_str().unwrap_or("unknown").to_string())
    }

    fn console(&self) -> Result<String> {
        self.sh(&format!("cat {DIR}/console.log 2>/dev/null || true"), 10)
    }

    /// Polls the console until `done` says so, or `budget` runs out.
    fn wait_console(
        &self,
        budget: Duration,
        done: impl Fn(&str) -> bool,
        what: &str,
    ) -> Result<String> {
        Wait::new(format!("{}: {what}", self.node), budget)
            .pause(Pause::Every(Duration::from_millis(500)))
            .run(|| {
                let text = self.console()?;
                Ok(if done(&text) {
                    Probe::Done(text)
                } else {
                    Probe::Pending(format!("console: {text:?}"))
                })
            })
    }

    /// Kills an earlier run's VM and writes the kernel.
    fn prepare(&self, kernel_b64: &str) -> Result<()> {
        self.sh(
            &format!(
                "pkill -f '[q]emu-system-x86_64 -name photon-vm' || true; sleep 0.5; \
                 rm -rf {DIR} && mkdir -p {DIR} && echo {kernel_b64} | base64 -d > {DIR}/ticker.bin"
            ),
            30,
        )?;
        Ok(())
    }

    /// Starts the VM in the background (its stdout kept for `hmp`) and
    /// waits for its QMP socket.
    fn launch(&self, spec: &str, extra: &str) -> Result<()> {
        self.sh(
            &format!(
                "setsid {spec} {extra} </dev/null >{DIR}/qemu.out 2>&1 & \
                 for i in $(seq 100); do test -S {DIR}/qmp.sock && exit 0; sleep 0.2; done; \
                 cat {DIR}/qemu.out; exit 1"
            ),
            60,
        )?;
        Ok(())
    }

    fn stop(&self) {
        let _ = self.guest.exec(
            &format!(
                "pkill -f '[q]emu-system-x86_64 -name photon-vm' || true; rm -f {DIR}/qmp.sock"
            ),
            Duration::from_secs(15),
        );
    }
}

/// The letter after `c` in the ticker's A..Z cycle.
fn next_letter(c: char) -> char {
    if c == 'Z' {
        'A'
    } else {
        ((c as u8) + 1) as char
    }
}

/// The last tick on a console (the ticker's state when it stopped): the
/// last A..Z letter after the last banner.
fn last_letter(console: &str) -> Option<char> {
    let ticks = console.rsplit(BANNER).next().unwrap_or(console);
    ticks.chars().rev().find(|c| c.is_ascii_uppercase())
}

pub struct Request<'a> {
    pub to: &'a str,
    pub volume: &'a str,
    pub memory_mib: u32,
    pub port: u16,
    pub nic: Option<&'a VmPort>,
}

pub fn migrate(ctx: &Ctx, source: &str, req: &Request, budget: Duration) -> Result<Verdict> {
    let started = Instant::now();
    let src_guest = ctx.guests.get(source)?;
    let dst_guest = ctx.guests.get(req.to)?;
    let src = Side {
        node: source.to_string(),
        guest: &src_guest,
    };
    let dst = Side {
        node: req.to.to_string(),
        guest: &dst_guest,
    };
    let dst_address = ctx
        .cluster
        .node(req.to)
        .map(|n| n.address.to_string())
        .ok_or_else(|| anyhow!("no node {}", req.to))?;
    let outer_kvm = ctx.record.accel.used == Accel::Kvm;
    let kvm_in = |g: &Guest| {
        g.exec("test -w /dev/kvm", Duration::from_secs(10))
            .map(|o| o.ok())
            .unwrap_or(false)
    };
    let accel = if outer_kvm && kvm_in(&src_guest) && kvm_in(&dst_guest) {
        "kvm"
    } else {
        "tcg"
    };
    let kernel = base64::engine::general_purpose::STANDARD.encode(ticker());
    // Both sides run the same VM definition; the destination waits for the
    // migration stream instead of booting.
    let spec = format!(
        "qemu-system-x86_64 -name photon-vm -accel {accel} -m {} -nodefaults -no-user-config \
         -display none -kernel {DIR}/ticker.bin -serial file:{DIR}/console.log \
         -drive file={},format=raw,if=none,id=vol0 \
         -device virtio-blk-pci,drive=vol0 {} \
         -qmp unix:{DIR}/qmp.sock,server=on,wait=off",
        req.memory_mib,
        shell_quote(req.volume),
        req.nic.map(VmPort::qemu_args).unwrap_or_default(),
    );
    let central = match req.nic {
        Some(_) => Some(
            ctx.guests
                .get(&VmPort::central(ctx.cluster).map_err(anyhow::Error::msg)?)?,
        ),
        None => None,
    };
    let mut evidence = json!({
        "source": source,
        "destination": req.to,
        "accel": accel,
        "outer_accel": ctx.record.accel.used,
        "volume": req.volume,
        "vm_spec": spec,
    });
    let result = run(
        &src,
        &dst,
        &dst_address,
        req,
        &spec,
        &kernel,
        &mut evidence,
        budget,
        central.as_deref(),
    );
    src.stop();
    dst.stop();
    // Deleting the VM: its taps go, and its port must be unbound and gone.
    let result = match (req.nic, central.as_deref()) {
        (Some(nic), Some(central)) => {
            let deleted = nic.delete(central, &[&src_guest, &dst_guest]);
            match deleted {
                Ok(ev) => {
                    evidence["port"]["deleted"] = ev;
                    result.map(|s| {
                        format!(
                            "{s}; its port moved by the announcement and was removed with the VM"
                        )
                    })
                }
                Err(e) => result.and(Err(e)),
            }
        }
        _ => result,
    };
    evidence["seconds"] = json!(started.elapsed().as_secs_f64());
    match result {
        Err(e) => Ok(Verdict::fail(format!("{e:#}"), evidence)),
        Ok(summary) if accel == "kvm" => Ok(Verdict::pass(summary, evidence)),
        Ok(summary) => Ok(Verdict::degraded(
            format!("{summary}; under TCG, not KVM (no nested KVM)"),
            evidence,
        )),
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    src: &Side,
    dst: &Side,
    dst_address: &str,
    req: &Request,
    spec: &str,
    kernel: &str,
    evidence: &mut Value,
    budget: Duration,
    central: Option<&Guest>,
) -> Result<String> {
    let until = Instant::now() + budget;
    let left = || until.saturating_duration_since(Instant::now());
    src.prepare(kernel)?;
    dst.prepare(kernel)?;
    let nic = req.nic.zip(central);
    if let Some((nic, central)) = nic {
        evidence["port"]["create"] = nic.create(central, &src.node, &dst.node)?;
        evidence["port"]["plug"] =
            json!({ &src.node: nic.plug(src.guest)?, &dst.node: nic.plug(dst.guest)? });
    }

    // Create: the VM boots on the source and ticks.
    let t = Instant::now();
    src.launch(spec, "")?;
    src.wait_console(
        left(),
        |c| c.contains(BANNER) && c.len() > BANNER.len() + 3,
        "boot",
    )?;
    evidence["create"] = json!({
        "seconds": t.elapsed().as_secs_f64(),
        "status": src.status()?,
        "block": src.one(json!({"execute": "query-block"}))?,
    });

    // Shared storage: a pattern written through the source VM's disk.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let pattern = format!("0x{:02x}", 0x20 + (nanos % 0xd0));
    let write = src.hmp(&format!("qemu-io vol0 \"write -P {pattern} 512k 64k\""))?;
    evidence["volume_before"] = json!({ "pattern": pattern, "write": write.trim() });
    if !write.contains("wrote 65536/65536") {
        bail!("{}: writing the volume failed: {write}", src.node);
    }

    // The destination waits for the stream.
    dst.launch(spec, &format!("-incoming tcp:0.0.0.0:{}", req.port))?;
    let waiting = dst.status()?;
    if waiting != "inmigrate" {
        bail!(
            "{}: the incoming VM is {waiting:?}, not inmigrate",
            dst.node
        );
    }
    if let Some((nic, central)) = nic {
        let (before, _) = nic.until(
            central,
            left().min(Duration::from_secs(60)),
            "binding on the source",
            |b| b.chassis == [src.node.clone()] && b.additional == [dst.node.clone()],
        )?;
        evidence["port"]["before_migration"] = before;
    }

    // Migrate.
    let t = Instant::now();
    src.one(json!({
        "execute": "migrate",
        "arguments": {"uri": format!("tcp:{dst_address}:{}", req.port)},
    }))?;
    let stats = Wait::new("migration completed", left())
        .pause(Pause::Every(Duration::from_millis(500)))
        .run(|| {
            let m = src.one(json!({"execute": "query-migrate"}))?;
            match m["status"].as_str().unwrap_or("") {
                "completed" => Ok(Probe::Done(m)),
                "failed" | "cancelled" => bail!("migration {}: {m}", m["status"]),
                _ => Ok(Probe::Pending(m.to_string())),
            }
        })?;
    let migrate_s = t.elapsed().as_secs_f64();
    let src_console = src.console()?;
    let src_status = src.status()?;
    let last = last_letter(&src_console)
        .ok_or_else(|| anyhow!("{}: no ticks on the console", src.node))?;
    evidence["migration"] = json!({
        "seconds": migrate_s,
        "stats": stats,
        "source_status_after": src_status,
        "source_console_tail": tail_chars(&src_console, 80),
    });
    if src_status != "postmigrate" {
        bail!("{}: source VM is {src_status:?} after migration", src.node);
    }

    // The VM runs on the destination, continuing where it stopped.
    let dst_status = dst.status()?;
    if dst_status != "running" {
        bail!("{}: destination VM is {dst_status:?}", dst.node);
    }
    if let Some((nic, central)) = nic {
        // QEMU's announcement (RARP) from the destination activates it there.
        let activated = format!("additional-chassis-activated={}", dst.node);
        let (after, secs) = nic.until(
            central,
            left().min(Duration::from_secs(60)),
            &activated,
            |b| b.options.contains(&activated),
        )?;
        evidence["port"]["after_migration"] = after;
        evidence["port"]["activated_after_s"] = json!(secs);
        nic.finalize(central, &dst.node)?;
        let (done, _) = nic.until(
            central,
            left().min(Duration::from_secs(60)),
            "binding on the destination only",
            |b| b.chassis == [dst.node.clone()] && b.additional.is_empty(),
        )?;
        evidence["port"]["finalized"] = done;
    }
    let resumed = dst.wait_console(left(), |c| c.len() >= 2, "resume")?;
    let first = resumed
        .chars()
        .find(|c| c.is_ascii_uppercase())
        .unwrap_or('?');
    evidence["watch"] = json!({
        "destination_status": dst_status,
        "source_last_letter": last.to_string(),
        "destination_first_letter": first.to_string(),
        "destination_console": tail_chars(&resumed, 80),
    });
    if resumed.contains(BANNER) || first != next_letter(last) {
        bail!(
            "{}: the VM did not continue its state: source stopped at {last:?}, \
             destination began with {resumed:?}",
            dst.node
        );
    }

    // The same volume, read through the destination VM's disk.
    let read = dst.hmp(&format!("qemu-io vol0 \"read -P {pattern} 512k 64k\""))?;
    evidence["volume_after"] = json!({
        "read": read.trim(),
        "block": dst.one(json!({"execute": "query-block"}))?,
    });
    if !read.contains("read 65536/65536") || read.contains("Pattern verification failed") {
        bail!(
            "{}: the volume does not hold the source's write: {read}",
            dst.node
        );
    }

    // Restart after migration: a reset boots the kernel again there.
    let before = dst.console()?.len();
    dst.one(json!({"execute": "system_reset"}))?;
    let after = dst.wait_console(
        left(),
        |c| c.get(before..).is_some_and(|new| new.contains(BANNER)),
        "restart",
    )?;
    evidence["restart"] = json!({
        "status": dst.status()?,
        "console_tail": tail_chars(&after, 80),
    });
    Ok(format!(
        "{} -> {}: live migration in {migrate_s:.1} s (downtime {} ms), ticker resumed at {first:?} \
         after {last:?}, shared volume pattern {pattern} read back, restarted after migration",
        src.node, dst.node, evidence["migration"]["stats"]["downtime"]
    ))
}

fn tail_chars(s: &str, n: usize) -> String {
    let chars: Vec<char> = s.chars().collect();
    chars[chars.len().saturating_sub(n)..].iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ticker_jumps_land_on_their_labels() {
        let img = ticker();
        // header (0x20) + print (17 bytes) = the tick loop at 0x31.
        assert_eq!(&img[0x31..0x33], &[0xB0, 0x41]);
        // `jmp tick` at 0x43 goes back to 0x33 (rel8 from 0x45).
        assert_eq!(img[0x43], 0xEB);
        assert_eq!(0x45i32 + (img[0x44] as i8) as i32, 0x33);
        // `jne skip` at 0x38 lands on `mov ecx` at 0x3C.
        assert_eq!(0x3Ai32 + img[0x39] as i32, 0x3C);
        assert_eq!(img[0x3C], 0xB9);
        assert!(img.ends_with(b"BOOT\n\0"));
    }

    #[test]
    fn letters_cycle() {
        assert_eq!(next_letter('A'), 'B');
        assert_eq!(next_letter('Z'), 'A');
        assert_eq!(last_letter("BOOT\nABCD"), Some('D'));
        assert_eq!(last_letter("BOOT\n"), None);
    }
}
