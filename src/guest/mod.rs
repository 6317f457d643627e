//! Reaching into a guest over SSH: one reused ssh2 session per node, exec
//! with a deadline (here), the session pool that lanes share (`pool`), and
//! the waits for sshd and for systemd units (`ready`).
//!
//! A fresh `ssh` costs about a second per command against a TCG guest (key
//! exchange); a kept session opens a channel per command instead. ssh2
//! blocks, so every call runs with `Session::set_timeout` set: an outer
//! timeout could not stop a blocked handshake.

use anyhow::{Result, anyhow};
use base64::Engine;
use ssh2::Session;
use std::error::Error as StdError;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

mod channel;
mod pool;
mod ready;
mod shell;

pub use crate::state::ChannelKind;
pub use channel::Channel;
pub use pool::{GuestPool, connect, connect_ssh, endpoint, openssh};
pub use ready::{Readiness, Stop, unit_states, wait_for_guest, wait_for_units};

type Source = Box<dyn StdError + Send + Sync>;

/// libssh2's LIBSSH2_ERROR_CHANNEL_FAILURE: the server refused the channel.
const CHANNEL_FAILURE: i32 = -21;

/// What can go wrong between the driver and a guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The SSH connection could not be made or authenticated.
    #[error("{node}: {step}")]
    Connect {
        node: String,
        step: String,
        #[source]
        source: Source,
    },
    #[error(
        "{node}: host key on 127.0.0.1:{port} is not the one this cluster gave the node; \
         another process may own the port"
    )]
    HostKey { node: String, port: u16 },
    /// The session broke, or a command outlived its deadline.
    #[error("{node}: `{command}` did not complete within {secs:.0} s")]
    Transport {
        node: String,
        command: String,
        secs: f64,
        #[source]
        source: Source,
    },
    /// The control channel to the node's agent broke (src/guest/channel.rs).
    #[error("{node}: the agent channel broke: {why}")]
    Channel { node: String, why: String },
    /// The agent ended a command at its deadline; the channel is fine.
    #[error("{node}: `{command}` did not complete within {secs:.0} s (ended by the agent)")]
    Deadline {
        node: String,
        command: String,
        secs: f64,
    },
    #[error("{node}: QEMU (pid {pid}) is not running; see {console}")]
    NotRunning {
        node: String,
        pid: i32,
        console: String,
    },
    #[error("no node {node:?} in the running cluster (nodes: {nodes})")]
    UnknownNode { node: String, nodes: String },
}

impl GuestError {
    /// Whether the session this came from is unusable: the next attempt
    /// must open a new one.
    pub fn breaks_session(&self) -> bool {
        matches!(
            self,
            GuestError::Connect { .. } | GuestError::Transport { .. } | GuestError::Channel { .. }
        )
    }
}

/// Whether `e` (anywhere in its chain) says the node cannot answer again
/// in this run: its QEMU is gone, or it is not a node of the cluster. A
/// check that meets it fails at once instead of retrying to its deadline.
pub fn is_final(e: &anyhow::Error) -> bool {
    guest_errors(e).any(|g| {
        matches!(
            g,
            GuestError::NotRunning { .. } | GuestError::UnknownNode { .. }
        )
    })
}

/// Whether `e` (anywhere in its chain) broke a session.
pub fn breaks_session(e: &anyhow::Error) -> bool {
    guest_errors(e).any(GuestError::breaks_session)
}

/// The guest errors in `e`'s chain, also those a name wraps (a broken
/// channel is `named`, and a plain chain skips what a name wraps).
fn guest_errors(e: &anyhow::Error) -> impl Iterator<Item = &GuestError> {
    crate::error::causes(e)
        .into_iter()
        .filter_map(|c| c.downcast_ref::<GuestError>())
}

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
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }
}

/// A connected guest, over its agent's channel when it answers (several
/// commands at once), else over SSH: one session shared behind a mutex, one
/// command at a time per node, written to the node's long-lived shell
/// (`shell`).
pub struct Guest {
    pub endpoint: Endpoint,
    transport: Transport,
}

enum Transport {
    Ssh(Mutex<Connection>),
    Agent(Channel),
}

/// The session and the shell that runs on it; both are used under one lock
/// (libssh2 sessions are not safe to share between threads).
struct Connection {
    session: Session,
    shell: Option<shell::Shell>,
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
        let failed = |step: String| {
            let node = endpoint.node.clone();
            move |e: Source| GuestError::Connect {
                node,
                step,
                source: e,
            }
        };
        let tcp = TcpStream::connect_timeout(&endpoint.addr(), timeout)
            .map_err(|e| failed(format!("connecting to {}", endpoint.addr()))(e.into()))?;
        let mut session = Session::new().map_err(|e| failed("SSH session".into())(e.into()))?;
        session.set_timeout(timeout.as_millis() as u32);
        session.set_tcp_stream(tcp);
        session
            .handshake()
            .map_err(|e| failed("SSH handshake".into())(e.into()))?;
        verify_host_key(&session, endpoint)?;
        session
            .userauth_pubkey_file("root", None, &endpoint.key, None)
            .map_err(|e| failed("SSH key authentication as root".into())(e.into()))?;
        Ok(Guest {
            endpoint: endpoint.clone(),
            transport: Transport::Ssh(Mutex::new(Connection {
                session,
                shell: None,
            })),
        })
    }

    /// A guest driven over its agent's channel.
    pub fn over_agent(endpoint: &Endpoint, channel: Channel) -> Guest {
        Guest {
            endpoint: endpoint.clone(),
            transport: Transport::Agent(channel),
        }
    }

    /// Which way this guest is reached.
    pub fn channel(&self) -> ChannelKind {
        match self.transport {
            Transport::Ssh(_) => ChannelKind::Ssh,
            Transport::Agent(_) => ChannelKind::Agent,
        }
    }

    /// The agent's channel, if this guest is reached over it (file copies).
    pub fn agent(&self) -> Option<&Channel> {
        match &self.transport {
            Transport::Agent(c) => Some(c),
            Transport::Ssh(_) => None,
        }
    }

    fn ssh(&self) -> Result<std::sync::MutexGuard<'_, Connection>> {
        match &self.transport {
            Transport::Ssh(s) => s.lock().map_err(|_| anyhow!("session poisoned")),
            Transport::Agent(_) => unreachable!("callers dispatch on the transport first"),
        }
    }

    /// Runs `command` again until its success equals `want`, through the
    /// one wait helper (so Ctrl-C and `--timeout` end it), at most until
    /// `deadline`: the last output and the seconds it took.
    pub fn exec_until(
        &self,
        command: &str,
        want: bool,
        deadline: std::time::Instant,
        pause: Duration,
    ) -> Result<(ExecOutput, f64)> {
        let started = std::time::Instant::now();
        let still = if want { "failing" } else { "succeeding" };
        let out = crate::wait::Wait::new(
            format!(
                "{}: `{command}` {}",
                self.endpoint.node,
                if want { "to succeed" } else { "to fail" }
            ),
            Duration::ZERO,
        )
        .until(deadline)
        .pause(crate::wait::Pause::Every(pause))
        .run(|| {
            let out = self.exec(command, Duration::from_secs(30))?;
            Ok(if out.ok() == want {
                crate::wait::Probe::Done(out)
            } else {
                let text = format!("{}{}", out.stdout, out.stderr);
                let last = text.lines().rev().find(|l| !l.trim().is_empty());
                crate::wait::Probe::Pending(format!(
                    "still {still}: {}",
                    last.unwrap_or("no output")
                ))
            })
        })?;
        Ok((out, started.elapsed().as_secs_f64()))
    }

    /// Runs `command` through the guest's shell; fails if it does not
    /// finish within `deadline`. A command that outlives its deadline ends
    /// the node's shell (the next command starts a new one), and its error
    /// breaks the session.
    pub fn exec(&self, command: &str, deadline: Duration) -> Result<ExecOutput> {
        if let Transport::Agent(ch) = &self.transport {
            return ch.exec(command, deadline);
        }
        let mut conn = self.ssh()?;
        let conn = &mut *conn;
        conn.session.set_timeout(deadline.as_millis().max(1) as u32);
        let until = std::time::Instant::now() + deadline;
        // Work that began before Ctrl-C or --timeout ends with them; what
        // runs after them (a teardown, the evidence) keeps its own deadline.
        let stoppable = !crate::interrupted();
        let mut run = || -> Result<ExecOutput, Source> {
            if conn.shell.is_none() {
                conn.shell = Some(shell::Shell::open(&conn.session)?);
            }
            let shell = conn.shell.as_mut().expect("opened");
            let out = shell.run(&conn.session, command, until, stoppable)?;
            Ok(ExecOutput {
                code: out.code,
                stdout: out.stdout,
                stderr: out.stderr,
            })
        };
        let t = std::time::Instant::now();
        let result = run();
        let secs = t.elapsed().as_secs_f64();
        match &result {
            Ok(o) => tracing::debug!(
                "{}: `{command}` exited {} in {secs:.2} s ({} bytes out, {} err)",
                self.endpoint.node,
                o.code,
                o.stdout.len(),
                o.stderr.len()
            ),
            Err(e) => tracing::debug!(
                "{}: `{command}` failed after {secs:.2} s: {e}",
                self.endpoint.node
            ),
        }
        if result.is_err() {
            conn.shell = None;
        }
        if let Err(e) = &result
            && e.is::<shell::Stopped>()
        {
            return Err(crate::stop_error());
        }
        Ok(result.map_err(|source| GuestError::Transport {
            node: self.endpoint.node.clone(),
            command: command.to_string(),
            secs: deadline.as_secs_f64(),
            source,
        })?)
    }

    /// Asks the node's sshd to open a TCP connection to `host:port`: a
    /// connect made from inside the guest, without a client program there.
    /// The inner result is the connect's own (refused: `Err` with sshd's
    /// reason); the outer error means the session itself failed.
    pub fn tcp_connect(
        &self,
        host: &str,
        port: u16,
        deadline: Duration,
    ) -> Result<Result<(), String>> {
        if let Transport::Agent(ch) = &self.transport {
            return ch.tcp_connect(host, port, deadline);
        }
        let conn = self.ssh()?;
        conn.session.set_timeout(deadline.as_millis().max(1) as u32);
        match conn.session.channel_direct_tcpip(host, port, None) {
            Ok(mut ch) => {
                let _ = ch.close();
                Ok(Ok(()))
            }
            // sshd answered that its own connect failed: the session is fine.
            Err(e) if e.code() == ssh2::ErrorCode::Session(CHANNEL_FAILURE) => {
                Ok(Err(e.message().to_string()))
            }
            Err(e) => Err(GuestError::Transport {
                node: self.endpoint.node.clone(),
                command: format!("direct-tcpip {host}:{port}"),
                secs: deadline.as_secs_f64(),
                source: e.into(),
            }
            .into()),
        }
    }

    /// Sets the guest's wall clock to the host's now: over the agent in
    /// its own process, else (SSH, or an agent without the request) with
    /// `date`.
    pub fn set_clock(&self, deadline: Duration) -> Result<()> {
        if let Transport::Agent(ch) = &self.transport
            && ch.set_clock(chrono::Utc::now(), deadline)?
        {
            return Ok(());
        }
        self.succeed(&set_clock_command(chrono::Utc::now()), deadline)
            .map(drop)
    }

    /// Runs `command` and fails unless it exits 0.
    pub fn succeed(&self, command: &str, deadline: Duration) -> Result<String> {
        let out = self.exec(command, deadline)?;
        if !out.ok() {
            anyhow::bail!(
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
        return Err(GuestError::HostKey {
            node: endpoint.node.clone(),
            port: endpoint.port,
        }
        .into());
    }
    Ok(())
}

/// The shell command that sets a guest's clock to `now`.
fn set_clock_command(now: chrono::DateTime<chrono::Utc>) -> String {
    format!(
        "date -u -s @{}.{:09} >/dev/null",
        now.timestamp(),
        now.timestamp_subsec_nanos()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_command_carries_the_time_to_the_nanosecond() {
        let at = chrono::DateTime::from_timestamp(1_764_000_000, 5).unwrap();
        assert_eq!(
            set_clock_command(at),
            "date -u -s @1764000000.000000005 >/dev/null"
        );
    }
}
