use clap::Parser;
use photon_cluster::{cli, error};

fn main() {
    photon_cluster::install_interrupt_handler();
    let parsed = cli::Cli::parse();
    match cli::run(parsed) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // Through the log, so that `--log-format json` keeps it a JSON line.
            tracing::error!("{e:#}");
            std::process::exit(error::exit_code(&e) as i32);
        }
    }
}
