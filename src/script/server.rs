//! The driver's side of the script protocol: one connection, one JSON
//! object per line each way. A request is `{"op": ..., "line": N, ...}`; a
//! reply is `{"result": ...}` or `{"error": ..., "command": ..., "output":
//! ...}`. Every call is kept as a timed [`Step`] of the current [`Subtest`].

use super::field;
use crate::fabric::switch::LinkFault;
use crate::guest::GuestPool;
use crate::state::RunningCluster;
use crate::text::tail;
use crate::wait::{Pause, Probe, Wait};
use anyhow::{Result, anyhow};
use serde::Serialize;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// One call of the script: what, where, from which line, how long, and what came back.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub op: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    pub line: Option<u64>,
    pub seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<i32>,
    pub output: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A `subtest(name)` block, or (name None) the script outside any block.
#[derive(Debug, Clone, Serialize)]
pub struct Subtest {
    pub name: String,
    pub passed: bool,
    pub started_unix: f64,
    /// Seconds from the script's start (its own clock: a check's timeline
    /// places the subtest with it).
    pub started_s: f64,
    pub seconds: f64,
    /// The script's line that opened it (`with subtest(...)`), when known.
    pub line: Option<u64>,
    pub steps: Vec<Step>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceback: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The failing node's serial console, last lines.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub console_tail: Option<String>,
}

#[derive(Default)]
struct Log {
    open: Option<(Subtest, Instant)>,
    done: Vec<Subtest>,
    loose: Vec<Step>,
}

/// What one script may reach, and what it did.
pub struct Session<'a> {
    record: &'a RunningCluster,
    guests: &'a GuestPool,
    dir: PathBuf,
    started: Instant,
    deadline: Instant,
    stopped: AtomicBool,
    log: Mutex<Log>,
}

/// A failed call: the message, and the command and output when there was one.
struct CallError {
    message: String,
    command: Option<String>,
    output: Option<String>,
}

impl From<anyhow::Error> for CallError {
    fn from(e: anyhow::Error) -> Self {
        CallError {
            message: format!("{e:#}"),
            command: None,
            output: None,
        }
    }
}

impl<'a> Session<'a> {
    pub fn new(
        record: &'a RunningCluster,
        guests: &'a GuestPool,
        dir: PathBuf,
        started: Instant,
        deadline: Instant,
    ) -> Self {
        Session {
            record,
            guests,
            dir,
            started,
            deadline,
            stopped: AtomicBool::new(false),
            log: Mutex::new(Log::default()),
        }
    }

    /// Ends a `serve` that still waits for its connection.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
    }

    /// The subtests (an unfinished one counts as failed) and the loose steps.
    pub fn into_results(self, stopped: Option<&str>) -> (Vec<Subtest>, Vec<Step>) {
        let mut log = self.log.into_inner().unwrap_or_default();
        if let Some((mut open, at)) = log.open.take() {
            open.passed = false;
            open.seconds = at.elapsed().as_secs_f64();
            open.message = Some(match stopped {
                Some(why) => format!("stopped inside this subtest: {why}"),
                None => "the script ended inside this subtest".into(),
            });
            log.done.push(open);
        }
        (log.done, log.loose)
    }

    /// Serves the script's one connection until it closes.
    pub fn serve(&self, listener: &UnixListener) -> Result<()> {
        listener.set_nonblocking(true)?;
        let stop = || {
            self.stopped
                .load(Ordering::SeqCst)
                .then(|| anyhow!("the script ended before it connected"))
        };
        let stream = Wait::new("the script to connect", Duration::from_secs(3600))
            .pause(Pause::Every(Duration::from_millis(20)))
            .stop_when(&stop)
            .run(|| match listener.accept() {
                Ok((s, _)) => Ok(Probe::Done(s)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    Ok(Probe::Pending("not yet".into()))
                }
                Err(e) => Err(e.into()),
            })?;
        stream.set_nonblocking(false)?;
        self.converse(stream)
    }

    fn converse(&self, stream: UnixStream) -> Result<()> {
        let mut out = stream.try_clone()?;
        for line in BufReader::new(stream).lines() {
            let req: Value = serde_json::from_str(&line?)?;
            let reply = self.answer(&req);
            out.write_all(format!("{reply}\n").as_bytes())?;
        }
        Ok(())
    }

    /// Runs one request and logs it as a step.
    pub fn answer(&self, req: &Value) -> Value {
        let op = req["op"].as_str().unwrap_or("").to_string();
        let started = Instant::now();
        let result = self.dispatch(&op, req);
        let mut step = Step {
            op: op.clone(),
            node: req["node"].as_str().map(String::from),
            command: req["command"].as_str().map(String::from),
            line: req["line"].as_u64(),
            seconds: started.elapsed().as_secs_f64(),
            status: None,
            output: String::new(),
            error: None,
        };
        let reply = match result {
            Ok(v) => {
                step.status = v["status"].as_i64().map(|s| s as i32);
                step.output = tail(v["stdout"].as_str().unwrap_or(""), 20);
                json!({ "result": v })
            }
            Err(e) => {
                let at = step.line.map(|l| format!("line {l}: ")).unwrap_or_default();
                step.error = Some(e.message.clone());
                step.output = tail(e.output.as_deref().unwrap_or(""), 20);
                json!({ "error": format!("{at}{}", e.message), "command": e.command, "output": e.output })
            }
        };
        if !op.starts_with("subtest_") && op != "nodes" {
            tracing::debug!("script step {op} {:?}: {:.2} s", step.command, step.seconds);
            self.record_step(step);
        }
        reply
    }

    fn record_step(&self, step: Step) {
        let mut log = self.log.lock().expect("script log");
        match &mut log.open {
            Some((s, _)) => s.steps.push(step),
            None => log.loose.push(step),
        }
    }

    fn dispatch(&self, op: &str, req: &Value) -> Result<Value, CallError> {
        match op {
            "nodes" => Ok(json!(self.record.nodes.keys().collect::<Vec<_>>())),
            "subtest_begin" => self.subtest_begin(req),
            "subtest_end" => self.subtest_end(req),
            "sleep" => {
                let secs = req["secs"].as_f64().unwrap_or(0.0).max(0.0);
                Wait::hold("script sleep", Duration::from_secs_f64(secs))?;
                Ok(Value::Null)
            }
            "exec" => self.exec(req),
            "wait_until" => self.wait_until(req),
            "wait_for_unit" => self.wait_for_unit(req),
            "write_file" => self.write_file(req),
            "read_file" => self.read_file(req),
            "heal" => Ok(json!(crate::fault::heal(self.record)?)),
            "snapshot_save" => {
                let name = req["name"].as_str().unwrap_or("script");
                let paused = crate::snapshot::save_in_place(self.record, name)?;
                Ok(json!(format!(
                    "saved {name:?} in each node's disk (paused {paused:.1} s)"
                )))
            }
            "snapshot_restore" => self.restore(req),
            "partition" => self.partition(req),
            "capture_start" => {
                let name = req["name"].as_str().unwrap_or("capture.pcap");
                let path = self.dir.join(name.replace('/', "_"));
                Ok(json!(crate::fault::capture_start(self.record, &path)?))
            }
            "capture_stop" => {
                let (file, frames) = crate::fault::capture_stop(self.record)?;
                Ok(json!({ "file": file, "frames": frames }))
            }
            _ => self.node_op(op, req),
        }
    }

    /// The operations on one node's machine (power and faults).
    fn node_op(&self, op: &str, req: &Value) -> Result<Value, CallError> {
        let node = self.node(req)?;
        let said = match op {
            "crash" => {
                self.guests.forget(node);
                crate::fault::crash(self.record, node)?
            }
            "shutdown" => {
                self.guests.forget(node);
                let grace = self.timeout(req);
                crate::fault::shutdown(self.record, node, grace)?
            }
            "pause" => crate::fault::pause(self.record, node, true)?,
            "resume" => crate::fault::pause(self.record, node, false)?,
            "start" => self.start(node)?,
            "block" => {
                let rest: Vec<String> = self.others(node);
                crate::fault::partition(self.record, &[vec![node.to_string()], rest])?
            }
            "link" => {
                let fault = LinkFault {
                    loss: req["loss"].as_f64().unwrap_or(0.0),
                    delay_ms: req["delay_ms"].as_u64().unwrap_or(0),
                    duplicate: req["duplicate"].as_f64().unwrap_or(0.0),
                };
                crate::fault::link(self.record, node, fault)?
            }
            _ => {
                return Err(CallError::from(anyhow!(
                    "the driver has no operation {op:?}"
                )));
            }
        };
        Ok(json!(said))
    }

    fn others(&self, node: &str) -> Vec<String> {
        self.record
            .nodes
            .keys()
            .filter(|n| *n != node)
            .cloned()
            .collect()
    }

    /// The cluster back to a `snapshot_save`, in place. The guests' TCP
    /// state went back too, so every session is new, and each clock is set
    /// to the host's again before the call returns.
    fn restore(&self, req: &Value) -> Result<Value, CallError> {
        let name = req["name"].as_str().unwrap_or("script");
        let paused = crate::snapshot::load_in_place(self.record, name)?;
        for node in self.record.nodes.keys() {
            self.guests.forget(node);
            let within = self.left().min(Duration::from_secs(120));
            Wait::new(format!("{node}: its channel after the restore"), within)
                .pause(Pause::Every(Duration::from_secs(1)))
                .run(|| {
                    let set = self.guests.get(node).and_then(|g| g.set_clock(within));
                    Ok(match set {
                        Ok(_) => Probe::Done(()),
                        Err(e) => {
                            self.guests.forget(node);
                            Probe::Pending(format!("{e:#}"))
                        }
                    })
                })?;
        }
        Ok(json!(format!(
            "restored {name:?} (paused {paused:.1} s); clocks set"
        )))
    }

    /// Boots a node that is down (a no-op when it runs), until it is ready.
    fn start(&self, node: &str) -> Result<String> {
        let pid = self.record.nodes[node].pid_now();
        if crate::machine::is_running(pid) {
            return Ok(format!("{node} runs already"));
        }
        self.guests.forget(node);
        let (said, _) = crate::fault::restart(self.record, node, self.left())?;
        Ok(said)
    }

    fn partition(&self, req: &Value) -> Result<Value, CallError> {
        let groups: Vec<Vec<String>> = serde_json::from_value(field(req, "groups")?.clone())
            .map_err(|e| anyhow!("groups: {e}"))?;
        for n in groups.iter().flatten() {
            self.known(n)?;
        }
        Ok(json!(crate::fault::partition(self.record, &groups)?))
    }

    /// The time left before the script's deadline.
    fn left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// The call's timeout (seconds), never past the script's deadline.
    fn timeout(&self, req: &Value) -> Duration {
        let secs = req["timeout"].as_f64().unwrap_or(900.0).max(0.0);
        Duration::from_secs_f64(secs).min(self.left())
    }

    fn known(&self, node: &str) -> Result<(), CallError> {
        if self.record.nodes.contains_key(node) {
            return Ok(());
        }
        let names: Vec<&str> = self.record.nodes.keys().map(|s| s.as_str()).collect();
        Err(CallError::from(anyhow!(
            "no node named {node:?} in the cluster (nodes: {})",
            names.join(", ")
        )))
    }

    fn node<'r>(&self, req: &'r Value) -> Result<&'r str, CallError> {
        let node = field(req, "node")?
            .as_str()
            .ok_or_else(|| anyhow!("node: a name"))?;
        self.known(node)?;
        Ok(node)
    }

    fn command(req: &Value) -> Result<&str, CallError> {
        Ok(field(req, "command")?
            .as_str()
            .ok_or_else(|| anyhow!("command: a string"))?)
    }

    /// Runs a command once; `expect` (success / failure) turns the wrong
    /// exit into an error that carries the command and its output.
    fn exec(&self, req: &Value) -> Result<Value, CallError> {
        let node = self.node(req)?;
        let command = Self::command(req)?;
        let out = self.run_in(node, command, self.timeout(req))?;
        let expect = req["expect"].as_str();
        let wrong = match expect {
            Some("success") => out.code != 0,
            Some("failure") => out.code == 0,
            _ => false,
        };
        if wrong {
            return Err(CallError {
                message: format!(
                    "command `{command}` on {node} exited {} (expected {})",
                    out.code,
                    if expect == Some("success") {
                        "0"
                    } else {
                        "non-zero"
                    }
                ),
                command: Some(command.into()),
                output: Some(format!("{}{}", out.stdout, out.stderr)),
            });
        }
        Ok(json!({ "status": out.code, "stdout": out.stdout }))
    }

    fn run_in(
        &self,
        node: &str,
        command: &str,
        budget: Duration,
    ) -> Result<crate::guest::ExecOutput> {
        let guest = self.guests.get(node)?;
        let out = guest.exec(command, budget);
        if let Err(e) = &out
            && crate::guest::breaks_session(e)
        {
            self.guests.forget(node);
        }
        out
    }

    /// Repeats a command until it exits 0 (or, `success` false, non-zero).
    fn wait_until(&self, req: &Value) -> Result<Value, CallError> {
        let node = self.node(req)?;
        let command = Self::command(req)?;
        let success = req["success"].as_bool().unwrap_or(true);
        let timeout = self.timeout(req);
        let mut last = String::new();
        let what = format!(
            "`{command}` on {node} to {}",
            if success { "succeed" } else { "fail" }
        );
        let done = Wait::new(what, timeout).pause(Pause::RETRY).run(|| {
            let out = match self.run_in(node, command, timeout) {
                Ok(o) => o,
                Err(e) => return Ok(Probe::Pending(format!("{e:#}"))),
            };
            last = format!("{}{}", out.stdout, out.stderr);
            Ok(if (out.code == 0) == success {
                Probe::Done(json!({ "status": out.code, "stdout": out.stdout }))
            } else {
                Probe::Pending(format!("exit {}", out.code))
            })
        });
        done.map_err(|e| CallError {
            message: format!("{e:#}"),
            command: Some(command.into()),
            output: Some(last),
        })
    }

    /// Waits until a unit is active; a failed unit fails at once.
    fn wait_for_unit(&self, req: &Value) -> Result<Value, CallError> {
        let node = self.node(req)?;
        let unit = field(req, "unit")?.as_str().unwrap_or_default();
        let command = format!("systemctl is-active {unit}");
        let what = format!("{unit} on {node} to be active");
        let done = Wait::new(what, self.timeout(req))
            .pause(Pause::RETRY)
            .run(|| {
                let state = match self.run_in(node, &command, Duration::from_secs(30)) {
                    Ok(o) => o.stdout.trim().to_string(),
                    Err(e) => return Ok(Probe::Pending(format!("{e:#}"))),
                };
                match state.as_str() {
                    "active" => Ok(Probe::Done(json!({ "status": 0, "stdout": state }))),
                    "failed" => Err(anyhow!("unit {unit} on {node} failed")),
                    _ => Ok(Probe::Pending(state)),
                }
            });
        done.map_err(|e| CallError {
            message: format!("{e:#}"),
            command: Some(command.clone()),
            output: None,
        })
    }

    /// copy_from_host: the file's bytes, base64 in a here-document.
    fn write_file(&self, req: &Value) -> Result<Value, CallError> {
        let node = self.node(req)?;
        let path = field(req, "path")?.as_str().unwrap_or_default();
        let data = field(req, "data")?.as_str().unwrap_or_default();
        let quoted = shell_quote(path);
        let command = format!(
            "mkdir -p \"$(dirname {quoted})\" && base64 -d > {quoted} <<'PHOTON_EOF'\n{data}\nPHOTON_EOF"
        );
        let out = self.run_in(node, &command, self.timeout(req))?;
        if out.code != 0 {
            return Err(CallError::from(anyhow!(
                "writing {path} on {node}: {}",
                out.stderr.trim()
            )));
        }
        Ok(Value::Null)
    }

    /// copy_from_vm: the file's bytes, base64.
    fn read_file(&self, req: &Value) -> Result<Value, CallError> {
        let node = self.node(req)?;
        let path = field(req, "path")?.as_str().unwrap_or_default();
        let out = self.run_in(
            node,
            &format!("base64 -w0 {}", shell_quote(path)),
            self.timeout(req),
        )?;
        if out.code != 0 {
            return Err(CallError::from(anyhow!(
                "reading {path} on {node}: {}",
                out.stderr.trim()
            )));
        }
        Ok(json!({ "data": out.stdout.trim() }))
    }

    fn subtest_begin(&self, req: &Value) -> Result<Value, CallError> {
        let name = req["name"].as_str().unwrap_or("subtest").to_string();
        let mut log = self.log.lock().expect("script log");
        if log.open.is_some() {
            return Err(CallError::from(anyhow!(
                "subtests do not nest (one is open)"
            )));
        }
        let started_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let sub = Subtest {
            name,
            passed: true,
            started_unix,
            started_s: self.started.elapsed().as_secs_f64(),
            seconds: 0.0,
            line: req["line"].as_u64(),
            steps: Vec::new(),
            message: None,
            traceback: None,
            command: None,
            output: None,
            node: None,
            console_tail: None,
        };
        log.open = Some((sub, Instant::now()));
        Ok(Value::Null)
    }

    /// Closes the open subtest (or, outside one, records the script's own
    /// failure as the subtest "script").
    fn subtest_end(&self, req: &Value) -> Result<Value, CallError> {
        let mut log = self.log.lock().expect("script log");
        let (mut sub, at) = match log.open.take() {
            Some(open) => open,
            None => {
                let steps = std::mem::take(&mut log.loose);
                let mut s = blank("script");
                s.steps = steps;
                s.started_s = self.started.elapsed().as_secs_f64();
                s.line = req["line"].as_u64();
                (s, Instant::now())
            }
        };
        sub.seconds = at.elapsed().as_secs_f64();
        sub.passed = req["passed"].as_bool().unwrap_or(false);
        if !sub.passed {
            let text = |k: &str| req[k].as_str().map(String::from);
            sub.message = text("message");
            sub.traceback = text("traceback");
            sub.command = text("command");
            sub.output = text("output").map(|o| tail(&o, 40));
            sub.node = text("failed_node");
            sub.console_tail = sub.node.as_deref().and_then(|n| self.console_tail(n));
        }
        log.done.push(sub);
        Ok(Value::Null)
    }

    fn console_tail(&self, node: &str) -> Option<String> {
        let n = self.record.nodes.get(node)?;
        let text = std::fs::read(n.dir.join("vm.log")).ok()?;
        Some(tail(&String::from_utf8_lossy(&text), 30))
    }
}

fn blank(name: &str) -> Subtest {
    Subtest {
        name: name.into(),
        passed: false,
        started_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0),
        started_s: 0.0,
        seconds: 0.0,
        line: None,
        steps: Vec::new(),
        message: None,
        traceback: None,
        command: None,
        output: None,
        node: None,
        console_tail: None,
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}
