//! Test scripts: a Python 3 program that drives the running cluster through
//! a machine API with the NixOS test driver's names (`node01.succeed(...)`,
//! `wait_for_unit`, `subtest`). The driver writes out its own module
//! (`photon_machine.py`, standard library only), starts `python3` with that
//! module on its path, and serves its calls over a Unix socket, one JSON
//! object per line each way ([`serve`]). Waits run here, through
//! [`crate::wait::Wait`], so Ctrl-C and `--timeout` reach them.

mod server;

use crate::guest::GuestPool;
use crate::state::RunningCluster;
use crate::wait::{Pause, Probe, Wait};
use anyhow::{Context, Result, anyhow};
use serde::Serialize;
use serde_json::Value;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use server::{Session, Step, Subtest};

/// The module the scripts import, this project's own code.
pub const MODULE: &str = include_str!("photon_machine.py");

/// What a finished script left: its exit, its subtests and its output.
#[derive(Debug, Serialize)]
pub struct Run {
    /// When python3 was started: the subtests' `started_s` count from it.
    #[serde(skip)]
    pub started: Instant,
    pub exit: Option<i32>,
    /// Why the script was stopped before it ended (its deadline, Ctrl-C,
    /// `--timeout`); it was then killed.
    pub stopped: Option<String>,
    pub seconds: f64,
    pub subtests: Vec<Subtest>,
    /// Calls made outside any subtest.
    pub steps: Vec<Step>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The first failed subtest, if any.
    pub fn failed(&self) -> Option<&Subtest> {
        self.subtests.iter().find(|s| !s.passed)
    }
}

/// Refuses a script that cannot run: a missing file, or Python that does
/// not parse (`file:line: message`, from Python's own parser).
pub fn check_syntax(path: &Path) -> Result<(), String> {
    if !path.is_file() {
        return Err(format!("{}: no such script", path.display()));
    }
    const PARSE: &str = "import ast,sys\n\
        p=sys.argv[1]\n\
        try:\n    ast.parse(open(p).read(), p)\n\
        except SyntaxError as e:\n    print('%s:%s: %s' % (p, e.lineno, e.msg)); sys.exit(1)\n";
    let out = Command::new("python3")
        .args(["-c", PARSE])
        .arg(path)
        .output()
        .map_err(|e| format!("cannot run python3 (scripts need it on PATH): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let msg = String::from_utf8_lossy(&out.stdout);
        let err = String::from_utf8_lossy(&out.stderr);
        Err(format!("{}{}", msg.trim(), err.trim()))
    }
}

/// Runs `script` against the running cluster, within `budget`. `dir` holds
/// the module, the socket and the files the script copies out of nodes.
pub fn run(
    record: &RunningCluster,
    guests: &GuestPool,
    script: &Path,
    dir: &Path,
    budget: Duration,
) -> Result<Run> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let lib = dir.join("lib");
    std::fs::create_dir_all(&lib)?;
    std::fs::write(lib.join("photon_machine.py"), MODULE)?;
    let sock = socket_path();
    let _ = std::fs::remove_file(&sock);
    let listener =
        UnixListener::bind(&sock).with_context(|| format!("binding {}", sock.display()))?;
    let started = Instant::now();
    let mut child = spawn(script, &lib, &sock, dir)?;
    let session = Session::new(record, guests, dir.to_path_buf(), started, started + budget);
    let served = std::thread::scope(|s| {
        let server = s.spawn(|| session.serve(&listener));
        let waited = wait_child(&mut child, script, budget);
        if waited.is_err() {
            kill(&mut child);
        }
        // The child is gone, so its socket is closed and the server ends.
        session.stop();
        let _ = server.join();
        waited
    });
    let _ = std::fs::remove_file(&sock);
    let (stdout, stderr) = outputs(dir);
    // Stopped (its deadline, Ctrl-C, --timeout): what the script did so far
    // is still its result, so that its subtests are checks with evidence.
    let (exit, stopped) = match served {
        Ok(exit) => (exit, None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let (subtests, steps) = session.into_results(stopped.as_deref());
    Ok(Run {
        started,
        exit,
        stopped,
        seconds: started.elapsed().as_secs_f64(),
        subtests,
        steps,
        stdout,
        stderr,
    })
}

/// A Python prompt on the running cluster (`script --interactive`), with
/// the script's objects, served like a script until the prompt ends. The
/// prompt owns the terminal: Ctrl-C interrupts the line being run (the
/// prompt's KeyboardInterrupt), and the wait goes on through it.
pub fn interactive(record: &RunningCluster, dir: &Path) -> Result<i32> {
    std::fs::create_dir_all(dir.join("lib"))
        .with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("lib/photon_machine.py"), MODULE)?;
    let sock = socket_path();
    let _ = std::fs::remove_file(&sock);
    let listener =
        UnixListener::bind(&sock).with_context(|| format!("binding {}", sock.display()))?;
    let mut child = Command::new("python3")
        .args([
            "-i",
            "-c",
            "from photon_machine import _interactive; globals().update(_interactive())",
        ])
        .env("PYTHONPATH", dir.join("lib"))
        .env("PHOTON_SCRIPT_SOCKET", &sock)
        .env("out", dir)
        .spawn()
        .map_err(|e| anyhow!("cannot run python3 (scripts need it on PATH): {e}"))?;
    let guests = GuestPool::new(record);
    let started = Instant::now();
    // A prompt has no deadline of its own; a day bounds a forgotten one.
    let session = Session::new(record, &guests, dir.to_path_buf(), started, started + DAY);
    let exit = std::thread::scope(|s| {
        let server = s.spawn(|| session.serve(&listener));
        let exit = Wait::new("the interactive prompt", DAY)
            .through_interrupt()
            .pause(Pause::Every(Duration::from_millis(100)))
            .run(|| {
                Ok(match child.try_wait()? {
                    Some(status) => Probe::Done(status.code().unwrap_or(1)),
                    None => Probe::Pending("still running".into()),
                })
            });
        if exit.is_err() {
            kill(&mut child);
        }
        session.stop();
        let _ = server.join();
        exit
    });
    let _ = std::fs::remove_file(&sock);
    exit
}

const DAY: Duration = Duration::from_secs(24 * 3600);

/// A short socket path: Unix socket paths are limited to about 100 bytes,
/// and artifact directories can be deep. Unique within the process (a
/// counter), so that scripts run side by side never share one.
fn socket_path() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("photon-script-{}-{n}.sock", std::process::id()))
}

fn spawn(script: &Path, lib: &Path, sock: &Path, dir: &Path) -> Result<Child> {
    let out = std::fs::File::create(dir.join("stdout.txt"))?;
    let err = std::fs::File::create(dir.join("stderr.txt"))?;
    let script = std::path::absolute(script)?;
    Command::new("python3")
        .args([
            "-u",
            "-c",
            "import sys, photon_machine; sys.exit(photon_machine._run(sys.argv[1]))",
        ])
        .arg(&script)
        .env("PYTHONPATH", lib)
        .env("PHOTON_SCRIPT_SOCKET", sock)
        .env("out", dir)
        .current_dir(script.parent().unwrap_or(Path::new(".")))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| anyhow!("cannot run python3 (scripts need it on PATH): {e}"))
}

/// Waits for the script to end, through the one wait helper (Ctrl-C and
/// `--timeout` end it, and so does the check's deadline).
fn wait_child(child: &mut Child, script: &Path, budget: Duration) -> Result<Option<i32>> {
    let what = format!("script {}", script.display());
    Wait::new(what, budget)
        .pause(Pause::Every(Duration::from_millis(100)))
        .run(|| {
            Ok(match child.try_wait()? {
                Some(status) => Probe::Done(status.code()),
                None => Probe::Pending("still running".into()),
            })
        })
}

/// Kills the script and reaps it, so that nothing is left behind.
fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn outputs(dir: &Path) -> (String, String) {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    (read("stdout.txt"), read("stderr.txt"))
}

/// One request from the script: `op` and its arguments.
pub fn field<'a>(req: &'a Value, key: &str) -> Result<&'a Value> {
    req.get(key)
        .ok_or_else(|| anyhow!("missing argument {key:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names in the module: Machine's public methods and the globals.
    fn provided() -> Vec<String> {
        let mut names: Vec<String> = MODULE
            .lines()
            .filter_map(|l| {
                l.strip_prefix("    def ")
                    .or_else(|| l.strip_prefix("def "))
            })
            .filter_map(|l| l.split('(').next())
            .filter(|n| !n.starts_with('_'))
            .map(String::from)
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The names in the method tables of docs/scripts.md.
    fn documented() -> Vec<String> {
        let doc = include_str!("../../docs/scripts.md");
        let mut names: Vec<String> = doc
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .map(String::from)
            .collect();
        names.sort();
        names.dedup();
        names
    }

    #[test]
    fn the_method_tables_in_the_docs_match_the_module() {
        assert_eq!(documented(), provided());
        for nixos in [
            "succeed",
            "fail",
            "execute",
            "wait_for_unit",
            "subtest",
            "retry",
        ] {
            assert!(provided().iter().any(|n| n == nixos), "{nixos}");
        }
    }

    #[test]
    fn a_script_that_does_not_parse_is_named_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.py");
        std::fs::write(&bad, "x = 1\nif x\n    pass\n").unwrap();
        let e = check_syntax(&bad).unwrap_err();
        assert!(e.contains("bad.py:2:"), "{e}");
        std::fs::write(&bad, "x = 1\n").unwrap();
        check_syntax(&bad).unwrap();
        let e = check_syntax(&dir.path().join("gone.py")).unwrap_err();
        assert!(e.contains("gone.py: no such script"), "{e}");
    }

    /// The module compiles, and only with the standard library.
    #[test]
    fn the_module_is_valid_python_with_standard_imports_only() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("photon_machine.py");
        std::fs::write(&m, MODULE).unwrap();
        check_syntax(&m).unwrap();
        for line in MODULE.lines().filter(|l| l.starts_with("import ")) {
            let name = line.trim_start_matches("import ").trim();
            assert!(
                [
                    "base64",
                    "contextlib",
                    "json",
                    "os",
                    "socket",
                    "sys",
                    "time",
                    "traceback"
                ]
                .contains(&name),
                "{name}"
            );
        }
    }
}
