//! Waiting for a booting guest: sshd that accepts our key, then its
//! expected systemd units active. Both stop at once when `stop` reports
//! that QEMU exited or the user pressed Ctrl-C.

use super::{Endpoint, Guest};
use crate::text::shell_quote;
use crate::wait::{Probe, Wait};
use anyhow::{Result, bail};
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

/// Why a wait should stop early: the VM died, or the user interrupted.
pub type Stop<'a> = &'a (dyn Fn() -> Option<anyhow::Error> + Sync);

/// Whether sshd itself answers: a forwarded port accepts connections before
/// the guest listens (slirp), so wait for the SSH banner, which is cheap.
fn banner_ready(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).is_ok() && &buf == b"SSH-"
}

/// Waits until the node's sshd accepts our key.
pub fn wait_for_ssh(
    endpoint: &Endpoint,
    deadline: Duration,
    console: &Path,
    stop: Stop,
) -> Result<Guest> {
    let what = format!("{}: sshd on 127.0.0.1:{}", endpoint.node, endpoint.port);
    Wait::new(what, deadline)
        .stop_when(stop)
        .run(|| {
            if !banner_ready(endpoint.addr()) {
                return Ok(Probe::Pending("no SSH banner yet".into()));
            }
            Ok(match Guest::connect(endpoint, Duration::from_secs(20)) {
                Ok(g) => Probe::Done(g),
                Err(e) => Probe::Pending(format!("{e:#}")),
            })
        })
        .map_err(|e| match e.downcast::<crate::wait::WaitError>() {
            Ok(crate::wait::WaitError::TimedOut { what, after, last }) => anyhow::anyhow!(
                "{what}: not reachable after {} s ({last}); last console lines:\n{}",
                after.as_secs(),
                crate::machine::console_tail(console, 8)
            ),
            Ok(other) => crate::wait::unwrap_stopped(other.into()),
            Err(e) => e,
        })
}

/// The state of each expected unit, as `systemctl is-active` prints it.
pub fn unit_states(guest: &Guest, units: &[String]) -> Result<Vec<(String, String)>> {
    if units.is_empty() {
        return Ok(Vec::new());
    }
    let out = guest.exec(
        &format!("systemctl is-active {}", units.join(" ")),
        Duration::from_secs(20),
    )?;
    let states: Vec<&str> = out.stdout.lines().collect();
    Ok(units
        .iter()
        .enumerate()
        .map(|(i, u)| (u.clone(), states.get(i).unwrap_or(&"unknown").to_string()))
        .collect())
}

/// Waits until every unit is active. A unit that fails ends the wait at
/// once, with the tail of its journal in the error.
pub fn wait_for_units(
    guest: &Guest,
    units: &[String],
    deadline: Duration,
    stop: Stop,
) -> Result<()> {
    let what = format!("{}: units active", guest.endpoint.node);
    Wait::new(what, deadline)
        .pause(crate::wait::Pause::Every(Duration::from_millis(500)))
        .stop_when(stop)
        .run(|| {
            let states = unit_states(guest, units)?;
            if let Some((unit, _)) = states.iter().find(|(_, s)| s == "failed") {
                let journal = guest
                    .exec(
                        &format!(
                            "journalctl -u {} -n 25 --no-pager -o short-monotonic",
                            shell_quote(unit)
                        ),
                        Duration::from_secs(20),
                    )
                    .map(|o| o.stdout)
                    .unwrap_or_default();
                bail!(
                    "{}: unit {unit} failed; its journal ends:\n{}",
                    guest.endpoint.node,
                    journal.trim_end()
                );
            }
            let waiting: Vec<String> = states
                .iter()
                .filter(|(_, s)| s != "active")
                .map(|(u, s)| format!("{u}={s}"))
                .collect();
            Ok(if waiting.is_empty() {
                Probe::Done(())
            } else {
                Probe::Pending(waiting.join(", "))
            })
        })
        .map_err(crate::wait::unwrap_stopped)
}
