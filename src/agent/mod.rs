//! photon-agent: the guest side of the driver's control channel
//! (`src/guest/channel.rs` is the driver's side). The `photon-agent` binary
//! (`src/bin/photon-agent.rs`) is this module alone: it uses nothing else of
//! the crate, so it links only std, serde_json, base64, nix and (for the
//! units watch, `units.rs`) zbus on tokio.
//!
//! It reads requests from the virtio-serial port `org.photon.agent` (or
//! stdin and stdout with `--stdio`) and answers each on the same port. No
//! network socket: the port is the only way in.
//!
//! Framing: one JSON object per line (UTF-8, no newline inside an object);
//! bytes (command output, file contents) travel base64-encoded, so non-UTF-8
//! output survives. Every request carries an `id` that its answer repeats;
//! each request runs on its own thread, so a command that hangs blocks none
//! of the others. A line that is not a request gets
//! `{"id": null, "error": "bad frame: ..."}` and the agent reads on.
//!
//! Requests:
//! - `{"id", "op": "hello"}` -> `{"id", "agent", "monotonic", "started"}`
//!   (`started`: the agent's start on the guest's monotonic clock)
//! - `{"id", "op": "exec", "cmd", "deadline": SECS}` (run by the user's
//!   login shell, as sshd runs a command) -> `{"id", "code",
//!   "stdout": B64, "stderr": B64}`; past its deadline the command's whole
//!   process group is killed and the answer has `"error": "deadline"` and
//!   code -1.
//! - `{"id", "op": "put", "path", "data": B64, "mode"}` -> `{"id", "code": 0}`
//! - `{"id", "op": "get", "path"}` -> `{"id", "data": B64}`
//! - `{"id", "op": "units", "units": [NAME], "deadline"}` -> `{"id",
//!   "states": {NAME: STATE}, "changes": [{"unit", "state", "monotonic"}],
//!   "active_since": {NAME: SECS}, "monotonic"}` the moment every unit is active or one failed (systemd
//!   pushes each change: `units.rs`), else at the deadline.
//! - `{"id", "op": "clock", "secs", "nanos"}` -> `{"id"}` once the guest's
//!   wall clock (CLOCK_REALTIME) is set to that moment since the epoch (a
//!   restored guest wakes with the clock of its save).
//! - `{"id", "op": "connect", "host", "port", "deadline"}` -> `{"id"}` once
//!   a TCP connect from the guest succeeded (then closed), `{"id", "error"}`
//!   with the reason if it did not.
//!
//! Any failure of a request: `{"id", "error": TEXT}`; a `units` watch that
//! had no connection to the system bus adds `"not_connected": true`. On start, unasked and
//! before any answer: `{"id": null, "event": "started", "monotonic": SECS}`,
//! SECS the same `started` its hellos give.
//!
//! Why compiled, not a script: under emulation (TCG) an interpreter's own
//! work per request cost about as much as spawning the command itself, and
//! the first agent (Python) was slower than a kept SSH session
//! (docs/performance.md).

pub mod units;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use serde_json::{Value, json};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The agent's name and protocol version, in its hello.
pub const VERSION: &str = "photon-agent/4";

/// The guest end of the port (QEMU's `virtserialport,name=org.photon.agent`).
const PORT: &str = "/dev/virtio-ports/org.photon.agent";

/// A command's deadline when the request names none.
const DEFAULT_DEADLINE: f64 = 30.0;

/// The binary's entry: `--stdio` serves stdin/stdout until stdin ends
/// (the driver's tests), else the virtio-serial port for good.
pub fn main() {
    if std::env::args().any(|a| a == "--stdio") {
        let port = Port::new(std::io::stdout());
        serve(std::io::stdin(), &port, true);
        return;
    }
    // Before any other thread: they all inherit it.
    set_thread_nice(AGENT_NICE);
    units::start(monotonic);
    let (input, output) = open_port();
    announce_then_serve(input, &Port::new(output), false);
}

/// The agent's own threads run ahead of the guest's ordinary work (nice
/// -10); what it runs for the driver does not (nice 0, `spawn`).
///
/// Why: a TCG guest has one slow vCPU. With two busy loops in a guest, an
/// agent at nice 0 sent a units answer 15-24 ms after stamping it and ran
/// `/bin/true` in 64-88 ms; at -10, 4-7 ms and 20-42 ms (docs/performance.md).
/// The agent itself mostly sleeps, so the guest's work loses little.
const AGENT_NICE: i32 = -10;

/// Sets the calling thread's nice value. On Linux nice is a per-thread
/// attribute (setpriority(2), NOTES), inherited by the threads and the
/// processes a thread creates. A failure (no CAP_SYS_NICE) leaves it as it
/// was: only the latency suffers.
fn set_thread_nice(nice: i32) {
    // SAFETY: a plain system call on the calling thread; no memory passes.
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
}

/// The calling thread's nice value (getpriority on the calling thread
/// cannot fail, so -1 is a value, not an error).
fn thread_nice() -> i32 {
    // SAFETY: as above.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
}

/// Says `started`, then serves. The announcement goes first, on this
/// thread: a driver that connected while an earlier agent died learns from
/// it that its running requests are lost, and a driver that sees it after
/// an answer takes it for a restart. Sent from a thread of its own (as
/// once), it raced the first answer: the port blocks writes until a driver
/// connects, and both writers woke together (a six-node boot broke on it).
fn announce_then_serve(input: impl Read, port: &Port, eof_ends: bool) {
    port.send(&json!({"id": null, "event": "started", "monotonic": started()}));
    serve(input, port, eof_ends);
}

/// When this agent started, on the guest's monotonic clock: its identity.
/// Its hello says it too, so a driver can tell this agent's own late
/// announcement from a new agent's (a restart, or a rebooted guest).
fn started() -> f64 {
    static STARTED: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *STARTED.get_or_init(monotonic)
}

/// Where answers go: one writer, locked so that frames stay whole.
#[derive(Clone)]
pub struct Port(Arc<Mutex<Box<dyn Write + Send>>>);

impl Port {
    pub fn new(w: impl Write + Send + 'static) -> Port {
        Port(Arc::new(Mutex::new(Box::new(w))))
    }

    fn send(&self, v: &Value) {
        let mut line = v.to_string().into_bytes();
        line.push(b'\n');
        let mut w = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // The driver went away mid-answer: it retries on a new connection,
        // so the answer is dropped.
        let _ = w.write_all(&line).and_then(|_| w.flush());
    }
}

/// Reads requests from `input` and answers each on `port` from a thread of
/// its own. `eof_ends`: the end of `input` ends the agent once the running
/// requests are answered (stdio); else it means no driver is connected to
/// the host end of the port, and the agent reads on.
pub fn serve(mut input: impl Read, port: &Port, eof_ends: bool) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    let mut running: Vec<JoinHandle<()>> = Vec::new();
    loop {
        let n = match input.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        if n == 0 {
            if eof_ends {
                running.into_iter().for_each(|t| drop(t.join()));
                return;
            }
            // A partial frame from a connection that went away is dropped.
            buf.clear();
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            running.retain(|t| !t.is_finished());
            running.extend(handle(port, &line));
        }
    }
}

/// One request on its own thread; a line that is no request is answered
/// at once.
fn handle(port: &Port, line: &[u8]) -> Option<JoinHandle<()>> {
    let req = match serde_json::from_slice::<Value>(line) {
        Ok(req) if req.get("op").and_then(Value::as_str).is_some() => req,
        Ok(_) => return bad_frame(port, "not a request", line),
        Err(e) => return bad_frame(port, &e.to_string(), line),
    };
    let port = port.clone();
    Some(std::thread::spawn(move || {
        // A request that panics still gets an answer: without one the
        // driver would give up on the whole channel.
        let answered = std::panic::catch_unwind(|| answer(&req))
            .unwrap_or_else(|_| Err("the agent failed on this request (a panic)".into()));
        let mut answer = answered.unwrap_or_else(|e| json!({"error": e}));
        answer["id"] = req["id"].clone();
        port.send(&answer);
    }))
}

fn bad_frame(port: &Port, why: &str, line: &[u8]) -> Option<JoinHandle<()>> {
    let head = String::from_utf8_lossy(&line[..line.len().min(80)]).into_owned();
    port.send(&json!({"id": null, "error": format!("bad frame: {why}: {head:?}")}));
    None
}

fn answer(req: &Value) -> Result<Value, String> {
    match req["op"].as_str().unwrap_or_default() {
        "hello" => Ok(json!({"agent": VERSION, "monotonic": monotonic(), "started": started()})),
        "exec" => exec(text(req, "cmd")?, seconds(req)),
        "put" => put(req),
        "get" => {
            let data = std::fs::read(text(req, "path")?).map_err(|e| e.to_string())?;
            Ok(json!({"data": B64.encode(data)}))
        }
        "units" => units::watch(&names(req, "units")?, seconds(req), monotonic),
        "connect" => connect(req),
        "clock" => set_clock(req),
        // Nothing the agent serves panics on purpose; this shows the catch.
        #[cfg(test)]
        "panic" => panic!("a request that fails on purpose"),
        op => Err(format!("unknown op {op:?}")),
    }
}

fn text<'a>(req: &'a Value, key: &str) -> Result<&'a str, String> {
    req[key]
        .as_str()
        .ok_or_else(|| format!("the request has no text {key:?}"))
}

fn names(req: &Value, key: &str) -> Result<Vec<String>, String> {
    req[key]
        .as_array()
        .and_then(|a| a.iter().map(|v| v.as_str().map(str::to_string)).collect())
        .ok_or_else(|| format!("the request has no list of names {key:?}"))
}

fn seconds(req: &Value) -> Duration {
    let secs = req["deadline"].as_f64().unwrap_or(DEFAULT_DEADLINE);
    Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(Duration::MAX)
}

/// Runs `cmd`, its output collected until it ends or `deadline` passes; then
/// its whole process group is killed.
fn exec(cmd: &str, deadline: Duration) -> Result<Value, String> {
    let until = Instant::now() + deadline;
    let mut child = spawn(cmd).map_err(|e| format!("spawning `{cmd}`: {e}"))?;
    let out = child.stdout.take().map(OwnedFd::from);
    let err = child.stderr.take().map(OwnedFd::from);
    let (stdout, stderr, late) = collect(&mut child, [out, err], until);
    if late {
        // The command leads its own process group: this ends what it started.
        let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    // A signal is its negated number, as Python's waitstatus_to_exitcode.
    let code = status.code().or(status.signal().map(|s| -s)).unwrap_or(-1);
    let mut answer = json!({
        "code": if late { -1 } else { code },
        "stdout": B64.encode(stdout),
        "stderr": B64.encode(stderr),
    });
    if late {
        answer["error"] = "deadline".into();
    }
    Ok(answer)
}

/// Starts `cmd` at the guest's normal priority (nice 0), not the agent's:
/// the child inherits the spawning thread's.
fn spawn(cmd: &str) -> std::io::Result<Child> {
    let own = thread_nice();
    set_thread_nice(0);
    let child = spawn_command(cmd);
    set_thread_nice(own);
    child
}

/// A command with nothing for a shell to do (no quotes, variables,
/// redirections, globs) runs without a shell: one exec instead of two,
/// which is most of a short command's cost under TCG. std spawns with
/// posix_spawn (vfork underneath), not a fork of the agent.
fn spawn_command(cmd: &str) -> std::io::Result<Child> {
    let prepare = |c: &mut Command| {
        let a = account();
        for (key, value) in [("HOME", &a.home), ("USER", &a.name), ("LOGNAME", &a.name)] {
            if std::env::var_os(key).is_none() {
                c.env(key, value);
            }
        }
        c.env("SHELL", &a.shell);
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
    };
    if let Some(words) = plain_words(cmd) {
        let mut c = Command::new(words[0]);
        c.args(&words[1..]);
        prepare(&mut c);
        match c.spawn() {
            // A shell builtin (cd, exit) or a typo: the shell says which.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            other => return other,
        }
    }
    // The command travels in the environment, never on a command line:
    // over SSH it is written to a shell's stdin, and a command such as
    // `pkill -f 'TCP-LISTEN:5001'; socat TCP-LISTEN:5001 ...` would match
    // (and kill) a shell that had it in its arguments.
    let mut c = Command::new(login_shell());
    c.arg("-c")
        .arg("__photon_cmd=$PHOTON_AGENT_CMD; unset PHOTON_AGENT_CMD; eval \"$__photon_cmd\"")
        .env("PHOTON_AGENT_CMD", cmd);
    prepare(&mut c);
    c.spawn()
}

/// The agent's user as sshd sets up a command's environment.
struct Account {
    name: String,
    home: String,
    shell: String,
}

/// root's shell is bash on Debian and NixOS, and the driver's commands may
/// use bash; a system service has no HOME, USER, LOGNAME or SHELL of its own.
fn account() -> &'static Account {
    static ACCOUNT: std::sync::OnceLock<Account> = std::sync::OnceLock::new();
    ACCOUNT.get_or_init(|| {
        let uid = nix::unistd::getuid().to_string();
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let entry: Vec<String> = passwd
            .lines()
            .map(|l| l.split(':').map(str::to_string).collect::<Vec<_>>())
            .find(|f| f.len() >= 7 && f[2] == uid)
            .unwrap_or_default();
        let field = |i: usize, or: &str| entry.get(i).cloned().unwrap_or_else(|| or.into());
        let shell = Some(field(6, "/bin/sh"))
            .filter(|sh| std::path::Path::new(sh).is_file())
            .unwrap_or_else(|| "/bin/sh".into());
        Account {
            name: field(0, "root"),
            home: field(5, "/"),
            shell,
        }
    })
}

fn login_shell() -> &'static str {
    &account().shell
}

fn plain_words(cmd: &str) -> Option<Vec<&str>> {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-=:,@+% ".contains(c);
    let words: Vec<&str> = cmd.split(' ').filter(|w| !w.is_empty()).collect();
    (!words.is_empty() && cmd.chars().all(plain)).then_some(words)
}

/// How often the agent looks whether the command itself ended while its
/// pipes stay open.
const EXITED_LOOK: Duration = Duration::from_millis(50);

/// Reads both pipes until they close, or the command ended and what it
/// left in them is read, or `until` passes: (out, err, late). A command
/// that started something in the background (`daemon &`) ends before its
/// pipes close; as over SSH, its answer does not wait for the background.
fn collect(
    child: &mut Child,
    pipes: [Option<OwnedFd>; 2],
    until: Instant,
) -> (Vec<u8>, Vec<u8>, bool) {
    let mut open: Vec<(usize, File)> = pipes
        .into_iter()
        .enumerate()
        .filter_map(|(i, p)| p.map(|fd| (i, File::from(fd))))
        .collect();
    let mut bufs = [Vec::new(), Vec::new()];
    let mut ended = false;
    while !open.is_empty() {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let [out, err] = bufs;
            return (out, err, true);
        }
        let ready = match readable(&open, left.min(EXITED_LOOK)) {
            Some(ready) => ready,
            None => continue, // interrupted
        };
        if ready.iter().all(|r| !r) {
            if ended {
                break; // ended, and its pipes are empty
            }
            // Nothing to read for a while: has the command itself ended?
            // Then one more look takes what it left, without blocking.
            ended = matches!(child.try_wait(), Ok(Some(_)));
            continue;
        }
        read_ready(&mut open, &ready, &mut bufs);
    }
    let [out, err] = bufs;
    (out, err, false)
}

/// One read from each pipe `ready` marks; a pipe at its end is closed.
fn read_ready(open: &mut Vec<(usize, File)>, ready: &[bool], bufs: &mut [Vec<u8>; 2]) {
    let mut chunk = vec![0u8; 1 << 16];
    let mut closed = Vec::new();
    for (k, (i, f)) in open.iter_mut().enumerate() {
        if !ready[k] {
            continue;
        }
        match f.read(&mut chunk) {
            Ok(0) | Err(_) => closed.push(k),
            Ok(n) => bufs[*i].extend_from_slice(&chunk[..n]),
        }
    }
    for k in closed.into_iter().rev() {
        open.remove(k);
    }
}

/// Which of `open` can be read (or hung up) within `left`; `None` if the
/// wait was interrupted.
fn readable(open: &[(usize, File)], left: Duration) -> Option<Vec<bool>> {
    let mut fds: Vec<PollFd> = open
        .iter()
        .map(|(_, f)| PollFd::new(f.as_fd(), PollFlags::POLLIN))
        .collect();
    let timeout =
        PollTimeout::try_from(left.max(Duration::from_millis(1))).unwrap_or(PollTimeout::MAX);
    poll(&mut fds, timeout).ok()?;
    Some(
        fds.iter()
            .map(|p| p.revents().is_some_and(|r| !r.is_empty()))
            .collect(),
    )
}

/// Writes a file atomically: a temporary file with its mode, renamed.
fn put(req: &Value) -> Result<Value, String> {
    let path = text(req, "path")?;
    let data = B64
        .decode(text(req, "data")?)
        .map_err(|e| format!("data: {e}"))?;
    let mode = req["mode"].as_u64().unwrap_or(0o644) as u32;
    let tmp = format!("{path}.photon-agent.tmp");
    let write = || -> std::io::Result<()> {
        std::fs::write(&tmp, &data)?;
        std::fs::set_permissions(&tmp, PermissionsExt::from_mode(mode))?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| format!("{path}: {e}"))?;
    Ok(json!({"code": 0}))
}

/// A TCP connect from inside the guest, closed at once.
fn connect(req: &Value) -> Result<Value, String> {
    use std::net::{TcpStream, ToSocketAddrs};
    let host = text(req, "host")?;
    let port = req["port"].as_u64().unwrap_or_default() as u16;
    let within = seconds(req);
    let addrs = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("{host}:{port}: {e}"))?;
    let mut last = format!("{host}:{port}: no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, within.max(Duration::from_millis(1))) {
            Ok(_) => return Ok(json!({})),
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(last)
}

/// Sets the wall clock in-process: a `date -s` was two execs (its shell
/// and date), about 0.27 s of a one-node restore under TCG.
fn set_clock(req: &Value) -> Result<Value, String> {
    use nix::sys::time::TimeSpec;
    use nix::time::{ClockId, clock_settime};
    let secs = req["secs"]
        .as_i64()
        .ok_or("the request has no whole \"secs\"")?;
    let nanos = req["nanos"].as_i64().unwrap_or(0);
    clock_settime(ClockId::CLOCK_REALTIME, TimeSpec::new(secs, nanos))
        .map_err(|e| format!("setting the clock: {e}"))?;
    Ok(json!({}))
}

/// The guest's monotonic clock in seconds (CLOCK_MONOTONIC, as systemd's
/// `*TimestampMonotonic` and Python's time.monotonic()).
fn monotonic() -> f64 {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
        .unwrap_or(f64::NAN)
}

/// The port, once udev has made its link: (reader, writer).
fn open_port() -> (File, File) {
    loop {
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(PORT)
            .and_then(|f| Ok((f.try_clone()?, f)));
        if let Ok((r, w)) = opened {
            return (r, w);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_commands_run_without_a_shell_and_the_rest_with_one() {
        assert_eq!(plain_words("/bin/true"), Some(vec!["/bin/true"]));
        assert_eq!(
            plain_words("systemctl is-active  ssh.service"),
            Some(vec!["systemctl", "is-active", "ssh.service"])
        );
        for shell in [
            "echo $HOME",
            "a | b",
            "echo 'x y'",
            "a > f",
            "ls *",
            "",
            "a\tb",
        ] {
            assert_eq!(plain_words(shell), None, "{shell:?}");
        }
    }

    /// The agent serving one end of a socket pair: the other end.
    fn serving() -> std::os::unix::net::UnixStream {
        let (agent_end, driver) = std::os::unix::net::UnixStream::pair().unwrap();
        let port = Port::new(agent_end.try_clone().unwrap());
        std::thread::spawn(move || serve(agent_end, &port, true));
        driver
    }

    fn answer_line(from: &mut impl std::io::BufRead) -> Value {
        let mut line = String::new();
        from.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    #[test]
    fn a_request_split_across_reads_is_answered_once_whole() {
        let mut driver = serving();
        let mut answers = std::io::BufReader::new(driver.try_clone().unwrap());
        driver.write_all(b"{\"id\":7,\"op\":\"exec\",\"cm").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        driver.write_all(b"d\":\"printf ab\"}\n{\"id\":8,").unwrap();
        let a = answer_line(&mut answers);
        assert_eq!(
            (a["id"].as_u64(), a["stdout"].as_str()),
            (Some(7), Some("YWI="))
        );
        driver.write_all(b"\"op\":\"hello\"}\n").unwrap();
        assert_eq!(answer_line(&mut answers)["agent"], VERSION);
    }

    #[test]
    fn the_start_is_announced_before_any_answer() {
        let (agent_end, mut driver) = std::os::unix::net::UnixStream::pair().unwrap();
        // A hello already waits when the agent starts.
        driver.write_all(b"{\"id\":1,\"op\":\"hello\"}\n").unwrap();
        let port = Port::new(agent_end.try_clone().unwrap());
        std::thread::spawn(move || announce_then_serve(agent_end, &port, true));
        let mut answers = std::io::BufReader::new(driver);
        assert_eq!(answer_line(&mut answers)["event"], "started");
        assert_eq!(answer_line(&mut answers)["id"], 1);
    }

    #[test]
    fn a_request_that_panics_is_answered_and_the_next_one_too() {
        let mut driver = serving();
        driver
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut answers = std::io::BufReader::new(driver.try_clone().unwrap());
        driver.write_all(b"{\"id\":3,\"op\":\"panic\"}\n").unwrap();
        let a = answer_line(&mut answers);
        assert_eq!(a["id"], 3, "{a}");
        assert!(a["error"].as_str().unwrap().contains("a panic"), "{a}");
        driver.write_all(b"{\"id\":4,\"op\":\"hello\"}\n").unwrap();
        assert_eq!(answer_line(&mut answers)["agent"], VERSION);
    }

    #[test]
    fn a_clock_without_its_time_is_refused_and_nothing_is_set() {
        let a = answer(&json!({"id": 1, "op": "clock", "secs": "soon"}));
        assert_eq!(a, Err("the request has no whole \"secs\"".to_string()));
    }

    #[test]
    fn a_line_that_is_no_request_is_answered_by_name() {
        let mut driver = serving();
        let mut answers = std::io::BufReader::new(driver.try_clone().unwrap());
        driver.write_all(b"[1,2]\n").unwrap();
        let a = answer_line(&mut answers);
        assert_eq!(a["id"], Value::Null);
        assert!(
            a["error"]
                .as_str()
                .unwrap()
                .starts_with("bad frame: not a request"),
            "{a}"
        );
    }

    #[test]
    fn commands_run_in_the_login_shell_as_over_ssh() {
        // bash on this host and in the guests: the readiness watch needs it.
        let a = exec("echo ${BASH_VERSION:+bash}", Duration::from_secs(10)).unwrap();
        let login = login_shell();
        let want = if login.ends_with("bash") {
            "YmFzaAo="
        } else {
            "Cg=="
        };
        assert_eq!(a["stdout"], want, "{login}");
    }

    #[test]
    fn no_command_line_carries_the_command() {
        // As `pkill -f PATTERN` sees processes: the shell running a command
        // must not match a pattern from that command.
        let cmd = "true marker-4242; tr '\\0' ' ' < /proc/$$/cmdline";
        let a = exec(cmd, Duration::from_secs(10)).unwrap();
        let shown = String::from_utf8(B64.decode(a["stdout"].as_str().unwrap()).unwrap()).unwrap();
        assert!(!shown.contains("marker-4242"), "{shown}");
        assert_eq!(a["code"], 0, "{a}");
    }

    #[test]
    fn a_command_that_leaves_something_in_the_background_answers_at_its_end() {
        // The background sleep holds both pipes open for 30 s.
        let t = Instant::now();
        let a = exec(
            "echo started; sleep 30 & echo left >&2",
            Duration::from_secs(20),
        )
        .unwrap();
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert_eq!((a["code"].as_i64(), a.get("error")), (Some(0), None), "{a}");
        assert_eq!(a["stdout"], B64.encode("started\n"));
        assert_eq!(a["stderr"], B64.encode("left\n"));
    }

    #[test]
    fn commands_run_at_normal_priority_while_the_agent_runs_ahead() {
        // On its own thread: the nice value is per thread, and this one
        // plays the agent's. Raising priority needs CAP_SYS_NICE (CI: root).
        std::thread::spawn(|| {
            set_thread_nice(AGENT_NICE);
            assert_eq!(thread_nice(), AGENT_NICE, "run as root to raise priority");
            let a = exec("cut -d' ' -f19 /proc/self/stat", Duration::from_secs(10)).unwrap();
            assert_eq!(a["stdout"], B64.encode("0\n"), "the command's nice");
            assert_eq!(
                thread_nice(),
                AGENT_NICE,
                "the agent's thread after the spawn"
            );
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_builtin_that_looks_plain_falls_back_to_the_shell() {
        let a = exec("exit 3", Duration::from_secs(10)).unwrap();
        assert_eq!(a["code"], 3);
        let a = exec("no-such-program-here", Duration::from_secs(10)).unwrap();
        assert_eq!(a["code"], 127);
    }
}
