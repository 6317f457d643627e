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

use super::procedure::Procedure;
use super::vm_port::{Binding, VmPort};
use super::{Check, Ctx, Outcome, Verdict, nested_guest as nested};
use crate::machine::cmdline::Accel;
use crate::spec::Cluster;
use crate::text::shell_quote;
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
        self.migrate(ctx, ctx.node(target)?, budget)
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

/// One side of the migration: the node that runs the VM, or waits for it.
struct Side<'a> {
    node: &'a str,
}

/// How often a console, a monitor's output or a migration is looked at.
const EVERY: Duration = Duration::from_millis(500);

impl Side<'_> {
    fn sh(&self, run: &mut Procedure, id: &str, label: &str, command: &str) -> Result<String> {
        run.must_stdout(id, label, Some(self.node), command)
    }

    /// QMP commands through the VM's socket, as one step; their `return`
    /// values. The connection stays open until every command has answered
    /// (up to 60 s): a loaded TCG guest can take seconds to answer, so a
    /// fixed wait is either slow or too short.
    fn qmp(&self, run: &mut Procedure, id: &str, commands: &[Value]) -> Result<Vec<Value>> {
        let what: Vec<&str> = commands
            .iter()
            .filter_map(|c| c["execute"].as_str())
            .collect();
        let label = format!("QMP {}", what.join(", "));
        let out = self.sh(run, id, &label, &qmp_script(commands))?;
        replies(self.node, &out, commands.len())
    }

    fn one(&self, run: &mut Procedure, id: &str, command: Value) -> Result<Value> {
        Ok(self.qmp(run, id, &[command])?.remove(0))
    }

    /// A monitor command whose report QEMU prints to its stdout (qemu-io
    /// does): returns what the command added to the VM's output file.
    fn hmp(&self, run: &mut Procedure, id: &str, line: &str) -> Result<String> {
        let out = format!("{DIR}/qemu.out");
        let before = self.size(run, id, &out)?;
        let command = json!({
            "execute": "human-monitor-command",
            "arguments": {"command-line": line},
        });
        self.one(run, id, command)?;
        // QEMU may flush its stdout a moment after the reply.
        let tail = format!("tail -c +{} {out}", before + 1);
        let said = |t: &str| !t.trim().is_empty();
        self.watch(
            run,
            id,
            "the monitor command's report",
            &tail,
            Duration::from_secs(5),
            said,
        )
    }

    /// Repeats `command` until its stdout satisfies `done`; that stdout.
    fn watch(
        &self,
        run: &mut Procedure,
        id: &str,
        label: &str,
        command: &str,
        limit: Duration,
        done: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let seen = |t: &str| Ok(Some(t.to_string()).filter(|t| done(t)));
        Ok(run
            .watch(id, label, Some(self.node), command, limit, EVERY, seen)?
            .0)
    }

    /// The size of a file of the VM's, in bytes.
    fn size(&self, run: &mut Procedure, id: &str, file: &str) -> Result<usize> {
        let size = self.sh(
            run,
            id,
            "the size of a file of the VM's",
            &format!("wc -c < {file}"),
        )?;
        Ok(size.trim().parse()?)
    }

    fn status(&self, run: &mut Procedure, id: &str) -> Result<String> {
        let r = self.one(run, id, json!({"execute": "query-status"}))?;
        Ok(r["status"].as_str().unwrap_or("unknown").to_string())
    }

    /// The VM's console from byte `from` on, watched until `done` holds.
    fn console(
        &self,
        run: &mut Procedure,
        id: &str,
        from: usize,
        done: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let command = format!(
            "tail -c +{} {DIR}/console.log 2>/dev/null || true",
            from + 1
        );
        let label = format!("the VM's console: {id}");
        self.watch(run, id, &label, &command, run.left(), done)
    }

    /// Kills an earlier run's VM and writes the kernel.
    fn prepare(&self, run: &mut Procedure, kernel_b64: &str) -> Result<()> {
        let command = format!(
            "pkill -f '[q]emu-system-x86_64 -name photon-vm' || true; sleep 0.5; \
             rm -rf {DIR} && mkdir -p {DIR} && echo {kernel_b64} | base64 -d > {DIR}/ticker.bin"
        );
        self.sh(
            run,
            "prepare",
            "stop an earlier VM, write the kernel",
            &command,
        )?;
        Ok(())
    }

    /// Starts the VM in the background (its stdout kept for `hmp`) and
    /// waits for its QMP socket.
    fn launch(&self, run: &mut Procedure, id: &str, spec: &str, extra: &str) -> Result<()> {
        let command = format!(
            "setsid {spec} {extra} </dev/null >{DIR}/qemu.out 2>&1 & \
             for i in $(seq 100); do test -S {DIR}/qmp.sock && exit 0; sleep 0.2; done; \
             cat {DIR}/qemu.out; exit 1"
        );
        self.sh(run, id, "start the VM", &command)?;
        Ok(())
    }

    fn stop(&self, run: &mut Procedure) -> Result<()> {
        let command = format!(
            "pkill -f '[q]emu-system-x86_64 -name photon-vm' || true; rm -f {DIR}/qmp.sock"
        );
        run.step("stop", "stop the VM", Some(self.node), &command)?;
        Ok(())
    }
}

/// A shell command that sends `commands` to the VM's QMP socket after the
/// handshake and prints every line QEMU answers.
fn qmp_script(commands: &[Value]) -> String {
    let mut lines = vec![json!({"execute": "qmp_capabilities"}).to_string()];
    lines.extend(commands.iter().map(|c| c.to_string()));
    let script: Vec<String> = lines.iter().map(|l| shell_quote(l)).collect();
    format!(
        "d=$(mktemp -d) && mkfifo $d/in && \
         {{ socat UNIX-CONNECT:{DIR}/qmp.sock STDIO <$d/in >$d/out 2>&1 & }} && \
         exec 3>$d/in && printf '%s\\n' {} >&3; i=0; \
         while n=$(grep -c -e '\"return\"' -e '\"error\"' $d/out 2>/dev/null); \
           [ \"${{n:-0}}\" -lt {} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; \
         exec 3>&-; wait; cat $d/out; rm -rf $d",
        script.join(" "),
        lines.len()
    )
}

/// The `return` values of `n` commands in what QMP answered (after the
/// handshake's), or the first error.
fn replies(node: &str, out: &str, n: usize) -> Result<Vec<Value>> {
    let replies: Vec<Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("return").is_some() || v.get("error").is_some())
        .skip(1) // qmp_capabilities
        .collect();
    if replies.len() != n {
        bail!(
            "{node}: QMP answered {} of {n} commands: {out}",
            replies.len()
        );
    }
    replies
        .into_iter()
        .map(|r| match r.get("error") {
            Some(e) => Err(anyhow!("{node}: QMP error: {e}")),
            None => Ok(r["return"].clone()),
        })
        .collect()
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

impl VmMigration {
    fn migrate(&self, ctx: &Ctx, source: &str, budget: Duration) -> Result<Verdict> {
        let started = Instant::now();
        let (src, dst) = (Side { node: source }, Side { node: &self.to });
        let dst_address = ctx
            .cluster
            .node(&self.to)
            .map(|n| n.address.to_string())
            .ok_or_else(|| anyhow!("no node {}", self.to))?;
        let kvm_in = |node: &str| -> Result<bool> {
            let g = ctx.guests.get(node)?;
            Ok(g.exec("test -w /dev/kvm", Duration::from_secs(10))?.ok())
        };
        let outer_kvm = ctx.record.accel.used == Accel::Kvm;
        let kvm = outer_kvm && kvm_in(source).unwrap_or(false) && kvm_in(&self.to).unwrap_or(false);
        let accel = if kvm { "kvm" } else { "tcg" };
        // Both sides run the same VM definition; the destination waits for
        // the migration stream instead of booting.
        let spec = format!(
            "qemu-system-x86_64 -name photon-vm -accel {accel} -m {} -nodefaults -no-user-config \
             -display none -kernel {DIR}/ticker.bin -serial file:{DIR}/console.log \
             -drive file={},format=raw,if=none,id=vol0 \
             -device virtio-blk-pci,drive=vol0 {} \
             -qmp unix:{DIR}/qmp.sock,server=on,wait=off",
            self.memory_mib,
            shell_quote(&self.volume),
            self.nic.as_ref().map(VmPort::qemu_args).unwrap_or_default(),
        );
        let central = self.nic.as_ref().map(|_| VmPort::central(ctx.cluster));
        let central = central.transpose().map_err(anyhow::Error::msg)?;
        let evidence = json!({
            "source": source,
            "destination": self.to,
            "accel": accel,
            "outer_accel": ctx.record.accel.used,
            "volume": self.volume,
            "vm_spec": spec,
        });
        let nic: Nic = self.nic.as_ref().zip(central.as_deref());
        let nodes = [source, self.to.as_str()];
        let mut verdict = Procedure::on_host(ctx, budget).conclude(
            |run| {
                let summary = self.lifecycle(run, (&src, &dst), &dst_address, &spec, nic)?;
                // Deleting the VM: its taps go, and its port must be unbound and gone.
                src.stop(run)?;
                dst.stop(run)?;
                let Some((nic, central)) = nic else {
                    return Ok(summary);
                };
                nic.delete(run, central, &nodes)?;
                Ok(format!(
                    "{summary}; its port moved by the announcement and was removed with the VM"
                ))
            },
            |run| {
                src.stop(run)?;
                dst.stop(run)?;
                match nic {
                    Some((nic, central)) => nic.remove(run, central, &nodes),
                    None => Ok(()),
                }
            },
            evidence,
        );
        verdict.evidence["seconds"] = json!(started.elapsed().as_secs_f64());
        if verdict.outcome == Outcome::Pass && !kvm {
            verdict.outcome = Outcome::Degraded;
            verdict.message = format!("{}; under TCG, not KVM (no nested KVM)", verdict.message);
        }
        Ok(verdict)
    }

    /// Create, write the volume, migrate, watch it continue, read the
    /// volume back, restart; the port follows when the VM has one.
    fn lifecycle(
        &self,
        run: &mut Procedure,
        sides: (&Side, &Side),
        to: &str,
        spec: &str,
        nic: Nic,
    ) -> Result<String> {
        let (src, dst) = sides;
        let kernel = base64::engine::general_purpose::STANDARD.encode(ticker());
        src.prepare(run, &kernel)?;
        dst.prepare(run, &kernel)?;
        if let Some((nic, central)) = nic {
            nic.create(run, central, src.node, dst.node)?;
            nic.plug(run, &[src.node, dst.node])?;
        }
        let pattern = create(run, src, spec)?;
        let (migrate_s, last, downtime) = self.move_to(run, sides, to, spec, nic)?;
        let first = resume(run, dst, last)?;
        read_back_and_restart(run, dst, &pattern)?;
        Ok(format!(
            "{} -> {}: live migration in {migrate_s:.1} s (downtime {downtime} ms), ticker resumed \
             at {first:?} after {last:?}, shared volume pattern {pattern} read back, restarted \
             after migration",
            src.node, dst.node
        ))
    }

    /// The destination waits for the stream, the source sends it, the port
    /// follows: the seconds it took, the source's last tick, the downtime.
    fn move_to(
        &self,
        run: &mut Procedure,
        (src, dst): (&Side, &Side),
        to: &str,
        spec: &str,
        nic: Nic,
    ) -> Result<(f64, char, Value)> {
        let incoming = format!("-incoming tcp:0.0.0.0:{}", self.port);
        dst.launch(run, "launch-destination", spec, &incoming)?;
        let waiting = dst.status(run, "incoming-status")?;
        if waiting != "inmigrate" {
            bail!(
                "{}: the incoming VM is {waiting:?}, not inmigrate",
                dst.node
            );
        }
        if let Some((nic, central)) = nic {
            let on_source = |b: &Binding| b.chassis == [src.node] && b.additional == [dst.node];
            let (before, _) = nic.until(
                run,
                central,
                "port-before",
                "binding on the source",
                on_source,
            )?;
            run.note_in("port", json!({ "before_migration": before }));
        }
        let moved = self.migrate_and_stop(run, src, to)?;
        let dst_status = dst.status(run, "destination-status")?;
        run.note_in("watch", json!({ "destination_status": dst_status }));
        if dst_status != "running" {
            bail!("{}: destination VM is {dst_status:?}", dst.node);
        }
        if let Some((nic, central)) = nic {
            follow_the_port(run, nic, central, dst.node)?;
        }
        Ok(moved)
    }

    /// Migrates the source's VM to the destination's stream; the seconds it
    /// took, the source's last tick and the downtime QEMU measured.
    fn migrate_and_stop(
        &self,
        run: &mut Procedure,
        src: &Side,
        dst_address: &str,
    ) -> Result<(f64, char, Value)> {
        let t = Instant::now();
        let uri = format!("tcp:{dst_address}:{}", self.port);
        src.one(
            run,
            "migrate",
            json!({"execute": "migrate", "arguments": {"uri": uri}}),
        )?;
        let (stats, _) = run.watch(
            "migration-completed",
            "migration completed",
            Some(src.node),
            &qmp_script(&[json!({"execute": "query-migrate"})]),
            run.left(),
            EVERY,
            |out| {
                let m = replies(src.node, out, 1)?.remove(0);
                match m["status"].as_str().unwrap_or("") {
                    "completed" => Ok(Some(m)),
                    "failed" | "cancelled" => bail!("migration {}: {m}", m["status"]),
                    _ => Ok(None),
                }
            },
        )?;
        let migrate_s = t.elapsed().as_secs_f64();
        let console = src.console(run, "source-console", 0, |_| true)?;
        let src_status = src.status(run, "source-status")?;
        let last = last_letter(&console)
            .ok_or_else(|| anyhow!("{}: no ticks on the console", src.node))?;
        run.note(
            "migration",
            json!({
                "seconds": migrate_s,
                "stats": &stats,
                "source_status_after": src_status,
                "source_console_tail": tail_chars(&console, 80),
            }),
        );
        if src_status != "postmigrate" {
            bail!("{}: source VM is {src_status:?} after migration", src.node);
        }
        Ok((migrate_s, last, stats["downtime"].clone()))
    }
}

/// The VM's NIC and the OVN central node, when it has one.
type Nic<'a> = Option<(&'a VmPort, &'a str)>;

/// The VM boots on the source and ticks; a pattern is written through its
/// disk to the shared volume. Returns the pattern.
fn create(run: &mut Procedure, src: &Side, spec: &str) -> Result<String> {
    let t = Instant::now();
    src.launch(run, "launch-source", spec, "")?;
    let ticking = |c: &str| c.contains(BANNER) && c.len() > BANNER.len() + 3;
    src.console(run, "boot", 0, ticking)?;
    let seconds = t.elapsed().as_secs_f64();
    let status = src.status(run, "create-status")?;
    let block = src.one(run, "create-block", json!({"execute": "query-block"}))?;
    run.note(
        "create",
        json!({ "seconds": seconds, "status": status, "block": block }),
    );
    // A pattern of this run's own: an earlier run's cannot pass for it.
    let pattern = format!("0x{:02x}", fastrand::u8(0x20..0xf0));
    let io = format!("qemu-io vol0 \"write -P {pattern} 512k 64k\"");
    let write = src.hmp(run, "volume-write", &io)?;
    run.note(
        "volume_before",
        json!({ "pattern": pattern, "write": write.trim() }),
    );
    if !write.contains("wrote 65536/65536") {
        bail!("{}: writing the volume failed: {write}", src.node);
    }
    Ok(pattern)
}

/// The destination's console must continue with the letter after the
/// source's last one: live state, not a reboot. Returns its first letter.
fn resume(run: &mut Procedure, dst: &Side, last: char) -> Result<char> {
    let resumed = dst.console(run, "resume", 0, |c| c.len() >= 2)?;
    let first = resumed
        .chars()
        .find(|c| c.is_ascii_uppercase())
        .unwrap_or('?');
    let mut seen = json!({ "destination_console": tail_chars(&resumed, 80) });
    seen["source_last_letter"] = json!(last.to_string());
    seen["destination_first_letter"] = json!(first.to_string());
    run.note_in("watch", seen);
    if resumed.contains(BANNER) || first != next_letter(last) {
        bail!(
            "{}: the VM did not continue its state: source stopped at {last:?}, \
             destination began with {resumed:?}",
            dst.node
        );
    }
    Ok(first)
}

/// The same volume read through the destination VM's disk; then a reset
/// there boots the kernel again (restart after migration).
fn read_back_and_restart(run: &mut Procedure, dst: &Side, pattern: &str) -> Result<()> {
    let io = format!("qemu-io vol0 \"read -P {pattern} 512k 64k\"");
    let read = dst.hmp(run, "volume-read", &io)?;
    let block = dst.one(run, "volume-block", json!({"execute": "query-block"}))?;
    run.note(
        "volume_after",
        json!({ "read": read.trim(), "block": block }),
    );
    if !read.contains("read 65536/65536") || read.contains("Pattern verification failed") {
        bail!(
            "{}: the volume does not hold the source's write: {read}",
            dst.node
        );
    }
    let before = dst.size(run, "restart", &format!("{DIR}/console.log"))?;
    dst.one(run, "restart", json!({"execute": "system_reset"}))?;
    let after = dst.console(run, "restarted", before, |c| c.contains(BANNER))?;
    let status = dst.status(run, "restart-status")?;
    run.note(
        "restart",
        json!({ "status": status, "console_tail": tail_chars(&after, 80) }),
    );
    Ok(())
}

/// QEMU's announcement (RARP) from the destination activates the port
/// there; then the move is finalized to the destination alone.
fn follow_the_port(run: &mut Procedure, nic: &VmPort, central: &str, dst: &str) -> Result<()> {
    let activated = format!("additional-chassis-activated={dst}");
    let (after, secs) = nic.until(run, central, "port-activated", &activated, |b| {
        b.options.contains(&activated)
    })?;
    run.note_in(
        "port",
        json!({ "after_migration": after, "activated_after_s": secs }),
    );
    nic.finalize(run, central, dst)?;
    let only_dst = |b: &Binding| b.chassis == [dst] && b.additional.is_empty();
    let (done, _) = nic.until(
        run,
        central,
        "port-finalized",
        "binding on the destination only",
        only_dst,
    )?;
    run.note_in("port", json!({ "finalized": done }));
    Ok(())
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
