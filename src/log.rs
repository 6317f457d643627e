//! The driver's own log: `tracing` events, filtered by `RUST_LOG` (default
//! `info`), written to stderr as plain lines for a person or as JSON lines
//! (`--log-format json`) for CI log shippers. Commands, nodes, layers and
//! checks are spans, so a JSON line carries where it happened. The live
//! per-node progress display (`progress`) is separate and stays as it is.

use std::fmt;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Plain lines, as a person reads them.
    Human,
    /// One JSON object per line, with time, level, span and fields.
    Json,
}

/// Installs the subscriber; a second call (tests) is a no-op.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only for a person at a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.event_format(Human).try_init(),
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
    };
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
