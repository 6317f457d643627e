//! A small QMP client: newline-delimited JSON over the node's Unix socket.
//!
//! Kept to the commands the driver uses (`query-status`, `system_powerdown`,
//! `stop`, `cont`, `migrate`, `quit`) rather than a generated schema, so it works across QEMU versions.

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation done.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Qmp> {
        let stream = UnixStream::connect(socket)
            .with_context(|| format!("connecting to QMP socket {}", socket.display()))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            bail!("unexpected QMP greeting: {greeting}");
        }
        qmp.execute("qmp_capabilities")?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .context("reading from QMP")?;
        if n == 0 {
            bail!("QMP connection closed");
        }
        serde_json::from_str(&line).with_context(|| format!("parsing QMP message {line:?}"))
    }

    /// Runs a command and returns its `return` value; events in between are skipped.
    pub fn execute(&mut self, command: &str) -> Result<Value> {
        self.send(command, json!({ "execute": command }))
    }

    /// Runs a command with arguments.
    pub fn call(&mut self, command: &str, arguments: Value) -> Result<Value> {
        self.send(
            command,
            json!({ "execute": command, "arguments": arguments }),
        )
    }

    fn send(&mut self, command: &str, msg: Value) -> Result<Value> {
        self.writer
            .write_all(format!("{msg}\n").as_bytes())
            .with_context(|| format!("sending QMP {command}"))?;
        loop {
            let reply = self.read_message()?;
            if let Some(r) = reply.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = reply.get("error") {
                bail!("QMP {command} failed: {e}");
            }
        }
    }

    /// The VM's run state, e.g. `running`, `paused`, `shutdown`.
    pub fn status(&mut self) -> Result<String> {
        let r = self.execute("query-status")?;
        Ok(r.get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string())
    }
}
