//! The control channel to a guest's agent (`crate::agent`, its side) over
//! its virtio-serial port: one JSON object per line each way, every request
//! with an id its answer repeats, bytes in base64. A reader thread hands
//! each answer to the request waiting for it, so several commands run at
//! once and one that hangs blocks none of the others.
//!
//! The stream is any byte pipe: the node's `agent.sock` (the host end of
//! the port) in a cluster, the agent's stdin and stdout in the unit tests.
//! A stream that ends or a frame that cannot be read breaks the channel:
//! every waiting request fails with [`GuestError::Channel`] (named
//! `channel_broken`) and the pool opens a new channel on the next attempt.
//!
//! QEMU's end of the port (`-chardev socket,server=on,wait=off`) serves one
//! client at a time: it accepts the next only once the current one hung up,
//! and its listen queue holds one. When the guest's agent dies the client
//! gets no EOF (the agent's `started` event on restart is all it hears), so
//! a channel is closed as soon as it breaks, for whatever reason, and every
//! step has a deadline: the connect (a full queue would block a plain
//! connect in the kernel for good), each write (a port whose guest end is
//! closed takes nothing once the socket buffer is full) and each answer.

use super::{ExecOutput, GuestError};
use crate::error::{ErrorKind, named};
use crate::wait::{Pause, Probe, Wait};
use anyhow::Result;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long past a command's own deadline the driver waits for the agent's
/// answer (the agent kills the command at its deadline and says so).
const GRACE: Duration = Duration::from_secs(2);

/// How long past its window the driver waits for a units watch's answer.
const WATCH_GRACE: Duration = Duration::from_secs(10);

type Waiting = Arc<Mutex<Waiters>>;

/// The requests waiting for an answer; `broken` once the stream ended.
#[derive(Default)]
struct Waiters {
    by_id: HashMap<u64, Sender<Value>>,
    broken: Option<String>,
    /// Whether an agent has answered on this stream: its `started` event
    /// after that means it died and a new one runs.
    answered: bool,
    /// The answering agent's start (its hello's `started`): a `started`
    /// event with the same moment is that agent's own, arrived late.
    agent_started: Option<f64>,
}

/// A `units` watch the agent could not answer because its watcher was not
/// yet connected to the system bus (early in boot, or a guest without
/// one): the caller may look another way and ask again.
#[derive(Debug, thiserror::Error)]
#[error("{node}: agent: `units`: {why}")]
pub struct NotConnected {
    pub node: String,
    pub why: String,
}

/// What one `units` watch saw.
pub struct UnitWatch {
    /// Each unit's ActiveState, in the order asked.
    pub states: Vec<(String, String)>,
    /// Each change the agent saw, as it sent them (unit, state, monotonic).
    pub changes: Vec<Value>,
    /// When each unit last became active, on the guest's monotonic clock.
    pub active_since: Vec<f64>,
    /// When the answer reached the driver.
    pub received: Instant,
}

/// A channel to one node's agent.
pub struct Channel {
    node: String,
    writer: Mutex<Box<dyn Write + Send>>,
    waiting: Waiting,
    next_id: AtomicU64,
    /// Ends the stream (and so the reader thread) when the channel drops,
    /// breaks or its reader stops: QEMU's end of the port serves one client
    /// at a time, so a broken channel left open would keep every new one
    /// waiting in the socket's queue.
    close: Arc<dyn Fn() + Send + Sync>,
    /// The socket, to bound each request's write by its time (a port whose
    /// guest end is closed takes no bytes once the socket buffer is full).
    sends: Option<std::os::unix::net::UnixStream>,
}

impl Drop for Channel {
    fn drop(&mut self) {
        (self.close)();
    }
}

impl Channel {
    /// A channel over `reader`/`writer`; `close` ends the stream.
    pub fn over(
        node: &str,
        reader: impl Read + Send + 'static,
        writer: impl Write + Send + 'static,
        close: impl Fn() + Send + Sync + 'static,
    ) -> Channel {
        let waiting: Waiting = Arc::default();
        let w = waiting.clone();
        let close: Arc<dyn Fn() + Send + Sync> = Arc::new(close);
        let ends = close.clone();
        std::thread::spawn(move || {
            read_answers(reader, &w);
            // A restarted agent or an unreadable frame ends the reader
            // while the stream is still open: close it, so that QEMU (no
            // EOF when the guest's agent dies) accepts the next client.
            ends();
        });
        Channel {
            node: node.to_string(),
            writer: Mutex::new(Box::new(writer)),
            waiting,
            // Ids unique across channels and driver runs: an answer a dead
            // channel's agent still had queued can match no new request.
            next_id: AtomicU64::new(first_id()),
            close,
            sends: None,
        }
    }

    /// Connects to the host end of a node's agent port and asks the agent
    /// for its hello within `within`: `Ok` only if an agent answered.
    pub fn connect(node: &str, socket: &std::path::Path, within: Duration) -> Result<Channel> {
        let stream = connect_within(socket, within)
            .map_err(|e| broken_err(node, &format!("connecting to {}: {e}", socket.display())))?;
        let ch = Channel::over_socket(node, stream)?;
        ch.hello(within)?;
        Ok(ch)
    }

    /// A channel over a connected Unix socket, its writes bounded.
    fn over_socket(node: &str, stream: std::os::unix::net::UnixStream) -> Result<Channel> {
        let reader = stream.try_clone()?;
        let closer = stream.try_clone()?;
        let sends = stream.try_clone()?;
        let mut ch = Channel::over(node, reader, stream, move || {
            let _ = closer.shutdown(std::net::Shutdown::Both);
        });
        ch.sends = Some(sends);
        Ok(ch)
    }

    /// The agent's version and its monotonic clock (seconds).
    pub fn hello(&self, within: Duration) -> Result<(String, f64)> {
        let a = self.request(json!({"op": "hello"}), "hello", within)?;
        Ok((
            a["agent"].as_str().unwrap_or_default().to_string(),
            a["monotonic"].as_f64().unwrap_or(f64::NAN),
        ))
    }

    /// Runs `command` in the guest by root's login shell, as over SSH. The agent kills it
    /// at `deadline`; that comes back as [`GuestError::Deadline`], and the
    /// channel stays usable.
    pub fn exec(&self, command: &str, deadline: Duration) -> Result<ExecOutput> {
        let req = json!({"op": "exec", "cmd": command, "deadline": deadline.as_secs_f64()});
        let a = self.request(req, command, deadline + GRACE)?;
        if a["error"] == "deadline" {
            return Err(GuestError::Deadline {
                node: self.node.clone(),
                command: command.to_string(),
                secs: deadline.as_secs_f64(),
            }
            .into());
        }
        self.failed(&a, command)?;
        Ok(ExecOutput {
            code: a["code"].as_i64().unwrap_or(-1) as i32,
            stdout: String::from_utf8_lossy(&bytes(&a["stdout"])).into_owned(),
            stderr: String::from_utf8_lossy(&bytes(&a["stderr"])).into_owned(),
        })
    }

    /// Writes `data` to `path` in the guest (atomically: a temporary file
    /// renamed), with `mode`.
    pub fn put(&self, path: &str, data: &[u8], mode: u32, deadline: Duration) -> Result<()> {
        let req = json!({"op": "put", "path": path, "data": B64.encode(data), "mode": mode});
        let a = self.request(req, &format!("put {path}"), deadline)?;
        self.failed(&a, &format!("put {path}"))
    }

    /// The bytes of `path` in the guest.
    pub fn get(&self, path: &str, deadline: Duration) -> Result<Vec<u8>> {
        let a = self.request(
            json!({"op": "get", "path": path}),
            &format!("get {path}"),
            deadline,
        )?;
        self.failed(&a, &format!("get {path}"))?;
        Ok(bytes(&a["data"]))
    }

    /// The agent's watch of systemd `units`, answered the moment all are
    /// active or one failed (systemd pushes each change to the agent), else
    /// after `window`.
    pub fn units(&self, units: &[String], window: Duration) -> Result<UnitWatch> {
        let req = json!({"op": "units", "units": units, "deadline": window.as_secs_f64()});
        // More patience than a command's: a guest loaded under TCG took more
        // than the 2 s of GRACE to send a watch's answer (a one-node start
        // broke on it).
        let a = self.request(req, "units", window + WATCH_GRACE)?;
        let received = Instant::now();
        tracing::debug!("{}: units answer {a}", self.node);
        if a["not_connected"] == true {
            let why = a["error"].as_str().unwrap_or_default().to_string();
            return Err(NotConnected {
                node: self.node.clone(),
                why,
            }
            .into());
        }
        self.failed(&a, "units")?;
        let state = |u: &String| a["states"][u].as_str().unwrap_or("unknown").to_string();
        Ok(UnitWatch {
            states: units.iter().map(|u| (u.clone(), state(u))).collect(),
            changes: a["changes"].as_array().cloned().unwrap_or_default(),
            active_since: units
                .iter()
                .filter_map(|u| a["active_since"][u].as_f64())
                .collect(),
            received,
        })
    }

    /// The guest's monotonic clock against the host's: the host instant at
    /// which the guest's clock read zero, from one hello (to within half its
    /// round trip, a few milliseconds over the agent).
    pub fn clock(&self, within: Duration) -> Result<Instant> {
        let sent = Instant::now();
        let (_, guest) = self.hello(within)?;
        let middle = sent + sent.elapsed() / 2;
        anyhow::ensure!(
            guest.is_finite() && guest >= 0.0,
            "{}: no clock in the hello",
            self.node
        );
        middle
            .checked_sub(Duration::from_secs_f64(guest))
            .ok_or_else(|| {
                anyhow::anyhow!("{}: the guest's clock is older than the host's", self.node)
            })
    }

    /// Asks the agent's watcher to follow `units` from now on, without
    /// waiting for them: a node that first waits for its dependencies is
    /// then answered from the watcher's cache, not after loading each unit
    /// (0.2-0.6 s on a loaded six-node boot). Best effort: an agent that
    /// cannot watch says so later, when asked for real.
    pub fn follow(&self, units: &[String]) {
        let _ = self.units(units, Duration::ZERO);
    }

    /// Sets the guest's wall clock to `now`. `Ok(false)`: this agent has
    /// no such request (an older agent in a prebuilt image).
    pub fn set_clock(&self, now: chrono::DateTime<chrono::Utc>, within: Duration) -> Result<bool> {
        let req = json!({"op": "clock", "secs": now.timestamp(),
                         "nanos": now.timestamp_subsec_nanos()});
        let a = self.request(req, "clock", within)?;
        if a["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("unknown op"))
        {
            return Ok(false);
        }
        self.failed(&a, "clock")?;
        Ok(true)
    }

    /// Asks the agent to connect to `host:port` from inside the guest: the
    /// inner result is the connect's own.
    pub fn tcp_connect(
        &self,
        host: &str,
        port: u16,
        deadline: Duration,
    ) -> Result<Result<(), String>> {
        let req = json!({"op": "connect", "host": host, "port": port,
                         "deadline": deadline.as_secs_f64()});
        let a = self.request(req, &format!("connect {host}:{port}"), deadline + GRACE)?;
        Ok(match a["error"].as_str() {
            None => Ok(()),
            Some(e) => Err(e.to_string()),
        })
    }

    /// Whether the stream behind this channel has ended.
    pub fn is_broken(&self) -> bool {
        self.waiting
            .lock()
            .map(|w| w.broken.is_some())
            .unwrap_or(true)
    }

    fn failed(&self, a: &Value, what: &str) -> Result<()> {
        match a["error"].as_str() {
            Some(e) => anyhow::bail!("{}: agent: `{what}`: {e}", self.node),
            None => Ok(()),
        }
    }

    /// Sends one request and waits for its answer through the one wait
    /// helper (Ctrl-C and `--timeout` end it if it began before them). No
    /// answer within `within` breaks the channel: the agent is hung or gone.
    fn request(&self, mut req: Value, what: &str, within: Duration) -> Result<Value> {
        // As over SSH (shell.rs): work begun before Ctrl-C or --timeout ends
        // with them; what runs after them (a teardown, the evidence) keeps
        // its own deadline.
        let stoppable = !crate::interrupted();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        req["id"] = id.into();
        let (tx, rx) = mpsc::channel();
        {
            let mut w = self.lock_waiting();
            if let Some(why) = &w.broken {
                return Err(broken_err(&self.node, why));
            }
            w.by_id.insert(id, tx);
        }
        let mut line = serde_json::to_vec(&req)?;
        line.push(b'\n');
        let until = Instant::now() + within;
        let sent = self
            .writer
            .lock()
            .map_err(|_| anyhow::anyhow!("channel writer poisoned"))
            .and_then(|mut w| {
                // Each write waits at most what is left of the request's time
                // (the guest's end may take nothing: its agent is gone).
                if let Some(s) = &self.sends {
                    let left = until.saturating_duration_since(Instant::now());
                    s.set_write_timeout(Some(left.max(Duration::from_millis(1))))?;
                }
                Ok(w.write_all(&line).and_then(|_| w.flush())?)
            });
        if let Err(e) = sent {
            return Err(self.break_with(&format!("sending `{what}`: {e:#}")));
        }
        let left = until.saturating_duration_since(Instant::now());
        let answer = self.await_answer(&rx, id, what, left, stoppable);
        self.lock_waiting().by_id.remove(&id);
        answer
    }

    fn await_answer(
        &self,
        rx: &mpsc::Receiver<Value>,
        id: u64,
        what: &str,
        within: Duration,
        stoppable: bool,
    ) -> Result<Value> {
        let until = Instant::now() + within;
        let mut wait = Wait::new(format!("{}: agent answer to `{what}`", self.node), within)
            .pause(Pause::Every(Duration::ZERO));
        if !stoppable {
            wait = wait.through_interrupt();
        }
        let waited = wait.run(|| {
            let left = until.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left.min(crate::wait::SLICE)) {
                Ok(a) => Ok(Probe::Done(a)),
                Err(RecvTimeoutError::Timeout) => Ok(Probe::Pending(format!("request {id}"))),
                Err(RecvTimeoutError::Disconnected) => {
                    let why = self.lock_waiting().broken.clone();
                    Err(broken_err(&self.node, &why.unwrap_or_default()))
                }
            }
        });
        match waited {
            Err(e)
                if matches!(
                    e.downcast_ref(),
                    Some(crate::wait::WaitError::TimedOut { .. })
                ) =>
            {
                Err(self.break_with(&format!(
                    "no answer to `{what}` within {:.1} s",
                    within.as_secs_f64()
                )))
            }
            other => other.map_err(crate::wait::unwrap_stopped),
        }
    }

    /// Marks the channel broken (every waiting request fails) and ends its stream.
    fn break_with(&self, why: &str) -> anyhow::Error {
        fail_all(&self.waiting, why);
        (self.close)();
        broken_err(&self.node, why)
    }

    fn lock_waiting(&self) -> std::sync::MutexGuard<'_, Waiters> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The reader thread: each answer to the request that waits for it, until
/// the stream ends or a frame cannot be read.
fn read_answers(reader: impl Read, waiting: &Waiting) {
    let mut lines = BufReader::new(reader);
    let mut line = Vec::new();
    let why = loop {
        line.clear();
        match lines.read_until(b'\n', &mut line) {
            Ok(0) => break "the agent's stream ended".to_string(),
            Err(e) => break format!("reading from the agent: {e}"),
            Ok(_) => {}
        }
        let answer: Value = match serde_json::from_slice(&line) {
            Ok(v) => v,
            Err(e) => break format!("an unreadable frame from the agent ({e})"),
        };
        let mut w = waiting.lock().unwrap_or_else(|p| p.into_inner());
        let Some(id) = answer["id"].as_u64() else {
            let own = w.agent_started.is_some() && answer["monotonic"].as_f64() == w.agent_started;
            if answer["event"] == "started" && w.answered && !own {
                break "the agent restarted; its running requests are lost".to_string();
            }
            // An agent's start queued before this stream (or the answer to
            // a line it could not read: ours are whole, so an older driver's).
            tracing::debug!("agent frame without a request id: {answer}");
            continue;
        };
        w.answered = true;
        if let Some(started) = answer["started"].as_f64() {
            w.agent_started = Some(started);
        }
        if let Some(tx) = w.by_id.get(&id) {
            let _ = tx.send(answer);
        }
    };
    fail_all(waiting, &why);
}

/// Connects to a Unix socket, waiting at most `within`. QEMU's chardev
/// listens with a backlog of one and accepts no one while a client is
/// connected: a blocking connect to a full queue would wait in the kernel
/// forever (no Ctrl-C, no deadline), so the connect is non-blocking and
/// retried while the queue is full.
fn connect_within(
    socket: &std::path::Path,
    within: Duration,
) -> std::io::Result<std::os::unix::net::UnixStream> {
    use nix::errno::Errno;
    use nix::sys::socket::{self as sock, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let addr = UnixAddr::new(socket)?;
    let until = Instant::now() + within;
    loop {
        let fd = sock::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        match sock::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => {
                let stream = std::os::unix::net::UnixStream::from(fd);
                stream.set_nonblocking(false)?;
                return Ok(stream);
            }
            Err(Errno::EAGAIN) if Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(Errno::EAGAIN) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "its queue stayed full for {:.1} s (another client holds the port)",
                        within.as_secs_f64()
                    ),
                ));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn first_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    // Room below 2^53: JSON numbers stay exact in any reader.
    nanos % (1 << 52) + 1
}

fn fail_all(waiting: &Waiting, why: &str) {
    let mut w = waiting.lock().unwrap_or_else(|p| p.into_inner());
    w.broken.get_or_insert_with(|| why.to_string());
    // Dropping the senders wakes every waiting request with `Disconnected`.
    w.by_id.clear();
}

fn broken_err(node: &str, why: &str) -> anyhow::Error {
    named(
        ErrorKind::ChannelBroken,
        GuestError::Channel {
            node: node.to_string(),
            why: why.to_string(),
        },
    )
}

fn bytes(v: &Value) -> Vec<u8> {
    B64.decode(v.as_str().unwrap_or_default())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real agent (`crate::agent`), serving one end of a socket pair
    /// on the host as it serves the port in a guest: a channel to it.
    /// Closing the channel ends the stream, and with it the agent.
    fn agent() -> Channel {
        let (agent_end, driver) = std::os::unix::net::UnixStream::pair().unwrap();
        let port = crate::agent::Port::new(agent_end.try_clone().unwrap());
        std::thread::spawn(move || crate::agent::serve(agent_end, &port, true));
        let closer = driver.try_clone().unwrap();
        Channel::over("test", driver.try_clone().unwrap(), driver, move || {
            let _ = closer.shutdown(std::net::Shutdown::Both);
        })
    }

    const SECS: Duration = Duration::from_secs(10);

    #[test]
    fn exec_frames_stdout_stderr_and_the_exit_code() {
        let ch = agent();
        let out = ch.exec("printf out; printf err >&2; exit 7", SECS).unwrap();
        assert_eq!((out.code, &*out.stdout, &*out.stderr), (7, "out", "err"));
        assert!(ch.hello(SECS).unwrap().0.starts_with("photon-agent/"));
    }

    /// Without systemd on a system bus (this host has neither) the watch
    /// fails as not connected and the channel stays usable: the driver
    /// then watches with systemctl (`ready::Route`).
    #[test]
    fn a_units_watch_without_systemd_fails_by_name_and_keeps_the_channel() {
        let ch = agent();
        let e = ch
            .units(&["ssh.service".into()], Duration::from_secs(1))
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("on the system bus"), "{e:#}");
        // Said in a field of its own: the driver asks again after one look
        // with systemctl.
        assert!(e.downcast_ref::<NotConnected>().is_some(), "{e:#}");
        assert!(!super::super::breaks_session(&e), "{e:#}");
        assert_eq!(ch.exec("echo on", SECS).unwrap().stdout, "on\n");
    }

    /// A broken channel is a named error; it still says it broke the
    /// session (the engine then forgets the guest, `ready::Route` gives up).
    #[test]
    fn a_broken_channel_breaks_the_session() {
        let e = broken_err("n", "gone");
        assert!(super::super::breaks_session(&e));
        assert!(super::super::breaks_session(&e.context("while watching")));
    }

    /// Here the "guest" is this host, so its clock's zero on the host's
    /// clock is the host's own monotonic zero.
    #[test]
    fn the_guest_clock_is_placed_on_the_host_clock() {
        use nix::time::{ClockId, clock_gettime};
        let ch = agent();
        let zero = ch.clock(SECS).unwrap();
        let t = clock_gettime(ClockId::CLOCK_MONOTONIC).unwrap();
        let host = t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9;
        let off = zero.elapsed().as_secs_f64() - host;
        assert!(off.abs() < 0.05, "off by {off} s");
    }

    #[test]
    fn large_and_non_utf8_output_survive_the_framing() {
        let ch = agent();
        let out = ch
            .exec("head -c 3000000 /dev/zero | tr '\\0' x", SECS)
            .unwrap();
        assert_eq!(out.stdout.len(), 3_000_000);
        let out = ch.exec("printf 'a\\377b\\n'", SECS).unwrap();
        assert_eq!(out.stdout, "a\u{fffd}b\n");
    }

    #[test]
    fn a_hung_command_blocks_no_other_and_ends_at_its_deadline() {
        let ch = Arc::new(agent());
        ch.hello(SECS).unwrap(); // the agent is up: timings below are its own
        let hung = {
            let ch = ch.clone();
            std::thread::spawn(move || ch.exec("sleep 600", Duration::from_secs(4)))
        };
        std::thread::sleep(Duration::from_millis(200));
        for i in 0..3 {
            assert_eq!(
                ch.exec(&format!("echo {i}"), SECS).unwrap().stdout,
                format!("{i}\n")
            );
        }
        assert!(
            !hung.is_finished(),
            "the quick ones finished while the hung one runs"
        );
        let t = Instant::now();
        let err = hung.join().unwrap().unwrap_err();
        assert!(
            matches!(err.downcast_ref(), Some(GuestError::Deadline { .. })),
            "{err:#}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(4) + GRACE,
            "ended at its deadline"
        );
        assert!(!ch.is_broken(), "a deadline leaves the channel usable");
        assert_eq!(ch.exec("echo after", SECS).unwrap().stdout, "after\n");
    }

    #[test]
    fn files_go_both_ways_byte_for_byte() {
        let ch = agent();
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f.bin");
        let data: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
        ch.put(path.to_str().unwrap(), &data, 0o600, SECS).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert_eq!(ch.get(path.to_str().unwrap(), SECS).unwrap(), data);
        let missing = ch.get("/nonexistent/x", SECS).unwrap_err();
        assert!(
            format!("{missing:#}").contains("No such file"),
            "{missing:#}"
        );
    }

    #[test]
    fn a_broken_frame_from_the_driver_is_answered_and_the_agent_reads_on() {
        let ch = agent();
        ch.writer.lock().unwrap().write_all(b"{not json\n").unwrap();
        assert_eq!(ch.exec("echo still", SECS).unwrap().stdout, "still\n");
    }

    #[test]
    fn a_broken_frame_from_the_agent_or_its_end_breaks_the_channel_by_name() {
        // A partial frame, then the stream ends.
        let reader = std::io::Cursor::new(b"{\"id\":1,\"co".to_vec());
        let ch = Channel::over("n1", reader, std::io::sink(), || {});
        std::thread::sleep(Duration::from_millis(100));
        let err = ch.exec("true", SECS).unwrap_err();
        assert_eq!(crate::error::kind_of(&err), ErrorKind::ChannelBroken);
        assert!(format!("{err}").contains("n1"), "{err}");
        // The agent killed while a command runs: the waiting call fails at once.
        let ch = Arc::new(agent());
        let c = ch.clone();
        let running = std::thread::spawn(move || c.exec("sleep 600", Duration::from_secs(60)));
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        (ch.close)();
        let err = running.join().unwrap().unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(2));
        assert_eq!(
            crate::error::kind_of(&err),
            ErrorKind::ChannelBroken,
            "{err:#}"
        );
        assert!(ch.is_broken());
    }

    #[test]
    fn an_agent_that_restarts_breaks_the_channel_only_after_it_answered() {
        let started = b"{\"id\":null,\"event\":\"started\",\"monotonic\":1.0}\n";
        // Queued from before this stream: ignored, the channel lives.
        let (mut agent, driver) = std::os::unix::net::UnixStream::pair().unwrap();
        let ch = Channel::over("n1", driver.try_clone().unwrap(), driver, || {});
        agent.write_all(started).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(!ch.is_broken());
        // After an answer, the answering agent's own start, arrived late,
        // is no restart.
        agent
            .write_all(b"{\"id\":6,\"agent\":\"a\",\"started\":1.0}\n")
            .unwrap();
        agent.write_all(started).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(!ch.is_broken());
        // Another agent's start means the agent died and came back.
        agent.write_all(b"{\"id\":7}\n").unwrap();
        agent
            .write_all(b"{\"id\":null,\"event\":\"started\",\"monotonic\":9.5}\n")
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(ch.is_broken());
        let err = ch.exec("true", SECS).unwrap_err();
        assert!(format!("{err}").contains("restarted"), "{err}");
    }

    #[test]
    fn an_agent_that_never_answers_breaks_the_channel_after_deadline_and_grace() {
        // A reader that never yields a byte: a hung agent.
        let (_keep, rx) = std::os::unix::net::UnixStream::pair().unwrap();
        let ch = Channel::over("n1", rx, std::io::sink(), || {});
        let t = Instant::now();
        let err = ch.exec("true", Duration::from_millis(100)).unwrap_err();
        assert!(t.elapsed() < GRACE + Duration::from_secs(1));
        assert_eq!(
            crate::error::kind_of(&err),
            ErrorKind::ChannelBroken,
            "{err:#}"
        );
    }

    /// QEMU's end of a virtio-serial port (`-chardev socket,server=on,
    /// wait=off`) with an agent behind it, as the driver sees it: a Unix
    /// socket listening with a backlog of one, one client served at a time
    /// and the next accepted only once that one hung up; an agent that dies
    /// and starts again gives the client no EOF, only its `started` event.
    struct FakePort {
        path: std::path::PathBuf,
        current: Arc<Mutex<Option<std::os::unix::net::UnixStream>>>,
        accepted: Arc<AtomicU64>,
        _dir: tempfile::TempDir,
    }

    impl FakePort {
        /// `answers`: whether the agent answers at all (else it reads nothing).
        fn new(answers: bool) -> FakePort {
            use nix::sys::socket::{self as sock, AddressFamily, Backlog, SockFlag, SockType};
            use std::os::fd::AsRawFd;
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("agent.sock");
            let fd = sock::socket(
                AddressFamily::Unix,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC,
                None,
            )
            .unwrap();
            sock::bind(fd.as_raw_fd(), &sock::UnixAddr::new(&path).unwrap()).unwrap();
            sock::listen(&fd, Backlog::new(1).unwrap()).unwrap();
            let listener = std::os::unix::net::UnixListener::from(fd);
            let current: Arc<Mutex<Option<std::os::unix::net::UnixStream>>> = Arc::default();
            let accepted = Arc::new(AtomicU64::new(0));
            let (cur, acc) = (current.clone(), accepted.clone());
            std::thread::spawn(move || {
                for client in listener.incoming() {
                    let Ok(client) = client else { return };
                    acc.fetch_add(1, Ordering::SeqCst);
                    *cur.lock().unwrap() = Some(client.try_clone().unwrap());
                    if answers {
                        serve_fake(client);
                    } else {
                        // Reads nothing for 3 s (the guest's end closed),
                        // then drains until the driver hung up.
                        std::thread::sleep(Duration::from_secs(3));
                        let _ = std::io::copy(&mut &client, &mut std::io::sink());
                    }
                    *cur.lock().unwrap() = None;
                }
            });
            FakePort {
                path,
                current,
                accepted,
                _dir: dir,
            }
        }

        /// The agent died and systemd started it again: its announcement on
        /// the connection QEMU keeps open.
        fn restart_agent(&self) {
            let cur = self.current.lock().unwrap();
            let mut c = cur.as_ref().expect("a client").try_clone().unwrap();
            c.write_all(b"{\"id\":null,\"event\":\"started\",\"monotonic\":2.0}\n")
                .unwrap();
        }
    }

    /// Answers hello and exec (`ok`) until the client hangs up.
    fn serve_fake(client: std::os::unix::net::UnixStream) {
        let mut out = client.try_clone().unwrap();
        for line in BufReader::new(client).lines() {
            let Ok(line) = line else { return };
            let req: Value = serde_json::from_str(&line).unwrap();
            let a = match req["op"].as_str() {
                Some("hello") => json!({"id": req["id"], "agent": "fake/1", "monotonic": 1.0}),
                _ => {
                    json!({"id": req["id"], "code": 0, "stdout": B64.encode("ok\n"), "stderr": ""})
                }
            };
            if writeln!(out, "{a}").is_err() {
                return;
            }
        }
    }

    /// `f` on a thread, which must return within `secs` (a hang fails the
    /// test instead of hanging it).
    fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(secs))
            .unwrap_or_else(|_| panic!("still running after {secs} s: a hang"))
    }

    #[test]
    fn after_the_agent_restarts_a_new_channel_connects_though_the_old_one_is_still_held() {
        let port = FakePort::new(true);
        let path = port.path.clone();
        let first = Channel::connect("n1", &path, SECS).unwrap();
        assert_eq!(first.exec("true", SECS).unwrap().stdout, "ok\n");
        port.restart_agent();
        let t = Instant::now();
        while !first.is_broken() {
            assert!(t.elapsed() < SECS, "the restart was never noticed");
            std::thread::sleep(Duration::from_millis(10));
        }
        // `first` is still held (as a check's Arc<Guest> holds it while the
        // pool replaces it): QEMU serves the next client only once it is closed.
        let p = path.clone();
        let second = within(10, move || {
            Channel::connect("n1", &p, Duration::from_secs(2))
        })
        .expect("a new channel while the broken one is still held");
        assert_eq!(second.exec("true", SECS).unwrap().stdout, "ok\n");
        assert_eq!(port.accepted.load(Ordering::SeqCst), 2);
        drop(first);
    }

    #[test]
    fn connecting_to_a_port_whose_queue_is_full_fails_by_name_within_its_time() {
        // One client holds the port; QEMU accepts no other, and the
        // listen queue (one) fills up with the ones that gave up.
        let port = FakePort::new(true);
        let _holder = Channel::connect("n1", &port.path, SECS).unwrap();
        for _ in 0..4 {
            let p = port.path.clone();
            let t = Instant::now();
            let err = within(10, move || {
                Channel::connect("n1", &p, Duration::from_millis(300)).map(drop)
            })
            .unwrap_err();
            assert_eq!(
                crate::error::kind_of(&err),
                ErrorKind::ChannelBroken,
                "{err:#}"
            );
            assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        }
    }

    #[test]
    fn a_port_that_takes_no_bytes_fails_a_large_put_within_its_time() {
        // The guest's end closed (agent gone, QEMU reads nothing): the
        // socket buffer fills and the write must not wait forever.
        let port = FakePort::new(false);
        let (p, path) = (port.path.clone(), port.path.clone());
        let stream = within(10, move || connect_within(&p, SECS)).unwrap();
        let ch = Channel::over_socket("n1", stream).unwrap();
        let data = vec![7u8; 16 << 20];
        let t = Instant::now();
        let err = within(20, move || {
            ch.put("/x", &data, 0o600, Duration::from_secs(1))
        })
        .unwrap_err();
        assert_eq!(
            crate::error::kind_of(&err),
            ErrorKind::ChannelBroken,
            "{err:#}"
        );
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        // Closed on the break: the port takes its next client.
        let t = Instant::now();
        while port.accepted.load(Ordering::SeqCst) < 2 {
            let _ = connect_within(&path, Duration::from_millis(100));
            assert!(t.elapsed() < SECS, "the broken channel kept the port");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
