//! `tessera logs`: read or follow the decision log, filtered, as JSON lines or compact lines.
use std::io::{self, IsTerminal, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use super::DEFAULT_DECISION_LOG;
use crate::decision::{
    DecisionRecord, FollowError, LogFollower, LogLine, Reason, RecordFilter, Verdict,
    format_compact, format_compact_coloured,
};

/// How often `-f` looks for new lines.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Clone, Debug, clap::Args)]
pub struct LogsArgs {
    /// Keep reading: print lines appended to the log (across truncation and rotation).
    #[arg(short, long)]
    pub follow: bool,
    /// Only decisions with this verdict.
    #[arg(long, value_enum)]
    pub verdict: Option<Verdict>,
    /// Only decisions with this reason.
    #[arg(long, value_enum)]
    pub reason: Option<Reason>,
    /// Only decisions of this workload (its name or SPIFFE ID).
    #[arg(long, value_name = "ID")]
    pub workload: Option<String>,
    /// Only decisions about this endpoint.
    #[arg(long, value_name = "NAME")]
    pub endpoint: Option<String>,
    /// json: the log's lines as they are; compact: one readable line per decision.
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Json)]
    pub output: OutputFormat,
    /// The decision log.
    #[arg(default_value = DEFAULT_DECISION_LOG)]
    pub file: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Json,
    Compact,
}

#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    #[error(transparent)]
    Log(#[from] FollowError),
    #[error("cannot write the output: {0}")]
    Output(#[source] io::Error),
}

/// Runs `tessera logs` (on a blocking thread; with `-f` until interrupted). Exit 0, or 1 when
/// the log cannot be read.
pub async fn run(args: &LogsArgs) -> ExitCode {
    let args = args.clone();
    match tokio::task::spawn_blocking(move || run_blocking(&args)).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: tessera logs stopped: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `run` without the async runtime.
pub fn run_blocking(args: &LogsArgs) -> ExitCode {
    let stdout = io::stdout();
    let colour = args.output == OutputFormat::Compact
        && stdout.is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let mut out = stdout.lock();
    let result = read_log(args, &mut out, &mut io::stderr(), colour, &|| false)
        .and_then(|()| out.flush().map_err(LogsError::Output));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `tessera logs | head`: the reader has seen enough.
        Err(LogsError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The body of `run`, writing to `out` and `err`; with `-f`, polls until `stop` is true.
fn read_log(
    args: &LogsArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
    colour: bool,
    stop: &dyn Fn() -> bool,
) -> Result<(), LogsError> {
    let mut follower = if args.follow {
        LogFollower::waiting_for(&args.file)
    } else {
        LogFollower::open(&args.file)?
    };
    let mut printer = Printer {
        path: args.file.display().to_string(),
        filter: RecordFilter {
            verdict: args.verdict,
            reason: args.reason,
            workload: args.workload.clone(),
            endpoint: args.endpoint.clone(),
        },
        format: args.output,
        colour,
        flush_each: args.follow,
        out,
        err,
        failed: None,
    };
    let mut on_line = |line: LogLine| printer.show(&line);
    loop {
        let mut flow = follower.read_available(&mut on_line)?;
        if flow.is_continue()
            && !args.follow
            && let Some(line) = follower.finish()
        {
            flow = on_line(line);
        }
        if flow.is_break() {
            let e = printer.failed.take();
            return Err(LogsError::Output(
                e.unwrap_or_else(|| io::ErrorKind::Other.into()),
            ));
        }
        if !args.follow || stop() {
            return Ok(());
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Writes the lines that parse and pass the filter; warns about those that do not parse.
struct Printer<'a> {
    path: String,
    filter: RecordFilter,
    format: OutputFormat,
    colour: bool,
    flush_each: bool,
    out: &'a mut dyn Write,
    err: &'a mut dyn Write,
    /// Why the last `show` broke off.
    failed: Option<io::Error>,
}

impl Printer<'_> {
    fn show(&mut self, line: &LogLine) -> ControlFlow<()> {
        match self.try_show(line) {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                self.failed = Some(e);
                ControlFlow::Break(())
            }
        }
    }

    fn try_show(&mut self, line: &LogLine) -> io::Result<()> {
        if line.text.trim().is_empty() {
            return Ok(());
        }
        let record: DecisionRecord = match serde_json::from_str(&line.text) {
            Ok(record) => record,
            Err(e) => {
                // A warning that cannot be written is not worth stopping for.
                let _ = writeln!(
                    self.err,
                    "warning: {}:{}: not a decision record: {e}",
                    self.path, line.number
                );
                return Ok(());
            }
        };
        if !self.filter.matches(&record) {
            return Ok(());
        }
        match (self.format, self.colour) {
            (OutputFormat::Json, _) => writeln!(self.out, "{}", line.text)?,
            (OutputFormat::Compact, false) => writeln!(self.out, "{}", format_compact(&record))?,
            (OutputFormat::Compact, true) => {
                writeln!(self.out, "{}", format_compact_coloured(&record))?;
            }
        }
        if self.flush_each {
            self.out.flush()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
