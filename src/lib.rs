//! photon-cluster: boot clusters of QEMU virtual machines from prebuilt
//! images, validate them layer by layer, and keep the evidence.
//!
//! Data flows one way (docs/architecture.md):
//! `spec` (cluster definition) -> `image` -> `fabric` + `machine` + `provision`
//! -> `guest` -> `cluster` (start/stop) -> `status`.

pub mod cli;
pub mod cluster;
pub mod error;
pub mod fabric;
pub mod guest;
pub mod image;
pub mod machine;
pub mod progress;
pub mod provision;
pub mod spec;
pub mod state;
pub mod status;

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether the user pressed Ctrl-C (or the process got SIGTERM). Every long
/// wait polls this and unwinds, so the caller can tear down what it started.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Installs the Ctrl-C / SIGTERM handler that sets [`interrupted`].
pub fn install_interrupt_handler() {
    let _ = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            eprintln!("interrupted again; exiting now");
            std::process::exit(130);
        }
        eprintln!("interrupted; tearing down what was started (Ctrl-C again to exit at once)");
    });
}
