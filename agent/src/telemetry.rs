//! Operational logging: tracing to stderr, filtered by `RUST_LOG` (default `info`), plain or
//! JSON. Decisions are not logged here: they go to the decision log.
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (coloured when stderr is a terminal).
    #[default]
    Plain,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber; call once, first thing. An invalid `RUST_LOG` is reported
/// on stderr and replaced by `info` (the agent still starts); a second call does nothing.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env()
        .unwrap_or_else(|e| {
            eprintln!(
                "tessera: RUST_LOG is not a valid filter ({e}); using `info` \
                 (try e.g. RUST_LOG=info or RUST_LOG=tessera_agent=debug)"
            );
            EnvFilter::new("info")
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // Already installed (tests, a second call): keep the first one.
    let _ = match format {
        LogFormat::Plain => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
