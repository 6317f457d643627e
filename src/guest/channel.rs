//! The control channel to a guest's agent (images/agent/photon-agent) over
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

type Waiting = Arc<Mutex<Waiters>>;

/// The requests waiting for an answer; `broken` once the stream ended.
#[derive(Default)]
struct Waiters {
    by_id: HashMap<u64, Sender<Value>>,
    broken: Option<String>,
    /// Whether an agent has answered on this stream: its `started` event
    /// after that means it died and a new one runs.
    answered: bool,
}

/// A channel to one node's agent.
pub struct Channel {
    node: String,
    writer: Mutex<Box<dyn Write + Send>>,
    waiting: Waiting,
    next_id: AtomicU64,
    /// Ends the stream (and so the reader thread) when the channel drops.
    close: Box<dyn Fn() + Send + Sync>,
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
        std::thread::spawn(move || read_answers(reader, &w));
        Channel {
            node: node.to_string(),
            writer: Mutex::new(Box::new(writer)),
            waiting,
            // Ids unique across channels and driver runs: an answer a dead
            // channel's agent still had queued can match no new request.
            next_id: AtomicU64::new(first_id()),
            close: Box::new(close),
        }
    }

    /// Connects to the host end of a node's agent port and asks the agent
    /// for its hello within `within`: `Ok` only if an agent answered.
    pub fn connect(node: &str, socket: &std::path::Path, within: Duration) -> Result<Channel> {
        let stream = std::os::unix::net::UnixStream::connect(socket)
            .map_err(|e| broken_err(node, &format!("connecting to {}: {e}", socket.display())))?;
        let reader = stream.try_clone()?;
        let closer = stream.try_clone()?;
        let ch = Channel::over(node, reader, stream, move || {
            let _ = closer.shutdown(std::net::Shutdown::Both);
        });
        ch.hello(within)?;
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

    /// Runs `command` under `/bin/sh -c` in the guest. The agent kills it
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
    /// helper (Ctrl-C and `--timeout` end it). No answer within `within`
    /// breaks the channel: the agent is hung or gone.
    fn request(&self, mut req: Value, what: &str, within: Duration) -> Result<Value> {
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
        let sent = self
            .writer
            .lock()
            .map_err(|_| anyhow::anyhow!("channel writer poisoned"))
            .and_then(|mut w| Ok(w.write_all(&line).and_then(|_| w.flush())?));
        if let Err(e) = sent {
            return Err(self.break_with(&format!("sending `{what}`: {e:#}")));
        }
        let answer = self.await_answer(&rx, id, what, within);
        self.lock_waiting().by_id.remove(&id);
        answer
    }

    fn await_answer(
        &self,
        rx: &mpsc::Receiver<Value>,
        id: u64,
        what: &str,
        within: Duration,
    ) -> Result<Value> {
        let until = Instant::now() + within;
        let waited = Wait::new(format!("{}: agent answer to `{what}`", self.node), within)
            .pause(Pause::Every(Duration::ZERO))
            .run(|| {
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
            if answer["event"] == "started" && w.answered {
                break "the agent restarted; its running requests are lost".to_string();
            }
            // An agent's start queued before this stream (or the answer to
            // a line it could not read: ours are whole, so an older driver's).
            tracing::debug!("agent frame without a request id: {answer}");
            continue;
        };
        w.answered = true;
        if let Some(tx) = w.by_id.get(&id) {
            let _ = tx.send(answer);
        }
    };
    fail_all(waiting, &why);
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
    use std::process::{Command, Stdio};

    /// The real agent, run on the host with --stdio: a channel to it.
    fn agent() -> Channel {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/images/agent/photon-agent");
        let mut child = Command::new("python3")
            .arg(script)
            .arg("--stdio")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs the agent");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let child = Mutex::new(child);
        Channel::over("test", stdout, stdin, move || {
            if let Ok(mut c) = child.lock() {
                let _ = c.kill();
                let _ = c.wait();
            }
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
            format!("{missing:#}").contains("FileNotFoundError"),
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
        // After an answer, a start means the agent died and came back.
        agent.write_all(b"{\"id\":7}\n").unwrap();
        agent.write_all(started).unwrap();
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
}
