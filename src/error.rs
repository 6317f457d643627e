//! How a command ends: the exit codes a CI system can act on, the markers
//! that select them, and the one function that decides the code.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | everything passed (degraded checks included) |
//! | 1 | a check failed |
//! | 2 | bad input or usage: refused before anything started |
//! | 3 | the infrastructure failed: a VM did not boot, QEMU died, a build failed |
//! | 130 | interrupted (Ctrl-C); everything started was torn down |
//!
//! Each area has its own error type (`SpecError`, `StateError`,
//! `GuestError`, `WaitError`, ...). Where one of them means "refused before
//! anything started", the code that raises it wraps it in [`BadInput`]:
//! only the raiser knows whether anything had started.

use crate::spec::SpecError;
use serde::{Deserialize, Serialize};

pub const EXIT_PASS: u8 = 0;
pub const EXIT_CHECK_FAILED: u8 = 1;
pub const EXIT_BAD_INPUT: u8 = 2;
pub const EXIT_INFRA: u8 = 3;
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

/// The user pressed Ctrl-C (or the process got SIGTERM).
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

/// One or more checks failed; the details were already reported.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CheckFailed(pub String);

pub fn bad_input(msg: impl Into<String>) -> anyhow::Error {
    BadInput(msg.into().into()).into()
}

/// How a lane run ended, as result.json's `status` records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Pass,
    Degraded,
    Fail,
    /// The infrastructure failed (a step, not a check).
    Error,
    Interrupted,
}

impl RunStatus {
    pub fn name(self) -> &'static str {
        match self {
            RunStatus::Pass => "pass",
            RunStatus::Degraded => "degraded",
            RunStatus::Fail => "fail",
            RunStatus::Error => "error",
            RunStatus::Interrupted => "interrupted",
        }
    }
}

/// The process exit code for a run that ended with `status`.
pub fn for_status(status: RunStatus) -> u8 {
    match status {
        RunStatus::Pass | RunStatus::Degraded => EXIT_PASS,
        RunStatus::Fail => EXIT_CHECK_FAILED,
        RunStatus::Error => EXIT_INFRA,
        RunStatus::Interrupted => EXIT_INTERRUPTED,
    }
}

/// The process exit code for an error (the marker anywhere in its chain).
pub fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if cause.is::<SpecError>() || cause.is::<BadInput>() {
            return EXIT_BAD_INPUT;
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
    fn statuses_map_to_codes() {
        assert_eq!(for_status(RunStatus::Degraded), 0);
        assert_eq!(for_status(RunStatus::Fail), 1);
        assert_eq!(for_status(RunStatus::Error), 3);
        assert_eq!(for_status(RunStatus::Interrupted), 130);
    }
}
