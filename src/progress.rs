//! Progress on long waits: one live line per node on a terminal, and plain
//! timestamped lines when stderr is not a terminal (CI logs).

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

pub struct Progress {
    bars: BTreeMap<String, ProgressBar>,
    _multi: MultiProgress,
    plain: bool,
    started: Instant,
}

impl Progress {
    pub fn new(names: &[String]) -> Progress {
        let plain = plain_output();
        let multi = MultiProgress::with_draw_target(if plain {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        });
        let style = ProgressStyle::with_template("{spinner} [{elapsed:>4}] {prefix:<16} {msg}")
            .expect("valid template");
        let bars = names
            .iter()
            .map(|n| {
                let b = multi.add(ProgressBar::new_spinner());
                b.set_style(style.clone());
                b.set_prefix(n.clone());
                if !plain {
                    b.enable_steady_tick(Duration::from_millis(200));
                }
                (n.clone(), b)
            })
            .collect();
        Progress {
            bars,
            _multi: multi,
            plain,
            started: Instant::now(),
        }
    }

    pub fn set(&self, name: &str, msg: &str) {
        if let Some(b) = self.bars.get(name) {
            b.set_message(msg.to_string());
        }
        if self.plain {
            eprintln!(
                "[{:>6.1}s] {name}: {msg}",
                self.started.elapsed().as_secs_f64()
            );
        }
    }

    pub fn done(&self, name: &str, msg: &str) {
        if let Some(b) = self.bars.get(name) {
            b.finish_with_message(msg.to_string());
        }
        if self.plain {
            eprintln!(
                "[{:>6.1}s] {name}: {msg}",
                self.started.elapsed().as_secs_f64()
            );
        }
    }

    pub fn finish(&self) {
        for b in self.bars.values() {
            if !b.is_finished() {
                b.abandon();
            }
        }
    }
}

/// Timestamped lines instead of live bars: when stderr is not a terminal,
/// inside a Nix builder (Nix gives builders a pseudo-terminal, and redrawn
/// bars garble its logs), or when PHOTON_PLAIN_PROGRESS is set.
pub fn plain_output() -> bool {
    !std::io::stderr().is_terminal()
        || std::env::var_os("NIX_BUILD_TOP").is_some()
        || std::env::var_os("PHOTON_PLAIN_PROGRESS").is_some()
}
