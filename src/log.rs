//! The driver's own log: `tracing` events, filtered by `RUST_LOG` (default
//! `info`), written to stderr as plain lines for a person or as JSON lines
//! (`--log-format json`) for CI log shippers. Commands, nodes, layers and
//! checks are spans, so a JSON line carries where it happened. The live
//! per-node progress display (`progress`) is separate and stays as it is.
//! Whatever stderr shows, the driver's debug events are also kept in memory
//! (`captured`), and every lane run writes them to its `driver.log`.

use std::fmt;
use std::sync::Mutex;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Plain lines, as a person reads them.
    Human,
    /// One JSON object per line, with time, level, span and fields.
    Json,
}

/// The level stderr shows when `RUST_LOG` is not set: `-q` warnings and
/// errors only, none of `-q`/`-v` info, `-v` debug, `-vv` trace.
pub fn default_level(quiet: bool, verbose: u8) -> &'static str {
    match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    }
}

/// Installs the subscriber; a second call (tests) is a no-op. `RUST_LOG`,
/// when set, filters stderr; else `level` does.
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let stderr = tracing_subscriber::fmt::layer()
        // Colours only for a person at a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let stderr = match format {
        LogFormat::Human => stderr.event_format(Human).boxed(),
        LogFormat::Json => stderr.json().with_current_span(true).boxed(),
    };
    // The full debug log for driver.log, with times and spans, whatever
    // stderr shows. Other crates only from `info` up: ssh2's and ureq's
    // debug output would drown the driver's.
    let capture = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(Capture)
        .with_filter(EnvFilter::new("info,photon_cluster=debug"));
    let _ = tracing_subscriber::registry()
        .with(stderr.with_filter(filter))
        .with(capture)
        .try_init();
}

/// The debug log kept in memory; at most this much, then a note.
const CAPTURE_LIMIT: usize = 32 << 20;
static CAPTURED: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// Everything the driver logged at debug level so far in this process.
pub fn captured() -> Vec<u8> {
    CAPTURED.lock().map(|b| b.clone()).unwrap_or_default()
}

struct Capture;

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut b) = CAPTURED.lock() {
            const FULL: &[u8] = b"[driver.log: 32 MiB reached, later lines dropped]\n";
            if b.len() + buf.len() <= CAPTURE_LIMIT {
                b.extend_from_slice(buf);
            } else if !b.ends_with(FULL) {
                b.extend_from_slice(FULL);
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        Capture
    }
}

/// The message alone, with `warning:`/`error:` in front where it applies.
struct Human;

impl<S, N> FormatEvent<S, N> for Human
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // An error's stable kind goes into its prefix: `error[disk_full]: ...`.
        let mut f = Fields::default();
        event.record(&mut f);
        match (*event.metadata().level(), &f.kind) {
            (Level::ERROR, Some(k)) => write!(writer, "error[{k}]: ")?,
            (Level::ERROR, None) => write!(writer, "error: ")?,
            (Level::WARN, _) => write!(writer, "warning: ")?,
            _ => {}
        }
        write!(writer, "{}", f.message)?;
        for (k, v) in &f.rest {
            write!(writer, " {k}={v}")?;
        }
        writeln!(writer)
    }
}

/// An event's message, its `kind` (if any) and its other fields.
#[derive(Default)]
struct Fields {
    message: String,
    kind: Option<String>,
    rest: Vec<(&'static str, String)>,
}

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_string(),
            "kind" => self.kind = Some(value.to_string()),
            name => self.rest.push((name, value.to_string())),
        }
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "kind" => self.kind = Some(format!("{value:?}")),
            name => self.rest.push((name, format!("{value:?}"))),
        }
    }
}
