//! photon-cluster: boot clusters of QEMU virtual machines from prebuilt
//! images, validate them layer by layer, and keep the evidence.
//!
//! Data flows one way (docs/architecture.md):
//! `spec` (cluster definition) -> `image` -> `fabric` + `machine` + `provision`
//! -> `guest` -> `cluster` (start/stop) -> `status`.

pub mod agent;
pub mod bench;
pub mod check;
pub mod cli;
pub mod cluster;
pub mod compare;
pub mod engine;
pub mod error;
pub mod evidence;
pub mod fabric;
pub mod fault;
pub mod files;
pub mod graph;
pub mod guest;
pub mod hermetic;
pub mod history;
pub mod host;
pub mod image;
pub mod lane;
pub mod layered;
pub mod ledger;
pub mod log;
pub mod machine;
pub mod progress;
pub mod provision;
pub mod report;
pub mod rerun;
pub mod script;
pub mod secrets;
pub mod smoke;
pub mod snapshot;
pub mod spec;
pub mod state;
pub mod status;
pub mod text;
pub mod validate;
pub mod wait;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// QEMU processes this command launched and still owns: a second Ctrl-C,
/// which exits at once, kills them first so none is orphaned.
static OWNED_PIDS: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// Driver processes this command started (`run --jobs`' steps), each in a
/// process group of its own so that the terminal's Ctrl-C reaches only
/// this one: every Ctrl-C is passed on to them, the first to stop them
/// with their evidence, a second to end them at once.
static CHILDREN: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// Records a driver process this command started (until [`disown_child`]).
pub fn own_child(pid: u32) {
    CHILDREN.lock().expect("children").push(pid as i32);
}

/// Asks a driver process this command started to stop, as Ctrl-C would.
pub fn interrupt_child(pid: u32) {
    use nix::sys::signal::{Signal, kill};
    let _ = kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGINT);
}

/// Forgets a driver process once it ended.
pub fn disown_child(pid: u32) {
    CHILDREN
        .lock()
        .expect("children")
        .retain(|p| *p != pid as i32);
}

/// Records a QEMU launched by this command (until [`release_owned`]).
pub fn own_pid(pid: i32) {
    OWNED_PIDS.lock().expect("owned pids").push(pid);
}

/// Hands the launched QEMUs over to the running cluster: they outlive us.
pub fn release_owned() {
    OWNED_PIDS.lock().expect("owned pids").clear();
}

/// Whether the user pressed Ctrl-C (or the process got SIGTERM). Every long
/// wait polls this and unwinds, so the caller can tear down what it started.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Seconds of the global `--timeout` once it has expired (0: not expired).
static TIMED_OUT: AtomicU64 = AtomicU64::new(0);

/// When the global `--timeout` expires, once armed.
static DEADLINE: OnceLock<Instant> = OnceLock::new();

/// Arms the command's global `--timeout`. When it expires the command
/// unwinds exactly as after Ctrl-C (every wait polls [`interrupted`]):
/// evidence is collected, artifacts are written with status `timeout`,
/// and what the command started is stopped. It then exits 124.
pub fn arm_timeout(after: Duration) {
    let _ = DEADLINE.set(Instant::now() + after);
    std::thread::spawn(move || {
        std::thread::sleep(after);
        let secs = after.as_secs().max(1);
        TIMED_OUT.store(secs, Ordering::SeqCst);
        INTERRUPTED.store(true, Ordering::SeqCst);
        tracing::warn!(
            "--timeout {secs} s expired; collecting evidence and stopping what was started"
        );
    });
}

/// What is left of the global `--timeout`, if one is armed: a process this
/// command starts gets it as its own, and so ends with `timeout` too.
pub fn time_left() -> Option<Duration> {
    DEADLINE
        .get()
        .map(|d| d.saturating_duration_since(Instant::now()))
}

/// The `--timeout` that expired, in seconds, if it did.
pub fn timed_out() -> Option<u64> {
    match TIMED_OUT.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// The error for work stopped early: the timeout's, else Ctrl-C's.
pub fn stop_error() -> anyhow::Error {
    match timed_out() {
        Some(secs) => error::TimedOut { secs }.into(),
        None => error::Interrupted.into(),
    }
}

/// How a run stopped early, if it did: `timeout` or `interrupted`.
pub fn stopped_as() -> Option<error::RunStatus> {
    match (timed_out(), interrupted()) {
        (Some(_), _) => Some(error::RunStatus::Timeout),
        (None, true) => Some(error::RunStatus::Interrupted),
        _ => None,
    }
}

/// Installs the Ctrl-C / SIGTERM handler that sets [`interrupted`].
pub fn install_interrupt_handler() {
    let _ = ctrlc::set_handler(|| {
        for pid in CHILDREN.lock().map(|p| p.clone()).unwrap_or_default() {
            interrupt_child(pid as u32);
        }
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            eprintln!("interrupted again; killing owned QEMU processes and exiting now");
            for pid in OWNED_PIDS.lock().map(|p| p.clone()).unwrap_or_default() {
                machine::kill_now(pid);
            }
            std::process::exit(130);
        }
        eprintln!("interrupted; tearing down what was started (Ctrl-C again to exit at once)");
    });
}
