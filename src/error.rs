//! How a command ends: the exit codes a CI system can act on, the markers
//! that select them, and the one function that decides the code.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | everything passed (degraded checks included) |
//! | 1 | a check failed |
//! | 2 | bad input or usage: refused before anything started |
//! | 3 | the infrastructure failed: a VM did not boot, QEMU died, a build failed |
//! | 124 | the global `--timeout` expired; artifacts written, everything started torn down |
//! | 130 | interrupted (Ctrl-C); everything started was torn down |
//!
//! Each area has its own error type (`StateError`, `GuestError`,
//! `WaitError`, ...). Where one of them means "refused before anything
//! started", the code that raises it wraps it in [`BadInput`]: only the
//! raiser knows whether anything had started. The one exception is
//! [`SpecError`], always bad input: it is declared here (and re-exported as
//! `spec::SpecError`) so that this module, which everything uses, depends
//! on nothing else of the crate.
//!
//! Every error also has a stable name, its [`ErrorKind`] (`kernel_panic`,
//! `port_taken`, `disk_full`, ...), printed as `error[kind]: ...` and kept
//! in result.json's `error_kind` so that CI systems and people can search
//! for it. The raiser names it with [`named`]; errors nobody named fall
//! back to what their types say, and then to `infra`.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

pub const EXIT_PASS: u8 = 0;
pub const EXIT_CHECK_FAILED: u8 = 1;
pub const EXIT_BAD_INPUT: u8 = 2;
pub const EXIT_INFRA: u8 = 3;
/// The global `--timeout` expired (the code GNU `timeout` uses).
pub const EXIT_TIMEOUT: u8 = 124;
pub const EXIT_INTERRUPTED: u8 = 130;

/// Bad input found before anything started: a missing image, a port already
/// in use, a state directory that is busy or already holds a running cluster.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct BadInput(pub Box<dyn std::error::Error + Send + Sync>);

impl BadInput {
    /// Marks an area's error as bad input, keeping it as the source.
    pub fn wrap(e: impl std::error::Error + Send + Sync + 'static) -> anyhow::Error {
        BadInput(Box::new(e)).into()
    }
}

/// A refusal of a definition (a cluster or lane file), pointing at the file,
/// line and field. Built by `SpecError::at` and `SpecError::from_toml` in
/// `spec` (spec/load.rs), which know how to find a line in the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.field,
            self.message
        )
    }
}

impl std::error::Error for SpecError {}

/// The user pressed Ctrl-C (or the process got SIGTERM).
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

/// One or more checks failed; the details were already reported.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CheckFailed(pub String);

/// The stable name of an error: docs/troubleshooting.md lists each with
/// what to do about it. Names are never reused for something else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// A cluster or lane file is wrong (file:line:col).
    SpecInvalid,
    /// Any other refusal before anything started (arguments, names).
    BadInput,
    StateBusy,
    AlreadyRunning,
    ImageMissing,
    PortTaken,
    SnapshotMissing,
    SnapshotStale,
    KvmUnavailable,
    /// A guest kernel panicked during boot.
    KernelPanic,
    /// QEMU ended during boot without a panic on the console.
    QemuExited,
    SshUnreachable,
    /// The control channel to a guest's agent ended or stopped answering
    /// mid-request; the next attempt opens a new one.
    ChannelBroken,
    UnitFailed,
    UnitsTimeout,
    /// A guest's QEMU died while the cluster was in use.
    NodeGone,
    FabricFailed,
    /// A write failed for lack of space (the state or artifact disk).
    DiskFull,
    /// The command's global `--timeout` expired.
    Timeout,
    Interrupted,
    CheckFailed,
    /// Anything else that went wrong in the infrastructure.
    Infra,
}

impl ErrorKind {
    /// The name as result.json and messages spell it.
    pub fn name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default()
    }
}

/// An error with its name. Displays and chains exactly like the error it
/// wraps, so naming never changes a message.
#[derive(Debug)]
pub struct Named {
    pub kind: ErrorKind,
    pub inner: anyhow::Error,
}

impl std::fmt::Display for Named {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&*self.inner, f)
    }
}

impl std::error::Error for Named {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner.source()
    }
}

/// Names an error (the innermost name given wins over outer context).
pub fn named(kind: ErrorKind, e: impl Into<anyhow::Error>) -> anyhow::Error {
    Named {
        kind,
        inner: e.into(),
    }
    .into()
}

/// Every cause of `err`, outermost first, including the errors that
/// [`Named`] wraps (its own `source` skips the wrapped error's top).
pub fn causes(err: &anyhow::Error) -> Vec<&(dyn std::error::Error + 'static)> {
    let mut out = Vec::new();
    for cause in err.chain() {
        out.push(cause);
        if let Some(n) = cause.downcast_ref::<Named>() {
            out.extend(causes(&n.inner).into_iter().take(1));
        }
    }
    out
}

/// The stable name of an error: the name its raiser gave it, else what
/// the error types in its chain say.
pub fn kind_of(err: &anyhow::Error) -> ErrorKind {
    let causes = causes(err);
    if let Some(n) = causes.iter().rev().find_map(|c| c.downcast_ref::<Named>()) {
        return n.kind;
    }
    for c in &causes {
        if c.is::<SpecError>() {
            return ErrorKind::SpecInvalid;
        }
        if c.is::<Interrupted>() {
            return ErrorKind::Interrupted;
        }
        if c.is::<TimedOut>() {
            return ErrorKind::Timeout;
        }
        if c.is::<CheckFailed>() {
            return ErrorKind::CheckFailed;
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::StorageFull
        {
            return ErrorKind::DiskFull;
        }
    }
    if causes.iter().any(|c| c.is::<BadInput>()) {
        ErrorKind::BadInput
    } else {
        ErrorKind::Infra
    }
}

/// The command's global `--timeout` expired.
#[derive(Debug, thiserror::Error)]
#[error("timed out: the command's --timeout of {secs} s expired")]
pub struct TimedOut {
    pub secs: u64,
}

pub fn bad_input(msg: impl Into<String>) -> anyhow::Error {
    BadInput(msg.into().into()).into()
}

/// How a lane run ended, as result.json's `status` records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Pass,
    Degraded,
    /// A check marked flaky failed and then passed from the snapshot.
    Flaky,
    Fail,
    /// The infrastructure failed (a step, not a check).
    Error,
    /// The global `--timeout` expired.
    Timeout,
    Interrupted,
}

impl RunStatus {
    pub fn name(self) -> &'static str {
        match self {
            RunStatus::Pass => "pass",
            RunStatus::Degraded => "degraded",
            RunStatus::Flaky => "flaky",
            RunStatus::Fail => "fail",
            RunStatus::Error => "error",
            RunStatus::Timeout => "timeout",
            RunStatus::Interrupted => "interrupted",
        }
    }
}

/// The process exit code for a run that ended with `status`.
pub fn for_status(status: RunStatus) -> u8 {
    match status {
        // A flaky check was declared so in its lane, with a reason.
        RunStatus::Pass | RunStatus::Degraded | RunStatus::Flaky => EXIT_PASS,
        RunStatus::Fail => EXIT_CHECK_FAILED,
        RunStatus::Error => EXIT_INFRA,
        RunStatus::Timeout => EXIT_TIMEOUT,
        RunStatus::Interrupted => EXIT_INTERRUPTED,
    }
}

/// The process exit code for an error (the marker anywhere in its chain).
pub fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in causes(err) {
        if cause.is::<SpecError>() || cause.is::<BadInput>() {
            return EXIT_BAD_INPUT;
        }
        if cause.is::<TimedOut>() {
            return EXIT_TIMEOUT;
        }
        if cause.is::<Interrupted>() {
            return EXIT_INTERRUPTED;
        }
        if cause.is::<CheckFailed>() {
            return EXIT_CHECK_FAILED;
        }
    }
    EXIT_INFRA
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn codes_follow_the_marker_through_context() {
        let e = Err::<(), _>(bad_input("port 1 in use"))
            .context("starting node01")
            .unwrap_err();
        assert_eq!(exit_code(&e), EXIT_BAD_INPUT);
        assert_eq!(exit_code(&anyhow::anyhow!("qemu died")), EXIT_INFRA);
        assert_eq!(exit_code(&Interrupted.into()), EXIT_INTERRUPTED);
        assert_eq!(
            exit_code(&CheckFailed("x".into()).into()),
            EXIT_CHECK_FAILED
        );
        let wrapped = BadInput::wrap(std::io::Error::other("busy"));
        assert_eq!(exit_code(&wrapped), EXIT_BAD_INPUT);
        assert_eq!(wrapped.to_string(), "busy");
    }

    #[test]
    fn names_survive_context_and_never_change_the_message() {
        let plain = Err::<(), _>(anyhow::anyhow!("Kernel panic - not syncing"))
            .context("node01: QEMU exited during boot")
            .unwrap_err();
        let e = Err::<(), _>(named(
            ErrorKind::KernelPanic,
            anyhow::anyhow!("Kernel panic - not syncing"),
        ))
        .context("node01: QEMU exited during boot")
        .unwrap_err();
        assert_eq!(format!("{e:#}"), format!("{plain:#}"));
        assert_eq!(kind_of(&e), ErrorKind::KernelPanic);
        assert_eq!(kind_of(&plain), ErrorKind::Infra);
        assert_eq!(ErrorKind::KernelPanic.name(), "kernel_panic");
        // A named refusal keeps its exit code.
        let port = named(ErrorKind::PortTaken, bad_input("port clash"));
        assert_eq!(exit_code(&port), EXIT_BAD_INPUT);
        assert_eq!(kind_of(&port), ErrorKind::PortTaken);
        assert_eq!(kind_of(&bad_input("x")), ErrorKind::BadInput);
        // The innermost name wins: it is the most specific.
        let twice = named(
            ErrorKind::Infra,
            named(ErrorKind::UnitFailed, anyhow::anyhow!("u")),
        );
        assert_eq!(kind_of(&twice), ErrorKind::UnitFailed);
        // What the types say, without a name.
        let full = anyhow::Error::from(std::io::Error::from(std::io::ErrorKind::StorageFull))
            .context("writing result.json");
        assert_eq!(kind_of(&full), ErrorKind::DiskFull);
        assert_eq!(kind_of(&TimedOut { secs: 5 }.into()), ErrorKind::Timeout);
        assert_eq!(exit_code(&TimedOut { secs: 5 }.into()), EXIT_TIMEOUT);
    }

    #[test]
    fn statuses_map_to_codes() {
        assert_eq!(for_status(RunStatus::Degraded), 0);
        assert_eq!(for_status(RunStatus::Fail), 1);
        assert_eq!(for_status(RunStatus::Error), 3);
        assert_eq!(for_status(RunStatus::Interrupted), 130);
        assert_eq!(for_status(RunStatus::Timeout), 124);
    }
}
