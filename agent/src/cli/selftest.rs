//! `tessera selftest`: try every known bypass against a private agent in a scratch cgroup, print
//! the table, write the JSON. `tessera selftest-actor` (hidden) performs one attempt.
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::selftest::{self, Attempt, Harness, HarnessConfig, Report, actor};
use crate::telemetry::{self, LogFormat};

#[derive(clap::Args, Debug)]
pub struct SelftestArgs {
    /// Also write the results as JSON (schema tessera.selftest/v1) to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Run every attempt even after one fails.
    #[arg(long)]
    pub keep_going: bool,
    /// Run only these attempts (repeatable); default: all.
    #[arg(long, value_enum)]
    pub only: Vec<Attempt>,
}

#[derive(clap::Args, Debug)]
pub struct ActorArgs {
    /// The actor request, as JSON (written by the self-test harness).
    pub request: String,
}

/// Attempts for features this build does not have yet; listed in the report as pending.
pub const PENDING: [&str; 0] = [];

pub async fn run(args: &SelftestArgs) -> ExitCode {
    telemetry::init(LogFormat::Plain);
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("tessera selftest: cannot find its own binary: {e}");
            return ExitCode::FAILURE;
        }
    };
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("tessera selftest: interrupted; cleaning up");
            flag.store(true, Ordering::SeqCst);
        }
    });
    let cfg = HarnessConfig {
        exe,
        cgroup_name: format!("tessera-selftest-{}", std::process::id()),
        interrupted: Some(interrupted),
    };
    let attempts: Vec<Attempt> = if args.only.is_empty() {
        Attempt::ALL.to_vec()
    } else {
        args.only.clone()
    };
    let keep_going = args.keep_going;
    // The harness blocks (it waits for actors and the log): keep it off the async workers.
    let outcome = tokio::task::spawn_blocking(move || {
        let harness = Harness::start(cfg)?;
        eprintln!(
            "tessera selftest: agent attached to {}; {} attempts",
            harness.cgroup().display(),
            attempts.len()
        );
        harness.run_all(&attempts, keep_going, |r| {
            eprintln!("  {:<28} {}", r.attempt.name(), r.status.as_str());
        })
    })
    .await;
    let results = match outcome {
        Ok(Ok(results)) => results,
        Ok(Err(e)) => {
            eprintln!("tessera selftest: {e}");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("tessera selftest: the harness panicked: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = Report::new(results, PENDING.to_vec());
    print!("{}", report.table());
    if let Some(path) = &args.json {
        let written = serde_json::to_vec_pretty(&report)
            .map_err(std::io::Error::other)
            .and_then(|json| std::fs::write(path, json));
        if let Err(e) = written {
            eprintln!("tessera selftest: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `tessera selftest-actor REQUEST`: one attempt; prints one JSON report line.
pub async fn actor(args: &ActorArgs) -> ExitCode {
    let req: actor::ActorRequest = match serde_json::from_str(&args.request) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tessera selftest-actor: bad request: {e}");
            return ExitCode::from(2);
        }
    };
    let report = selftest::actor::run(req).await;
    match serde_json::to_string(&report) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tessera selftest-actor: {e}");
            ExitCode::FAILURE
        }
    }
}
