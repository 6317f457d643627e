//! Progress on long waits: one live line per node on a terminal, and plain
//! timestamped lines when stderr is not a terminal (CI logs). The plain
//! lines are log events (so `--log-format json` and `-q` apply to them);
//! on a terminal the same events go to driver.log at debug level.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static QUIET: AtomicBool = AtomicBool::new(false);

/// `-q`: no live display at all.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

pub struct Progress {
    bars: BTreeMap<String, ProgressBar>,
    _multi: MultiProgress,
    plain: bool,
    started: Instant,
}

impl Progress {
    pub fn new(names: &[String]) -> Progress {
        let plain = plain_output();
        let multi = MultiProgress::with_draw_target(if plain || QUIET.load(Ordering::Relaxed) {
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
        self.event(name, msg);
    }

    pub fn done(&self, name: &str, msg: &str) {
        if let Some(b) = self.bars.get(name) {
            b.finish_with_message(msg.to_string());
        }
        self.event(name, msg);
    }

    fn event(&self, name: &str, msg: &str) {
        let t = self.started.elapsed().as_secs_f64();
        if self.plain {
            tracing::info!("[{t:>6.1}s] {name}: {msg}");
        } else {
            tracing::debug!("[{t:>6.1}s] {name}: {msg}");
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
