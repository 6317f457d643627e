//! A long-lived shell per node on the kept SSH session: commands are
//! written to it and their output read back in frames, so a command costs
//! neither a channel open nor a login shell's start (a fork of bash under
//! emulation is tens of milliseconds).
//!
//! Each command runs in a subshell (so `exit`, `cd` and `set -e` stay its
//! own) with stdin from /dev/null, like a command run on its own channel.
//! Its stdout streams back as is; then a frame line, `\x01<tag> <exit>
//! <stderr bytes>`, and the stderr, which was kept in a file under /run.
//! The tag is unique per command, so no output can fake the frame.

use std::io::{Read, Write};
use std::time::Instant;

type Source = Box<dyn std::error::Error + Send + Sync>;

/// Where a command's stderr waits until its frame is written.
const STDERR: &str = "/run/.photon-cluster-stderr";

pub struct Shell {
    channel: ssh2::Channel,
    buf: Vec<u8>,
    seq: u64,
}

/// What one command left: its exit code, stdout and stderr.
pub struct Framed {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Shell {
    /// Starts the node's shell (the user's login shell, as `exec` uses).
    pub fn open(session: &ssh2::Session) -> Result<Shell, Source> {
        let mut channel = session.channel_session()?;
        channel.exec("exec \"$SHELL\"")?;
        Ok(Shell {
            channel,
            buf: Vec::new(),
            seq: 0,
        })
    }

    /// Runs one command, reading its output until `until`. The write is
    /// bounded by the session's timeout as the caller set it; the reads
    /// wait in slices of [`crate::wait::SLICE`], so that Ctrl-C and the
    /// global `--timeout` end a command that was `stoppable` (one that
    /// began before them: work in progress, not a teardown or the evidence
    /// collected after them) within a slice, with the stop error.
    pub fn run(
        &mut self,
        session: &ssh2::Session,
        command: &str,
        until: Instant,
        stoppable: bool,
    ) -> Result<Framed, Source> {
        self.seq += 1;
        let tag = format!("pc{}x{}", std::process::id(), self.seq);
        self.channel.write_all(script(command, &tag).as_bytes())?;
        self.channel.flush()?;
        session.set_timeout(crate::wait::SLICE.as_millis() as u32);
        let head = format!("\n\x01{tag} ");
        let (at, end, code, len) = loop {
            if let Some(found) = frame(&self.buf, head.as_bytes()) {
                break found;
            }
            self.fill(until, stoppable)?;
        };
        while self.buf.len() < end + len {
            self.fill(until, stoppable)?;
        }
        let stdout = String::from_utf8_lossy(&self.buf[..at]).to_string();
        let stderr = String::from_utf8_lossy(&self.buf[end..end + len]).to_string();
        self.buf.drain(..end + len);
        Ok(Framed {
            code,
            stdout,
            stderr,
        })
    }

    /// Reads what the shell has sent, waiting a slice at a time until
    /// `until` (or a stop, for a stoppable command).
    fn fill(&mut self, until: Instant, stoppable: bool) -> Result<(), Source> {
        let mut chunk = [0u8; 16384];
        loop {
            match self.channel.read(&mut chunk) {
                Ok(0) => return Err("the node's shell exited".into()),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    if stoppable && crate::interrupted() {
                        return Err(Box::new(Stopped));
                    }
                    if Instant::now() >= until {
                        return Err(e.into());
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// A command ended early by Ctrl-C or the global `--timeout`.
#[derive(Debug)]
pub struct Stopped;

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stopped by Ctrl-C or --timeout")
    }
}

impl std::error::Error for Stopped {}

impl Shell {}

/// The text written to the shell for one command.
fn script(command: &str, tag: &str) -> String {
    format!(
        "( {command}\n) </dev/null 2>{STDERR}; rc=$?; \
         if [ -s {STDERR} ]; then n=$(wc -c <{STDERR}); else n=0; fi; \
         printf '\\n\\001{tag} %d %d\\n' \"$rc\" \"$n\"; \
         [ \"$n\" = 0 ] || cat {STDERR}\n"
    )
}

/// Finds the frame line in `buf`: (where stdout ends, where stderr starts,
/// exit code, stderr length).
fn frame(buf: &[u8], head: &[u8]) -> Option<(usize, usize, i32, usize)> {
    let at = buf.windows(head.len()).position(|w| w == head)?;
    let rest = &buf[at + head.len()..];
    let nl = rest.iter().position(|b| *b == b'\n')?;
    let line = String::from_utf8_lossy(&rest[..nl]);
    let mut parts = line.split_whitespace();
    let code = parts.next()?.parse().ok()?;
    let len = parts.next()?.parse().ok()?;
    Some((at, at + head.len() + nl + 1, code, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The script, run by a real shell here, frames what the command did.
    #[test]
    fn a_real_shell_frames_stdout_exit_code_and_stderr() {
        let tag = "t1";
        let cmd = "printf 'out no newline'; echo oops >&2; exit 7";
        let mut sh = std::process::Command::new("bash")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .env("TMPDIR", "/tmp")
            .spawn()
            .unwrap();
        let s = script(cmd, tag).replace(STDERR, "/tmp/.pc-shell-test-stderr");
        sh.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
        let out = sh.wait_with_output().unwrap().stdout;
        let (at, end, code, len) = frame(&out, b"\n\x01t1 ").expect("a frame");
        assert_eq!(String::from_utf8_lossy(&out[..at]), "out no newline");
        assert_eq!(code, 7, "`exit` ends the command, not the shell");
        assert_eq!(String::from_utf8_lossy(&out[end..end + len]), "oops\n");
    }

    #[test]
    fn output_that_looks_like_a_frame_with_another_tag_is_stdout() {
        let buf = b"a\n\x01pc1x1 0 0\nb\n\x01pc1x2 3 0\n";
        let (at, _, code, _) = frame(buf, b"\n\x01pc1x2 ").unwrap();
        assert_eq!(&buf[..at], b"a\n\x01pc1x1 0 0\nb");
        assert_eq!(code, 3);
        assert!(frame(b"partial \x01pc1x2 1", b"\n\x01pc1x2 ").is_none());
    }
}
