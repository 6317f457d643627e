//! Facts about the host the driver runs on: which programs it has.

use crate::error::bad_input;
use anyhow::Result;
use std::path::Path;

/// Whether `program` is on PATH (or in /usr/sbin, /sbin, which root's PATH
/// may lack on Debian).
pub fn has_program(program: &str) -> bool {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false);
    on_path
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(program).is_file())
}

/// Refuses (exit 2) with the Debian package to install when `program` is missing.
pub fn require_program(program: &str, package: &str) -> Result<()> {
    if has_program(program) {
        return Ok(());
    }
    Err(bad_input(format!(
        "`{program}` is not installed; install it with `apt-get install {package}` \
         (or run scripts/host-deps.sh)"
    )))
}
