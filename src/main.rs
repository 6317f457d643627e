use clap::Parser;
use photon_cluster::{cli, error};

fn main() {
    // `photon-cluster status | head` ends quietly, like any Unix tool,
    // instead of panicking on the closed pipe.
    // SAFETY: set once at start, before any thread exists.
    let _ = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        )
    };
    // A shell asking for completions (`COMPLETE=bash photon-cluster -- ...`,
    // set up by `photon-cluster completions bash`) is answered here.
    clap_complete::CompleteEnv::with_factory(<cli::Cli as clap::CommandFactory>::command)
        .complete();
    photon_cluster::install_interrupt_handler();
    let parsed = cli::Cli::parse();
    match cli::run(parsed) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // Through the log, so that `--log-format json` keeps it a JSON
            // line; the stable kind first, for people and CI to search for.
            tracing::error!(kind = error::kind_of(&e).name(), "{e:#}");
            std::process::exit(error::exit_code(&e) as i32);
        }
    }
}
