//! Waiting for a booting guest: its channel (the agent where the cluster
//! asked for it, else sshd that accepts our key), then its expected systemd
//! units active. Both stop at once when `stop` reports that QEMU exited or
//! the user pressed Ctrl-C.

use super::{Channel, Endpoint, ExecOutput, Guest};
use crate::error::{ErrorKind, named};
use crate::text::shell_quote;
use crate::wait::{Probe, Wait};
use anyhow::Result;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// Why a wait should stop early: the VM died, or the user interrupted.
pub type Stop<'a> = &'a (dyn Fn() -> Option<anyhow::Error> + Sync);

/// Watches for sshd's banner on one forwarded port. A forwarded port
/// accepts connections before the guest listens (slirp), so the banner is
/// what says sshd answers.
///
/// One connection is kept open and read a second at a time, instead of a
/// new one per probe: every connection makes the guest's sshd fork and
/// re-exec a child, which under TCG on a loaded host can take longer than
/// any short read timeout. Reconnecting on each timeout then feeds the
/// guest more children than it can finish, and the banner never comes (a
/// restored six-node cluster in CI waited 600 s that way).
struct Banner {
    addr: SocketAddr,
    conn: Option<(TcpStream, std::time::Instant)>,
}

impl Banner {
    /// Past this a connection is given up (sshd's LoginGraceTime is 120 s).
    const PATIENCE: Duration = Duration::from_secs(90);

    fn new(addr: SocketAddr) -> Self {
        Banner { addr, conn: None }
    }

    /// Whether the banner has arrived; waits at most about a second.
    fn arrived(&mut self) -> bool {
        if self.conn.is_none() {
            let Ok(s) = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
            self.conn = Some((s, std::time::Instant::now()));
        }
        let (s, since) = self.conn.as_mut().expect("connected above");
        let mut buf = [0u8; 4];
        match s.peek(&mut buf) {
            Ok(4) if &buf == b"SSH-" => {
                // Free the guest's pre-auth slot before the real session.
                self.conn = None;
                true
            }
            // Less than the prefix yet: read again next time.
            Ok(n) if n > 0 && n < 4 && since.elapsed() < Self::PATIENCE => false,
            // Nothing yet: keep this connection if it is young enough.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) && since.elapsed() < Self::PATIENCE =>
            {
                false
            }
            // Closed (nothing listens yet), garbage, or too old: start over.
            _ => {
                self.conn = None;
                false
            }
        }
    }
}

/// How long an agent has to answer one hello while the guest boots.
const HELLO: Duration = Duration::from_secs(2);

/// Waits until the node answers: over its agent's port `agent` when given
/// (the agent starts before the network and sshd, and a restored guest's
/// answers at once: no SSH handshake), else, or while no agent answers,
/// over SSH once sshd accepts our key (a foreign image has no agent).
pub fn wait_for_guest(
    endpoint: &Endpoint,
    agent: Option<&Path>,
    deadline: Duration,
    console: &Path,
    stop: Stop,
) -> Result<Guest> {
    let what = match agent {
        Some(_) => format!("{}: agent or sshd", endpoint.node),
        None => format!("{}: sshd on 127.0.0.1:{}", endpoint.node, endpoint.port),
    };
    let mut banner = Banner::new(endpoint.addr());
    Wait::new(what, deadline)
        .stop_when(stop)
        .run(|| {
            if let Some(socket) = agent
                && let Ok(ch) = Channel::connect(&endpoint.node, socket, HELLO)
            {
                return Ok(Probe::Done(Guest::over_agent(endpoint, ch)));
            }
            if !banner.arrived() {
                return Ok(Probe::Pending("no SSH banner yet".into()));
            }
            Ok(match Guest::connect(endpoint, Duration::from_secs(20)) {
                Ok(g) => Probe::Done(g),
                Err(e) => Probe::Pending(format!("{e:#}")),
            })
        })
        .map_err(|e| match e.downcast::<crate::wait::WaitError>() {
            Ok(crate::wait::WaitError::TimedOut { what, after, last }) => named(
                ErrorKind::SshUnreachable,
                anyhow::anyhow!(
                    "{what}: not reachable after {} s ({last}); last console lines:\n{}",
                    after.as_secs(),
                    crate::machine::console_tail(console, 8)
                ),
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
///
/// Over the agent, systemd itself pushes each change to the agent, which
/// answers the moment all are active or one failed (`agent/units.rs`);
/// the answer also says when the last unit became active by the guest's
/// clock, which a hello then places on the host's (for the readiness delay
/// in `bench` and result.json).
/// Over SSH, or an agent that cannot watch, one command watches the units
/// in a local loop (every 100 ms, no SSH round trip). Either way a look
/// returns after at most 15 s, so that the driver can check whether QEMU
/// is still alive and the user still wants to wait.
pub fn wait_for_units(
    guest: &Guest,
    units: &[String],
    deadline: Duration,
    stop: Stop,
) -> Result<Readiness> {
    if units.is_empty() {
        return Ok(Readiness {
            known: Instant::now(),
            active: None,
        });
    }
    let what = format!("{}: units active", guest.endpoint.node);
    let watch = watch_script(units, WINDOW.as_secs() as u32);
    let mut route = Route::default();
    let (last_active, known) = Wait::new(what, deadline)
        .pause(crate::wait::Pause::Every(Duration::from_millis(10)))
        .stop_when(stop)
        .run(|| {
            let seen = route.look(guest, units, &watch)?;
            if let Some((unit, _)) = seen.states.iter().find(|(_, s)| s == "failed") {
                return Err(unit_failed(guest, unit));
            }
            let waiting: Vec<String> = seen
                .states
                .iter()
                .filter(|(_, s)| s != "active")
                .map(|(u, s)| format!("{u}={s}"))
                .collect();
            Ok(match seen.printed {
                // The watch printed no state per unit: say what it printed.
                Some(out) if seen.states.len() != units.len() => Probe::Pending(format!(
                    "the unit watch printed {:?} (stderr {:?}, exit {})",
                    out.stdout.trim(),
                    out.stderr.trim(),
                    out.code
                )),
                _ if waiting.is_empty() => Probe::Done((seen.last_active, seen.received)),
                _ => Probe::Pending(waiting.join(", ")),
            })
        })
        .map_err(|e| match e.downcast::<crate::wait::WaitError>() {
            Ok(t @ crate::wait::WaitError::TimedOut { .. }) => named(ErrorKind::UnitsTimeout, t),
            Ok(other) => crate::wait::unwrap_stopped(other.into()),
            Err(e) => e,
        })?;
    // The guest's clock against the host's, read after the wait: a
    // restored guest's monotonic clock runs on from its save. Only a
    // pushed answer has a moment to place; the systemctl loop has none.
    let active = last_active.and_then(|secs| {
        let zero = guest.agent()?.clock(Duration::from_secs(5)).ok()?;
        Some(zero + Duration::from_secs_f64(secs))
    });
    Ok(Readiness { known, active })
}

/// When a node's units were known active, and when the last of them
/// became active by the guest's own clock, placed on the host's (known
/// over the agent only).
#[derive(Debug)]
pub struct Readiness {
    pub known: Instant,
    pub active: Option<Instant>,
}

/// How many looks may find the agent's watcher not yet connected to the
/// bus before the driver stops asking it (each costs one window).
const UNCONNECTED_LOOKS: u32 = 3;

/// How long one look at the units may wait in the guest.
const WINDOW: Duration = Duration::from_secs(15);

/// One look at the units.
struct Look {
    /// Each unit's state, in the order asked.
    states: Vec<(String, String)>,
    /// The watch command's own output (SSH): what to show when it printed
    /// no state per unit.
    printed: Option<ExecOutput>,
    /// When the last unit became active on the guest's monotonic clock
    /// (over the agent).
    last_active: Option<f64>,
    /// When the driver had the answer.
    received: Instant,
}

/// Which way a node's looks go: pushed over the agent while it can, else
/// (SSH, an agent without the watch, a guest without a system bus) the
/// watch loop run as a command.
struct Route {
    /// Whether to ask the agent's watcher; false once it could not watch.
    pushed: bool,
    /// Looks so far that found the watcher not yet connected to the bus.
    unconnected: u32,
}

impl Default for Route {
    fn default() -> Self {
        Route {
            pushed: true,
            unconnected: 0,
        }
    }
}

impl Route {
    /// The units' states once all are active, one failed, or the window
    /// ran out.
    fn look(&mut self, guest: &Guest, units: &[String], watch: &str) -> Result<Look> {
        if self.pushed
            && let Some(ch) = guest.agent()
        {
            match ch.units(units, WINDOW) {
                Ok(w) => return Ok(pushed_look(guest, w)),
                Err(e) if super::breaks_session(&e) => return Err(e),
                Err(e) => self.not_pushed(guest, &e),
            }
        }
        watched_look(guest, units, watch)
    }

    /// Why the agent could not answer decides where the next look goes.
    /// Early in boot, before dbus, this look goes through systemctl and
    /// the next asks the agent again; a guest whose bus stays away (none
    /// at all) is watched with systemctl from the fourth look on.
    fn not_pushed(&mut self, guest: &Guest, e: &anyhow::Error) {
        let node = &guest.endpoint.node;
        if self.unconnected < UNCONNECTED_LOOKS
            && e.downcast_ref::<super::channel::NotConnected>().is_some()
        {
            self.unconnected += 1;
            tracing::debug!("{node}: {e:#}; this look with systemctl");
        } else {
            tracing::warn!("{node}: the agent cannot watch units ({e:#}); watching with systemctl");
            self.pushed = false;
        }
    }
}

/// The agent's answer as a look.
fn pushed_look(guest: &Guest, w: super::channel::UnitWatch) -> Look {
    for c in &w.changes {
        tracing::debug!(node = %guest.endpoint.node, "unit change {c}");
    }
    Look {
        states: w.states,
        printed: None,
        last_active: w.active_since.into_iter().reduce(f64::max),
        received: w.received,
    }
}

/// One look by the watch loop run as a command (SSH or the agent's exec).
fn watched_look(guest: &Guest, units: &[String], watch: &str) -> Result<Look> {
    let out = guest.exec(watch, Duration::from_secs(40))?;
    let states = units
        .iter()
        .zip(out.stdout.split_whitespace())
        .map(|(u, s)| (u.clone(), s.to_string()))
        .collect();
    Ok(Look {
        states,
        printed: Some(out),
        last_active: None,
        received: Instant::now(),
    })
}

/// The named error for a failed unit, with the tail of its journal.
fn unit_failed(guest: &Guest, unit: &str) -> anyhow::Error {
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
    named(
        ErrorKind::UnitFailed,
        anyhow::anyhow!(
            "{}: unit {unit} failed; its journal ends:\n{}",
            guest.endpoint.node,
            journal.trim_end()
        ),
    )
}

/// A bash loop, run in the guest, that prints the units' states (one word
/// each) once all are active, one failed, or `secs` passed. It sleeps with
/// `read -t` on a pipe that never has data: no process per pause.
fn watch_script(units: &[String], secs: u32) -> String {
    let list = units
        .iter()
        .map(|u| shell_quote(u))
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "exec 9<> <(:); end=$((SECONDS + {secs})); \
         while :; do s=$(systemctl is-active {list}); all=1; bad=0; \
         for w in $s; do [ \"$w\" = active ] || all=0; [ \"$w\" = failed ] && bad=1; done; \
         if [ $all = 1 ] || [ $bad = 1 ] || [ $SECONDS -ge $end ]; then echo $s; break; fi; \
         read -t 0.1 -u 9; done"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loop, run by a real bash with a stand-in `systemctl`, stops as
    /// soon as the units are active.
    #[test]
    fn the_watch_loop_returns_when_all_units_are_active() {
        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("systemctl");
        let count = tmp.path().join("n");
        // Active from the third look on.
        std::fs::write(
            &bin,
            format!(
                "#!/bin/sh\nn=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}\n\
                 if [ $n -ge 3 ]; then echo active; echo active; else echo active; echo activating; fi\n",
                c = count.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let script = watch_script(&["a.service".into(), "b.service".into()], 10);
        let t = std::time::Instant::now();
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(&script)
            .env("PATH", format!("{}:/usr/bin:/bin", tmp.path().display()))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "active active");
        assert_eq!(std::fs::read_to_string(&count).unwrap().trim(), "3");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    /// A slow sshd answers its first connection late: the watcher waits on
    /// that one connection instead of opening a new one every few seconds.
    #[test]
    fn a_late_banner_is_awaited_on_one_connection() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            use std::io::Write;
            let (mut s, _) = l.accept().unwrap();
            std::thread::sleep(Duration::from_millis(3500));
            s.write_all(b"SSH-2.0-late\r\n").unwrap();
            // Any second connection within the wait would show here.
            l.set_nonblocking(true).unwrap();
            l.accept().is_ok()
        });
        let mut b = Banner::new(addr);
        let t = std::time::Instant::now();
        while !b.arrived() {
            assert!(t.elapsed() < Duration::from_secs(10), "banner never seen");
        }
        assert!(t.elapsed() >= Duration::from_secs(3));
        assert!(!server.join().unwrap(), "the watcher reconnected");
    }

    /// A port that closes at once (nothing listens in the guest yet) is
    /// never taken for sshd, and the watcher tries again.
    #[test]
    fn a_closed_connection_is_not_a_banner() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            for _ in 0..2 {
                drop(l.accept().unwrap());
            }
        });
        let mut b = Banner::new(addr);
        assert!(!b.arrived());
        assert!(!b.arrived());
        server.join().unwrap();
        assert!(!b.arrived(), "nothing listens any more");
    }
}
