//! The one way the driver waits for something: poll a probe until it has an
//! answer, the deadline passes, or a stop condition (QEMU exited, the user
//! pressed Ctrl-C, the global `--timeout` expired) ends the wait early.
//! Every poll loop uses it, so every wait has a reason in its error and
//! stops at once when it should. Ctrl-C and `--timeout` end every wait
//! within [`SLICE`] unless the wait is part of a teardown
//! ([`Wait::through_interrupt`]), which must finish its own bounded work.

use std::time::{Duration, Instant};

/// The longest a wait sleeps without looking at Ctrl-C and `--timeout`.
pub const SLICE: Duration = Duration::from_millis(100);

/// How long to pause between probes.
#[derive(Debug, Clone, Copy)]
pub enum Pause {
    /// The same pause every time.
    Every(Duration),
    /// Starts short and doubles up to a ceiling: a probe that succeeds soon
    /// is noticed soon, and one that keeps failing does not spin.
    Backoff { first: Duration, max: Duration },
}

impl Pause {
    /// 50 ms doubling to 1 s: the default for retried checks.
    pub const RETRY: Pause = Pause::Backoff {
        first: Duration::from_millis(50),
        max: Duration::from_secs(1),
    };

    /// The pause after attempt number `attempt` (from 0).
    pub fn nth(self, attempt: u32) -> Duration {
        match self {
            Pause::Every(d) => d,
            Pause::Backoff { first, max } => first
                .checked_mul(1u32 << attempt.min(16))
                .unwrap_or(max)
                .min(max),
        }
    }
}

/// Why a wait ended without an answer.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("{what}: not after {:.0} s ({last})", .after.as_secs_f64())]
    TimedOut {
        what: String,
        after: Duration,
        /// What the last probe said.
        last: String,
    },
    #[error(transparent)]
    Stopped(anyhow::Error),
}

/// What one probe found.
pub enum Probe<T> {
    /// The answer: the wait is over.
    Done(T),
    /// Not yet, and why (the reason of the last probe is in the timeout error).
    Pending(String),
}

/// A wait: what for (for messages), until when, how often, and what stops it.
pub struct Wait<'a> {
    what: String,
    deadline: Instant,
    pause: Pause,
    stop: Option<&'a (dyn Fn() -> Option<anyhow::Error> + Sync)>,
    /// Whether Ctrl-C and `--timeout` end this wait (all but teardowns).
    interruptible: bool,
}

impl<'a> Wait<'a> {
    pub fn new(what: impl Into<String>, timeout: Duration) -> Self {
        Wait {
            what: what.into(),
            deadline: Instant::now() + timeout,
            pause: Pause::Every(Duration::from_millis(250)),
            stop: None,
            interruptible: true,
        }
    }

    pub fn until(mut self, deadline: Instant) -> Self {
        self.deadline = deadline;
        self
    }

    pub fn pause(mut self, pause: Pause) -> Self {
        self.pause = pause;
        self
    }

    /// A condition checked before every probe; `Some(error)` ends the wait.
    pub fn stop_when(mut self, stop: &'a (dyn Fn() -> Option<anyhow::Error> + Sync)) -> Self {
        self.stop = Some(stop);
        self
    }

    /// Keeps waiting after Ctrl-C or `--timeout`: for the bounded waits of a
    /// teardown (a QEMU to exit, a check removing what it made), which run
    /// because the command is stopping.
    pub fn through_interrupt(mut self) -> Self {
        self.interruptible = false;
        self
    }

    /// Why this wait must end now, if it must. Ctrl-C and `--timeout` come
    /// back as themselves (`Interrupted`, `TimedOut`), so that every caller's
    /// exit code and run status follow without unwrapping.
    fn stopped(&self) -> Option<anyhow::Error> {
        if let Some(e) = self.stop.and_then(|s| s()) {
            return Some(WaitError::Stopped(e).into());
        }
        (self.interruptible && crate::interrupted()).then(crate::stop_error)
    }

    /// Sleeps `pause` in slices, ending early when the wait must stop.
    fn sleep(&self, pause: Duration) -> Result<(), anyhow::Error> {
        let until = Instant::now() + pause;
        loop {
            if let Some(e) = self.stopped() {
                return Err(e);
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            std::thread::sleep(left.min(SLICE));
        }
    }

    /// Holds for `d` (a phase of a workload, a settle time), ending early
    /// with the stop reason on Ctrl-C or `--timeout`.
    pub fn hold(what: impl Into<String>, d: Duration) -> Result<(), anyhow::Error> {
        Wait::new(what, d).sleep(d)
    }

    /// Like [`Wait::run`], but the deadline passing is `Ok(None)`, not an
    /// error: for a caller that judges a condition that never came itself
    /// (a drain that never emptied a server). Stops are still errors.
    pub fn run_or_none<T>(
        &self,
        probe: impl FnMut() -> anyhow::Result<Probe<T>>,
    ) -> Result<Option<T>, anyhow::Error> {
        match self.run(probe) {
            Ok(t) => Ok(Some(t)),
            Err(e) => match e.downcast::<WaitError>() {
                Ok(WaitError::TimedOut { .. }) => Ok(None),
                Ok(other) => Err(other.into()),
                Err(e) => Err(e),
            },
        }
    }

    /// Probes until `probe` is done. A probe error ends the wait with that error.
    pub fn run<T>(
        &self,
        mut probe: impl FnMut() -> anyhow::Result<Probe<T>>,
    ) -> Result<T, anyhow::Error> {
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            if let Some(e) = self.stopped() {
                return Err(e);
            }
            let last = match probe()? {
                Probe::Done(t) => return Ok(t),
                Probe::Pending(why) => why,
            };
            tracing::debug!(
                "{}: pending after {:.1} s: {last}",
                self.what,
                started.elapsed().as_secs_f64()
            );
            let pause = self.pause.nth(attempt);
            attempt += 1;
            if Instant::now() + pause > self.deadline {
                return Err(WaitError::TimedOut {
                    what: self.what.clone(),
                    after: started.elapsed(),
                    last,
                }
                .into());
            }
            self.sleep(pause)?;
        }
    }
}

/// The error that stopped a wait early, unwrapped (an `Interrupted`, for
/// example, keeps its type for the exit code).
pub fn unwrap_stopped(e: anyhow::Error) -> anyhow::Error {
    match e.downcast::<WaitError>() {
        Ok(WaitError::Stopped(inner)) => inner,
        Ok(other) => other.into(),
        Err(e) => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_ceiling() {
        let p = Pause::RETRY;
        assert_eq!(p.nth(0), Duration::from_millis(50));
        assert_eq!(p.nth(1), Duration::from_millis(100));
        assert_eq!(p.nth(4), Duration::from_millis(800));
        assert_eq!(p.nth(5), Duration::from_secs(1));
        assert_eq!(p.nth(40), Duration::from_secs(1));
    }

    #[test]
    fn returns_the_answer_or_times_out_with_the_last_reason() {
        let mut n = 0;
        let got = Wait::new("three", Duration::from_secs(5))
            .pause(Pause::Every(Duration::from_millis(1)))
            .run(|| {
                n += 1;
                Ok(if n == 3 {
                    Probe::Done(n)
                } else {
                    Probe::Pending(format!("n={n}"))
                })
            })
            .unwrap();
        assert_eq!(got, 3);
        let e = Wait::new("never", Duration::from_millis(30))
            .pause(Pause::Every(Duration::from_millis(5)))
            .run(|| Ok(Probe::<()>::Pending("still no".into())))
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("never: not after") && msg.contains("still no"),
            "{msg}"
        );
    }

    #[test]
    fn stops_early_and_keeps_the_stop_reason() {
        let stop = || Some(anyhow::anyhow!("QEMU exited"));
        let e = Wait::new("boot", Duration::from_secs(60))
            .stop_when(&stop)
            .run(|| Ok(Probe::<()>::Pending("x".into())))
            .unwrap_err();
        assert_eq!(unwrap_stopped(e).to_string(), "QEMU exited");
    }
}
