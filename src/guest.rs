//! Reaching into a guest over SSH: one reused ssh2 session per node, exec
//! with a deadline, and the waits for sshd and for systemd units.
//!
//! A fresh `ssh` costs about a second per command against a TCG guest (key
//! exchange); a kept session opens a channel per command instead. ssh2
//! blocks, so every call runs with `Session::set_timeout` set: an outer
//! timeout could not stop a blocked handshake.

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use ssh2::Session;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How the driver reaches one node.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub node: String,
    pub port: u16,
    pub key: PathBuf,
    /// The node's host public key line (`ssh-ed25519 AAAA... comment`).
    pub host_key: String,
}

impl Endpoint {
    fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }
}

/// A connected guest. The session is shared behind a mutex: one command at a
/// time per node, each on its own channel.
pub struct Guest {
    pub endpoint: Endpoint,
    session: Mutex<Session>,
}

#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl ExecOutput {
    pub fn ok(&self) -> bool {
        self.code == 0
    }
}

impl Guest {
    /// Connects and authenticates, verifying the host key we gave the node.
    pub fn connect(endpoint: &Endpoint, timeout: Duration) -> Result<Guest> {
        let tcp = TcpStream::connect_timeout(&endpoint.addr(), timeout)
            .with_context(|| format!("{}: connecting to {}", endpoint.node, endpoint.addr()))?;
        let mut session = Session::new()?;
        session.set_timeout(timeout.as_millis() as u32);
        session.set_tcp_stream(tcp);
        session
            .handshake()
            .with_context(|| format!("{}: SSH handshake", endpoint.node))?;
        verify_host_key(&session, endpoint)?;
        session
            .userauth_pubkey_file("root", None, &endpoint.key, None)
            .with_context(|| format!("{}: SSH key authentication as root", endpoint.node))?;
        Ok(Guest {
            endpoint: endpoint.clone(),
            session: Mutex::new(session),
        })
    }

    /// Runs `command` through the guest's shell; fails if it does not
    /// finish within `deadline`.
    pub fn exec(&self, command: &str, deadline: Duration) -> Result<ExecOutput> {
        let session = self
            .session
            .lock()
            .map_err(|_| anyhow!("session poisoned"))?;
        session.set_timeout(deadline.as_millis().max(1) as u32);
        let run = || -> Result<ExecOutput> {
            let mut ch = session.channel_session()?;
            ch.exec(command)?;
            let mut stdout = String::new();
            ch.read_to_string(&mut stdout)?;
            let mut stderr = String::new();
            ch.stderr().read_to_string(&mut stderr)?;
            ch.wait_close()?;
            Ok(ExecOutput {
                code: ch.exit_status()?,
                stdout,
                stderr,
            })
        };
        run().with_context(|| {
            format!(
                "{}: `{command}` did not complete within {:.0} s",
                self.endpoint.node,
                deadline.as_secs_f64()
            )
        })
    }

    /// Asks the node's sshd to open a TCP connection to `host:port`: a
    /// connect made from inside the guest, without a client program there.
    pub fn tcp_connect(&self, host: &str, port: u16, deadline: Duration) -> Result<()> {
        let session = self
            .session
            .lock()
            .map_err(|_| anyhow!("session poisoned"))?;
        session.set_timeout(deadline.as_millis().max(1) as u32);
        let mut ch = session
            .channel_direct_tcpip(host, port, None)
            .with_context(|| format!("{}: connect to {host}:{port}", self.endpoint.node))?;
        let _ = ch.close();
        Ok(())
    }

    /// Runs `command` and fails unless it exits 0.
    pub fn succeed(&self, command: &str, deadline: Duration) -> Result<String> {
        let out = self.exec(command, deadline)?;
        if !out.ok() {
            bail!(
                "{}: `{command}` exited {}: {}{}",
                self.endpoint.node,
                out.code,
                out.stdout.trim(),
                out.stderr.trim()
            );
        }
        Ok(out.stdout)
    }
}

fn verify_host_key(session: &Session, endpoint: &Endpoint) -> Result<()> {
    let (presented, _) = session
        .host_key()
        .ok_or_else(|| anyhow!("{}: server presented no host key", endpoint.node))?;
    let expected = endpoint
        .host_key
        .split_whitespace()
        .nth(1)
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .ok_or_else(|| anyhow!("{}: malformed expected host key", endpoint.node))?;
    if presented != expected.as_slice() {
        bail!(
            "{}: host key on 127.0.0.1:{} is not the one this cluster gave the node; \
             another process may own the port",
            endpoint.node,
            endpoint.port
        );
    }
    Ok(())
}

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

/// Why a wait should stop early: the VM died, or the user interrupted.
pub type Abort<'a> = &'a (dyn Fn() -> Option<anyhow::Error> + Sync);

/// Waits until the node's sshd accepts our key, stopping at once if
/// `abort` reports that QEMU exited or the user pressed Ctrl-C.
pub fn wait_for_ssh(
    endpoint: &Endpoint,
    deadline: Duration,
    console: &Path,
    abort: Abort,
) -> Result<Guest> {
    let start = Instant::now();
    let mut last_err = String::from("no SSH banner yet");
    loop {
        if let Some(e) = abort() {
            return Err(e);
        }
        if banner_ready(endpoint.addr()) {
            match Guest::connect(endpoint, Duration::from_secs(20)) {
                Ok(g) => return Ok(g),
                Err(e) => last_err = format!("{e:#}"),
            }
        }
        if start.elapsed() > deadline {
            bail!(
                "{}: sshd not reachable on 127.0.0.1:{} after {} s ({last_err}); last console lines:\n{}",
                endpoint.node,
                endpoint.port,
                deadline.as_secs(),
                crate::machine::console_tail(console, 8)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
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
    abort: Abort,
) -> Result<()> {
    let start = Instant::now();
    loop {
        if let Some(e) = abort() {
            return Err(e);
        }
        let states = unit_states(guest, units)?;
        if let Some((unit, _)) = states.iter().find(|(_, s)| s == "failed") {
            let journal = guest
                .exec(
                    &format!("journalctl -u {unit} -n 25 --no-pager -o short-monotonic"),
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
        if waiting.is_empty() {
            return Ok(());
        }
        if start.elapsed() > deadline {
            bail!(
                "{}: units not active after {} s: {}",
                guest.endpoint.node,
                deadline.as_secs(),
                waiting.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
