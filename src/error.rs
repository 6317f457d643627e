//! Exit codes a CI system can act on, and the error markers that select them.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | everything passed |
//! | 1 | a check failed |
//! | 2 | bad input or usage: refused before anything started |
//! | 3 | the infrastructure failed: a VM did not boot, QEMU died, a build failed |
//! | 130 | interrupted (Ctrl-C); everything started was torn down |

use crate::spec::SpecError;

pub const EXIT_CHECK_FAILED: u8 = 1;
pub const EXIT_BAD_INPUT: u8 = 2;
pub const EXIT_INFRA: u8 = 3;
pub const EXIT_INTERRUPTED: u8 = 130;

/// Bad input found before anything started: a missing image, a port already
/// in use, a state directory that is busy or already holds a running cluster.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

/// The user pressed Ctrl-C (or the process got SIGTERM).
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

/// One or more checks failed; the details were already reported.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CheckFailed(pub String);

pub fn bad_input(msg: impl Into<String>) -> anyhow::Error {
    BadInput(msg.into()).into()
}

/// Maps an error (anywhere in its chain) to the process exit code.
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
    }
}
